"""The Prefect flow on its ephemeral API: outputs, resume, changed settings, --retry-failed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import FAST, held_in_another_process, prompts, write_catalog

from catalogen.models import loading as models
from catalogen.storage.hashing import sha256_file
from catalogen.media.pngmeta import parse_parameters, read_png_text
from catalogen.storage.store import RunStore
from flows.run import catalogen_run, run_summary


def run(catalog: Path, out: Path, **kwargs) -> dict:
    """The flow as a deployment runs it; returns its summary and checks the final state agrees."""
    overrides = {**FAST, "rows_per_shard": 3, **kwargs.pop("overrides", {})}
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True, **kwargs)
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        raise summary
    assert state.is_failed() == bool(summary["failed"]), state  # a failed row must fail the flow run
    return summary


def counts(summary: dict) -> dict:
    return {k: summary[k] for k in ("rows", "ok", "failed", "skipped")}


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    columns = prompts(7)
    columns["guidance_scale"] = [None, None, 4.0, None, None, None, None]
    columns["num_variants"] = [1, 2, 1, 1, 1, 1, 1]
    columns["brand_note"] = [f"note {i}" for i in range(7)]  # unknown: passes through
    columns["attributes"] = [{"color": "red", "sizes": list(range(i))} for i in range(7)]  # nested too
    return write_catalog(tmp_path / "catalog.parquet", columns)


def test_outputs_follow_the_contract(tmp_path: Path, catalog: Path):
    out = tmp_path / "out"
    summary = run(catalog, out)
    assert counts(summary) == {"rows": 8, "ok": 8, "failed": 0, "skipped": 0}
    assert (summary["out"], summary["crashed_shards"], summary["stages"]) == (str(out), 0, {"generate": {"ok": 8}})

    table = pq.read_table(out / "results.parquet")
    names = table.column_names
    assert names[:7] == ["id", "prompt", "guidance_scale", "num_variants", "brand_note", "attributes", "variant"]
    assert names[7:14] == ["status", "error", "stage", "image_path", "image_sha256", "image_width", "image_height"]
    assert table.schema.field("attributes").type == pq.read_schema(catalog).field("attributes").type
    for column in ("generate_seed", "generate_model", "generate_model_revision", "generate_device", "generate_seconds",
                   "generate_steps", "generate_scheduler", "generate_key"):
        assert column in names
    df = table.to_pandas()
    assert list(zip(df.id, df.variant)) == [("row-0", 0), ("row-1", 0), ("row-1", 1), *[(f"row-{i}", 0) for i in range(2, 7)]]
    assert df.brand_note.tolist()[:3] == ["note 0", "note 1", "note 1"]
    assert [a["sizes"].tolist() for a in df.attributes[:4]] == [[], [0], [0], [0, 1]]
    assert set(df.generate_device) == {"cpu"} and set(df.generate_dtype) == {"float32"}
    assert df.generate_guidance_scale.tolist()[3] == 4.0 and df.generate_guidance_scale.tolist()[0] == 7.5
    assert df.generate_seed.nunique() == 8
    for row in df.itertuples():
        assert sha256_file(out / row.image_path) == row.image_sha256
        parsed = parse_parameters(read_png_text(str(out / row.image_path))["parameters"])
        assert (parsed["seed"], parsed["prompt"], parsed["width"]) == (row.generate_seed, row.prompt, 32)

    info = json.loads((out / "run.json").read_text())
    assert info["config"]["generate"]["steps"] == 3
    assert info["models"]["generate"]["pipeline"]["revision"] == df.generate_model_revision[0]
    assert {"torch", "diffusers", "prefect"} <= set(info["versions"])
    assert len(list((out / "stages" / "generate").glob("part-*.parquet"))) == 3  # 8 rows, 3 per shard

    # Other readers see the same table.
    assert duckdb.sql(f"select count(*), count(distinct image_sha256) from '{out / 'results.parquet'}'").fetchall() == [(8, 8)]


def test_rerun_does_nothing_and_loads_no_model(tmp_path: Path, catalog: Path):
    out = tmp_path / "out"
    run(catalog, out)
    before = results(out)
    parts = sorted(p.name for p in (out / "stages" / "generate").glob("*"))
    models.clear_cache()
    run(catalog, out)
    assert models.load_count() == 0
    assert sorted(p.name for p in (out / "stages" / "generate").glob("*")) == parts
    pd.testing.assert_frame_equal(before, results(out))
    info = json.loads((out / "run.json").read_text())
    assert [i["pending"]["generate"] for i in info["invocations"]] == [8, 0]


def test_a_changed_setting_recomputes_only_the_rows_it_affects(tmp_path: Path, catalog: Path):
    out = tmp_path / "out"
    run(catalog, out)
    before = results(out).set_index(["id", "variant"])
    run(catalog, out, overrides={"generate.guidance_scale": 9.0})
    after = results(out).set_index(["id", "variant"])
    changed = before.generate_image_sha256 != after.generate_image_sha256
    # row-2 sets its own guidance_scale, so the new default does not touch it.
    assert changed.to_dict() == {key: key[0] != "row-2" for key in before.index}
    assert before.loc[("row-2", 0), "generate_finished_at"] == after.loc[("row-2", 0), "generate_finished_at"]
    for path in before.image_path:  # nothing already produced was overwritten or lost
        assert (out / path).exists()
    assert set(after.generate_guidance_scale) == {9.0, 4.0}


def test_retry_failed_recomputes_failed_rows_only(tmp_path: Path, catalog: Path):
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    out = tmp_path / "out"
    # Make one image impossible to write: a folder already sits at its path.
    plan = prepare(catalog, load_config(None, {**FAST, "rows_per_shard": 3}), out)
    planned = plan.planned["generate"].to_pylist()[4]
    blocker = out / plan.store.image_path("generate", planned["id"], planned["variant"], planned["key"])
    blocker.mkdir(parents=True)

    summary = run(catalog, out)
    assert (summary["ok"], summary["failed"]) == (7, 1)
    first = results(out).set_index(["id", "variant"])
    failed = first[first.status == "failed"]
    assert list(failed.index) == [(planned["id"], planned["variant"])]
    assert "could not write image" in failed.error.iloc[0]

    blocker.rmdir()
    assert run(catalog, out)["failed"] == 1  # a plain re-run keeps the recorded failure
    assert run(catalog, out, retry_failed=True)["failed"] == 0
    second = results(out).set_index(["id", "variant"])
    assert (second.status == "ok").all()
    redone = first.generate_finished_at != second.generate_finished_at
    assert list(second.index[redone]) == [(planned["id"], planned["variant"])]


def test_new_rows_in_the_catalog_are_the_only_work(tmp_path: Path):
    # As a nightly catalog changes in place: the same file, with a row added.
    out = tmp_path / "out"
    path = tmp_path / "catalog.parquet"
    run(write_catalog(path, prompts(4)), out)
    first = results(out).set_index("id")
    grown = {k: v[:2] + ["brand new"] + v[2:] if k == "prompt" else v[:2] + ["new"] + v[2:] for k, v in prompts(4).items()}
    run(write_catalog(path, grown), out)
    second = results(out).set_index("id")
    assert list(second.index) == ["row-0", "row-1", "new", "row-2", "row-3"]
    for rid in first.index:
        assert first.loc[rid, "generate_finished_at"] == second.loc[rid, "generate_finished_at"]
        assert first.loc[rid, "image_sha256"] == second.loc[rid, "image_sha256"]
    assert second.loc["new", "status"] == "ok"


def test_a_second_run_on_the_same_folder_ends_cancelled_without_touching_it(tmp_path: Path, catalog: Path):
    out = tmp_path / "out"
    with held_in_another_process("from catalogen.storage.store import RunStore", f"RunStore({str(out)!r}).exclusive()"):
        state = catalogen_run(catalog=str(catalog), out=str(out), overrides=FAST, return_state=True)
        assert state.is_cancelled()  # an overlapping scheduled run: a clear state, no traceback
        assert re.search(r"in use by another run \(pid \d+.*; this run did nothing", state.message), state.message
        assert not (out / "results.parquet").exists() and not (out / "run.json").exists()
    assert run(catalog, out)["ok"] == 8  # free again once the holder is gone


def test_cli_exit_code_says_some_rows_failed(tmp_path: Path, catalog: Path):
    from typer.testing import CliRunner

    from catalogen.cli import app
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    out = tmp_path / "out"
    planned = prepare(catalog, load_config(None, FAST), out).planned["generate"].to_pylist()[0]
    (out / RunStore(out).image_path("generate", planned["id"], planned["variant"], planned["key"])).mkdir(parents=True)
    args = ["run", str(catalog), "--out", str(out), *(f"--set={k}={v}" for k, v in FAST.items())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "8 rows: 7 ok, 1 failed" in result.output and "--retry-failed" in result.output


def test_alike_rows_share_shards(tmp_path: Path):
    # Interleaved kinds of rows: sharded in catalog order, every shard would hold both kinds and
    # pad two short batches; sorted, each shard holds one kind.
    columns = prompts(8)
    columns["steps"] = [2, 3] * 4
    catalog = write_catalog(tmp_path / "mixed.parquet", columns)
    run(catalog, tmp_path / "out", overrides={"rows_per_shard": 4, "generate.batch_size": 4})
    parts = sorted((tmp_path / "out" / "stages" / "generate").glob("part-*.parquet"))
    assert [sorted(set(pq.read_table(p, columns=["steps"]).column(0).to_pylist())) for p in parts] in ([[2], [3]], [[3], [2]])
    assert results(tmp_path / "out").id.tolist() == columns["id"]  # results keep the catalog's order
