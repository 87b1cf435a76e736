"""A run folder that was damaged, edited or left half-written: the run repairs what it can and says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.storage.hashing import sha256_file

SMALL = ["--set", "generate.width=32", "--set", "generate.height=32", "--set", "generate.steps=2", "--rows-per-shard", "2"]


def cli(*args) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args])


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path]:
    catalog = write_catalog(tmp_path / "c.parquet", prompts(6))
    out = tmp_path / "out"
    result = cli("run", catalog, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return catalog, out


def parts(out: Path) -> list[Path]:
    return sorted((out / "stages" / "generate").glob("part-*.parquet"))


def test_a_truncated_part_is_set_aside_and_its_rows_redone(finished, caplog):
    catalog, out = finished
    before = results(out)
    victim = parts(out)[0]
    victim.write_bytes(victim.read_bytes()[:100])  # as a disk-full write of an older version left it
    with caplog.at_level(logging.WARNING):
        result = cli("run", catalog, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert any("set aside" in r.getMessage() and victim.name in r.getMessage() for r in caplog.records)
    aside = list((out / "stages" / "generate" / "set-aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(victim.name)
    after = results(out)
    pd.testing.assert_series_equal(before.image_sha256, after.image_sha256)  # the redone rows are identical
    assert json.loads((out / "run.json").read_text())["invocations"][-1]["pending"]["generate"] == 2


def test_a_garbage_run_json_is_named(finished):
    catalog, out = finished
    (out / "run.json").write_text("{ not json")
    for args in (["run", catalog, "--out", out, *SMALL], ["status", out], ["verify", out]):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert str(out / "run.json") in " ".join(result.output.split()) and "not valid JSON" in result.output
        assert "Traceback" not in result.output


def test_verify_marks_missing_and_changed_images_failed_then_retry_redoes_them(finished):
    catalog, out = finished
    df = results(out)
    missing, changed = out / df.image_path[1], out / df.image_path[4]
    missing.unlink()
    changed.write_bytes(changed.read_bytes() + b"x")
    result = cli("verify", out)
    assert result.exit_code == 3, result.output
    assert "2 image(s) missing or changed" in result.output
    marked = results(out)
    assert marked.status.tolist() == ["ok", "failed", "ok", "ok", "failed", "ok"]
    assert "image missing" in marked.error[1] and "image changed" in marked.error[4]
    assert cli("verify", out).exit_code == 3  # still bad until redone
    plain = cli("run", catalog, "--out", out, *SMALL)
    assert plain.exit_code == 3  # recorded failures stay failed on a plain re-run
    redone = cli("run", catalog, "--out", out, *SMALL, "--retry-failed")
    assert redone.exit_code == 0, redone.output
    after = results(out)
    assert (after.status == "ok").all()
    assert after.image_sha256.tolist() == df.image_sha256.tolist()  # the same bytes as the first time
    for row in after.itertuples():
        assert sha256_file(out / row.image_path) == row.image_sha256
    assert cli("verify", out).exit_code == 0


def test_status_reads_the_folder_alone(finished, tmp_path: Path):
    catalog, out = finished
    result = cli("status", out)
    assert result.exit_code == 0, result.output
    cells = [line.replace("│", " ").split() for line in result.output.splitlines()]
    assert ["generate", "6", "0", "0", "0", "0", "0"] in cells
    assert "not running" in result.output
    parts(out)[0].unlink()  # as if that shard had not run yet
    from catalogen.run.inspect import folder_status
    from catalogen.storage.store import RunStore

    status = folder_status(RunStore(out))
    assert status["stages"]["generate"]["ok"] == 4 and status["stages"]["generate"]["pending"] == 2


def test_clean_lists_then_removes_images_no_row_points_at(finished):
    catalog, out = finished
    kept = set(results(out).image_path)
    assert cli("run", catalog, "--out", out, *SMALL, "--set", "generate.guidance_scale=3").exit_code == 0
    listed = cli("clean", out)
    assert listed.exit_code == 0 and "6 image(s)" in listed.output
    assert all((out / p).exists() for p in kept)  # only listed
    removed = cli("clean", out, "--yes")
    assert removed.exit_code == 0 and "removed 6 image(s)" in removed.output
    assert not any((out / p).exists() for p in kept)
    assert all((out / p).exists() for p in results(out).image_path)  # current images stay


def test_leftovers_of_killed_writes_are_swept(finished):
    catalog, out = finished
    debris = [out / "work" / "tmp" / ".x.png.abc.tmp", out / ".results.parquet.abc.tmp", out / "work" / "generate" / "shard-x.parquet"]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert cli("run", catalog, "--out", out, *SMALL).exit_code == 0
    assert not any(p.exists() for p in debris) and not (out / "work").exists()


def test_a_rerun_with_a_failed_row_says_so(tmp_path: Path, caplog):
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    catalog = write_catalog(tmp_path / "c.parquet", prompts(3))
    out = tmp_path / "out"
    plan = prepare(catalog, load_config(None, {"generate.width": 32, "generate.height": 32, "generate.steps": 2,
                                               "rows_per_shard": 2}), out)
    row = plan.planned["generate"].to_pylist()[0]
    (out / plan.store.image_path("generate", row["id"], row["variant"], row["key"])).mkdir(parents=True)
    assert cli("run", catalog, "--out", out, *SMALL).exit_code == 3
    with caplog.at_level(logging.INFO, logger="catalogen"):  # the tests' Prefect logs at WARNING
        assert cli("run", catalog, "--out", out, *SMALL).exit_code == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("generate: nothing to do (2 ok, 1 failed)" in m for m in messages), messages
    assert not any("every row is done" in m for m in messages)
