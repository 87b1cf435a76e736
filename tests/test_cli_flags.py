"""Every command-line option reaches the run, checked against what the run records.

The backbone once shipped a `--profile` the flow silently dropped: these tests run the real CLI
(in-process through typer's runner, which executes the same code as the installed command) and
read back run.json, results.parquet and the PNGs.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, held_in_another_process, prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.storage.hashing import sha256_file
from catalogen.media.pngmeta import parse_parameters, read_png_text

SMALL = ["--set", "generate.width=32", "--set", "generate.height=32", "--set", "generate.steps=2"]


def cli(*args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args])


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def test_every_shortcut_flag_reaches_the_run(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(5))
    config = tmp_path / "run.yaml"
    config.write_text("generate:\n  guidance_scale: 5.5\n  scheduler: DPM++ 2M Karras\n")
    out = tmp_path / "out"
    result = cli("run", catalog, "--out", out, "--config", config, "--profile", "tiny-sdxl", "--seed", 7,
                 "--rows-per-shard", 2, "--batch-size", 2, "--device", "cpu", "--offline", "--stages", "generate",
                 "--limit", 4, *SMALL)
    assert result.exit_code == 0, result.output
    info = run_json(out)
    cfg = info["config"]
    assert (cfg["profile"], cfg["seed"], cfg["rows_per_shard"], cfg["device"], cfg["offline"], cfg["stages"]) == (
        "tiny-sdxl", 7, 2, "cpu", True, ["generate"])
    assert cfg["generate"]["batch_size"] == 2 and cfg["generate"]["guidance_scale"] == 5.5
    assert cfg["generate"]["scheduler"] == "dpm++_2m_karras"  # an A1111 spelling, recorded canonically
    assert info["invocations"][-1]["limit"] == 4
    assert info["invocations"][-1]["settings_from"]["profile"] == "--profile tiny-sdxl"
    df = results(out)
    assert df.id.tolist() == [f"row-{i}" for i in range(4)]  # --limit 4
    assert set(df.generate_model) == {"tiny:sdxl"} and set(df.generate_batch_size) == {2}
    assert set(df.generate_scheduler) == {"dpm++_2m_karras"} and set(df.generate_guidance_scale) == {5.5}
    assert len(list((out / "stages" / "generate").glob("part-*.parquet"))) == 2  # 4 rows, 2 per shard
    from catalogen.storage.hashing import derive_seed

    assert df.generate_seed.tolist() == [derive_seed(7, f"row-{i}", 0) for i in range(4)]
    parsed = parse_parameters(read_png_text(str(out / df.image_path[0]))["parameters"])
    assert (parsed["model"], parsed["scheduler"], parsed["guidance_scale"]) == ("tiny:sdxl", "dpm++_2m_karras", 5.5)


def test_set_profile_reaches_the_run_too(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(2))
    out = tmp_path / "out"
    assert cli("run", catalog, "--out", out, "--set", "profile=tiny-sdxl", *SMALL).exit_code == 0
    assert run_json(out)["config"]["profile"] == "tiny-sdxl"
    assert set(results(out).generate_model) == {"tiny:sdxl"}


def test_sample_picks_the_same_rows_every_time(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(12))
    picked = []
    for name in ("a", "b"):
        result = cli("run", catalog, "--out", tmp_path / name, "--sample", 3, *SMALL)
        assert result.exit_code == 0, result.output
        picked.append(results(tmp_path / name).id.tolist())
    assert picked[0] == picked[1] and len(picked[0]) == 3
    assert picked[0] == sorted(picked[0], key=lambda i: int(i.split("-")[1]))  # catalog order kept
    assert picked[0] != [f"row-{i}" for i in range(3)]  # not simply the first rows


def test_a_different_catalog_into_a_folder_is_refused_unless_asked(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_catalog(tmp_path / "a" / "products.parquet", prompts(3))
    second = write_catalog(tmp_path / "b" / "products.parquet", prompts(1, prefix="other"))
    out = tmp_path / "out"
    assert cli("run", first, "--out", out, *SMALL).exit_code == 0
    before = results(out)
    refused = cli("run", second, "--out", out, *SMALL)
    assert refused.exit_code == 1 and "was made from" in refused.output and "--new-catalog" in refused.output
    pd.testing.assert_frame_equal(results(out), before)  # nothing replaced
    accepted = cli("run", second, "--out", out, "--new-catalog", *SMALL)
    assert accepted.exit_code == 0, accepted.output
    assert results(out).id.tolist() == ["other-0"]


def test_default_folders_of_same_named_catalogs_differ(tmp_path: Path):
    from catalogen.config import load_config
    from catalogen.run.plan import default_out

    cfg = load_config()
    a, b = default_out(tmp_path / "a" / "products.parquet", cfg), default_out(tmp_path / "b" / "products.parquet", cfg)
    assert a != b and a.name.startswith("products-") and a.name.endswith("-tiny")
    # What both READMEs say the name is, and absolute (the working directory's outputs/).
    assert a.parent == Path.cwd() / "outputs" and re.fullmatch(r"products-[0-9a-f]{8}-tiny", a.name)
    for readme in (REPO / "README.md", REPO / "outputs" / "README.md"):
        assert "`outputs/<catalog name>-<hash of its path>-<profile>" in readme.read_text(), readme


def test_retry_failed_flag_redoes_a_failed_row(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(3))
    out = tmp_path / "out"
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    plan = prepare(catalog, load_config(None, {"generate.width": 32, "generate.height": 32, "generate.steps": 2}), out)
    row = plan.planned["generate"].to_pylist()[1]
    blocker = out / plan.store.image_path("generate", row["id"], row["variant"], row["key"])
    blocker.mkdir(parents=True)
    first = cli("run", catalog, "--out", out, *SMALL)
    assert first.exit_code == 3 and "3 rows: 2 ok, 1 failed" in first.output
    blocker.rmdir()
    again = cli("run", catalog, "--out", out, *SMALL)
    assert again.exit_code == 3  # a plain re-run keeps the failure
    retried = cli("run", catalog, "--out", out, "--retry-failed", *SMALL)
    assert retried.exit_code == 0 and "3 rows: 3 ok" in retried.output
    assert run_json(out)["invocations"][-1]["retry_failed"] is True


def test_colliding_ids_each_own_their_file(tmp_path: Path):
    # Same prompt, seed and settings: only the ids differ, and they sanitise alike or by case.
    ids = ["a/b", "a_b", "a b", "a.b", "A_B", "é", "ü", "x" * 70 + "1", "x" * 70 + "2", "0012"]
    catalog = write_catalog(tmp_path / "c.parquet", {"id": ids, "prompt": ["a red door"] * 10, "seed": [5] * 10})
    out = tmp_path / "out"
    result = cli("run", catalog, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    df = results(out)
    assert (df.status == "ok").all() and df.image_path.nunique() == 10
    assert len({p.rsplit("/", 1)[1].lower() for p in df.image_path}) == 10  # names too, whatever the folder
    for row in df.itertuples():
        assert sha256_file(out / row.image_path) == row.image_sha256
        assert json.loads(read_png_text(str(out / row.image_path))["catalogen"])["id"] == row.id
    assert len(list((out / "images").rglob("*.png"))) == 10


@pytest.mark.parametrize("writer", ["pyarrow", "pandas"])
def test_nan_overrides_mean_the_runs_setting(tmp_path: Path, writer: str):
    # A missing number as NaN (pyarrow and polars keep NaN in the file; pandas writes it as null):
    # either way it means "use the run's setting".
    nan = float("nan")
    columns = {
        "id": ["a", "b"], "prompt": ["a red door", "a blue boat"],
        "guidance_scale": [nan, 4.0], "seed": [nan, 9.0], "num_variants": [nan, 2.0],
        "steps": [nan, 3.0], "width": [nan, 32.0], "height": [nan, 32.0],
    }
    catalog = tmp_path / "nan.parquet"
    if writer == "pandas":
        pd.DataFrame(columns).to_parquet(catalog)
    else:
        pq.write_table(pa.table({k: pa.array(v) for k, v in columns.items()}), catalog)
        assert pq.read_table(catalog).column("guidance_scale").null_count == 0  # really NaN in the file
    assert cli("validate", catalog, *SMALL).exit_code == 0
    out = tmp_path / "out"
    result = cli("run", catalog, "--out", out, *SMALL, "--set", "generate.guidance_scale=6.5")
    assert result.exit_code == 0, result.output
    df = results(out).set_index(["id", "variant"])
    a = df.loc[("a", 0)]
    assert (a.generate_guidance_scale, a.generate_steps, a.generate_width, a.generate_height) == (6.5, 2, 32, 32)
    from catalogen.storage.hashing import derive_seed

    assert a.generate_seed == derive_seed(0, "a", 0)
    assert list(df.loc["b"].generate_seed) == [9, 10] and df.loc[("b", 0)].generate_guidance_scale == 4.0


def test_csv_catalogs_keep_text_as_written(tmp_path: Path):
    text = (
        "id,prompt,sku,ean,scheduler,negative_prompt,steps\n"
        "0012,a red door,00123,0012345678905,nan,NaN,\n"  # how astype(str) and some exports write a missing value
        "001,a blue boat,00124,0012345678912,Euler a,,3\n"
        "1,a green field,00125,,,blurry,\n"
    )
    plain = tmp_path / "c.csv"
    plain.write_text(text)
    packed = tmp_path / "c.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for catalog in (plain, packed):
        out = tmp_path / f"out-{catalog.name}"
        result = cli("run", catalog, "--out", out, *SMALL, "--set", "generate.negative_prompt=text, watermark")
        assert result.exit_code == 0, result.output
        df = results(out)
        assert df.id.tolist() == ["0012", "001", "1"]  # no type guessing: three distinct ids
        assert df.sku.tolist() == ["00123", "00124", "00125"] and df.ean.tolist()[:2] == ["0012345678905", "0012345678912"]
        assert df.generate_scheduler.tolist() == ["euler", "euler_a", "euler"]  # blank or NaN: the run's setting
        assert df.generate_negative_prompt.tolist() == ["text, watermark", "text, watermark", "blurry"]
        assert df.generate_steps.tolist() == [2, 3, 2]


def test_run_settings_are_checked_like_catalog_columns(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(2))
    for value, words in (("65", "multiple of 8"), ("8", "between 16 and 512"), ("1024", "between 16 and 512")):
        for command in ("validate", "run"):
            extra = ["--out", tmp_path / "o"] if command == "run" else []
            result = cli(command, catalog, *extra, "--set", f"generate.width={value}")
            assert result.exit_code == 1, result.output
            assert "generate.width" in result.output and words in result.output
            assert f"--set generate.width={value}" in result.output  # says where the value came from
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "generate.steps=[unclosed"], ["generate.steps", "not valid YAML"]),
        (["--set", "generate.steps=!!python/object/apply:os.system [echo hi]"], ["not valid YAML"]),
        (["--set", "generate.stepz=3"], ["unknown setting", "did you mean 'generate.steps'", "--set generate.stepz=3"]),
        (["--config", "missing.yaml"], ["config file not found: missing.yaml"]),
        (["--set", "stages=[generate, paint]"], ["unknown stage", "paint"]),
    ],
)
def test_configuration_errors_are_one_clear_line(tmp_path: Path, args, words):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(1))
    result = cli("run", catalog, "--out", tmp_path / "o", *args)
    assert result.exit_code == 1, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_cache_dir_must_be_a_usable_folder_and_expands_home(tmp_path: Path, monkeypatch):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(1))
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    result = cli("validate", catalog, "--set", f"cache_dir={a_file}")
    assert result.exit_code == 1 and "cache_dir" in result.output and "Traceback" not in result.output
    result = cli("validate", catalog, "--set", f"cache_dir={a_file}/models")
    assert result.exit_code == 1 and f"({a_file} is a file)" in result.output
    # validate writes nothing: a CATALOGEN_HOME that does not exist yet is checked, not made
    home = tmp_path / "home" / "catalogen"
    monkeypatch.setenv("CATALOGEN_HOME", str(home))
    result = cli("validate", catalog)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "home").exists()
    from catalogen.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, {"cache_dir": "~/models"}).resolved_cache_dir() == tmp_path / "models"


def test_reserved_and_internal_names(tmp_path: Path):
    # `row_seed`, `index` and `key` were internal once: now they are ordinary catalog columns.
    columns = {**prompts(2), "row_seed": [1, 2], "index": ["x", "y"], "key": ["k1", "k2"]}
    catalog = write_catalog(tmp_path / "c.parquet", columns)
    out = tmp_path / "out"
    result = cli("run", catalog, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    df = results(out)
    assert df.row_seed.tolist() == [1, 2] and df["index"].tolist() == ["x", "y"] and df["key"].tolist() == ["k1", "k2"]
    clash = write_catalog(tmp_path / "clash.parquet", {**prompts(1), "generate_status": ["x"]})
    refused = cli("validate", clash)
    assert refused.exit_code == 1 and "'generate_status'" in refused.output


def test_results_join_back_to_the_catalog_on_its_own_id_type(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", {"id": [10, 11, 12], "prompt": ["a", "b", "c"], "price": [1.0, 2.0, 3.0]})
    out = tmp_path / "out"
    assert cli("run", catalog, "--out", out, *SMALL).exit_code == 0
    df = results(out)
    assert df.id.dtype == pd.read_parquet(catalog).id.dtype
    joined = pd.read_parquet(catalog).merge(df[["id", "image_path"]], on="id")
    assert len(joined) == 3 and joined.image_path.notna().all()


def test_version_and_exit_codes_in_help():
    import catalogen

    assert cli("--version").output.strip() == f"catalogen {catalogen.__version__}"
    text = cli("run", "--help").output
    assert "Exit codes" in text and "3 the run finished but some rows failed" in " ".join(text.split())


def test_a_busy_folder_is_refused_in_one_line_before_prefect_starts(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(1))
    out = tmp_path / "out"
    with held_in_another_process("from catalogen.storage.store import RunStore", f"RunStore({str(out)!r}).exclusive()"):
        result = cli("run", catalog, "--out", out, *SMALL)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use by another run (pid" in lines[0]
    assert "Flow run" not in result.output and not (out / "run.json").exists()


def test_every_folder_and_file_printed_is_absolute_from_a_relative_out(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_catalog(tmp_path / "c.parquet", prompts(2))
    out = tmp_path / "rel" / "out"
    result = cli("run", "c.parquet", "--out", "rel/out", *SMALL)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-2:] == [f"results: {out / 'results.parquet'}", f"report: {out / 'report.html'}"]
    assert cli("report", "rel/out").output == f"{out / 'report.html'}\n"
    title = f"{out} (2 rows, catalog {tmp_path / 'c.parquet'})"  # the table may wrap it anywhere
    assert "".join(title.split()) in "".join(cli("status", "rel/out").output.split())

    stray = out / "images" / "generate" / "stray.png"
    stray.write_bytes(b"no row points at it")
    assert cli("clean", "rel/out").output.splitlines()[0] == str(stray)
    (out / pd.read_parquet(out / "results.parquet").image_path[0]).unlink()
    verified = cli("verify", "rel/out")
    assert verified.exit_code == 3
    assert f"redo them with: catalogen run {tmp_path / 'c.parquet'} --out {out} --retry-failed" in verified.output
    assert cli("run", "c.parquet", "--out", "rel/out", "--retry-failed").exit_code == 0
    exported = cli("export", "rel/out", "--format", "imagefolder", "--out", "exp")
    assert exported.output.splitlines()[-1] == f"manifest: {tmp_path / 'exp' / 'manifest.json'}", exported.output

    # A deployment's parameters name the same folder relative to where the worker starts the flow:
    # its log lines name it as the CLI does.
    from flows.run import catalogen_run

    with caplog.at_level(logging.INFO, logger="catalogen"):
        catalogen_run(catalog="c.parquet", out="rel/out", return_state=True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("catalogen")]
    assert any(line.startswith(f"plan for {out}: generate 0 of 2 rows pending") for line in lines), lines
    assert f"report: {out / 'report.html'}" in lines


def test_a_local_lock_holder_is_printed_escaped_and_unlock_leaves_a_live_lock_alone(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(1))
    out = tmp_path / "out"
    with held_in_another_process("from catalogen.storage.store import RunStore", f"RunStore({str(out)!r}).exclusive()"):
        (out / ".lock").write_bytes(b"pid 7 \x1b]0;owned\x07\x1b[2K" + b"x" * 10**6)  # written by a hostile user
        result = cli("run", catalog, "--out", out, *SMALL)
        assert result.exit_code == 1 and "\x1b" not in result.output
        assert "in use by another run (pid 7 \\x1b]0;owned\\x07\\x1b[2K" in result.output
        assert len(result.output) < 400  # the holder's first 200 bytes
        unlock = cli("unlock", out)
        assert unlock.exit_code == 1 and "is held by a running process (pid 7 \\x1b]0;owned" in unlock.output
        assert (out / ".lock").exists()
    assert cli("unlock", out).output.strip() == f"no run holds {out}; nothing to unlock"
