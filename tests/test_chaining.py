"""Stages that chain: enhance -> generate (and generate -> remove_bg) through the real flow.

Keys chain (a change upstream recomputes that row downstream and nothing else), a failed row is
skipped downstream with its reason, each model loads once per process for the whole run, the
LLM's answers are cached across run folders, and a server's key never reaches an output.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN, FAST, REPO, cli_env, write_catalog

from catalogen.models import loading as models
from catalogen.media.pngmeta import read_png_text
from flows.run import catalogen_run, run_summary

PRODUCTS = {
    "id": ["MUG-1", "TEA-2", "BAG-3", "LMP-4"],
    "title": ["Stoneware Mug", "Cast Iron Teapot", "Canvas Tote", "Brass Lamp"],
    "color": ["sand", "black", "olive", None],
    "material": ["stoneware", "cast iron", None, "brass"],
}
CHAIN = {**FAST, "stages": ["enhance", "generate"], "template.preset": "product-photo", "rows_per_shard": 2,
         "enhance.max_new_tokens": 16}


@pytest.fixture(autouse=True)
def own_answer_cache(tmp_path: Path, monkeypatch):
    """Each test starts with an empty LLM answer cache (it is shared by every run on a machine)."""
    monkeypatch.setitem(CHAIN, "enhance.answer_cache", str(tmp_path / "answers.sqlite"))


def run(catalog: Path, out: Path, overrides: dict, **kwargs) -> dict:
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True, **kwargs)
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        raise summary
    return summary


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id")


def test_a_template_input_change_recomputes_that_row_in_both_stages_only(tmp_path: Path):
    catalog = tmp_path / "products.parquet"
    write_catalog(catalog, PRODUCTS)
    out = tmp_path / "out"
    summary = run(catalog, out, CHAIN)
    assert summary["stages"] == {"enhance": {"fallback": 4}, "generate": {"ok": 4}}  # the tiny LLM's noise
    before = results(out)
    # The enhanced prompt (here: the template's, as the noise fell back) is what generate used.
    assert (before.generate_prompt == before.enhance_prompt).all()
    assert (before.enhance_source_prompt.str.contains("Stoneware Mug")).sum() == 1
    assert before.enhance_error.str.contains("unparsable|empty", regex=True).all()

    changed = {**PRODUCTS, "color": ["sand", "red", "olive", None]}  # one row's template input
    write_catalog(catalog, changed)
    run(catalog, out, CHAIN)
    after = results(out)
    for stage in ("enhance", "generate"):
        redone = before[f"{stage}_finished_at"] != after[f"{stage}_finished_at"]
        assert list(redone[redone].index) == ["TEA-2"], stage
    assert "red" in after.loc["TEA-2", "generate_prompt"] and "black" not in after.loc["TEA-2", "generate_prompt"]
    assert after.loc["TEA-2", "generate_key"] != before.loc["TEA-2", "generate_key"]
    # The PNG carries the prompt before and after enhancement.
    chunk = json.loads(read_png_text(str(out / after.loc["TEA-2", "image_path"]))["catalogen"])
    assert chunk["source_prompt"] == after.loc["TEA-2", "enhance_source_prompt"]
    assert chunk["prompt"] == after.loc["TEA-2", "enhance_prompt"]


def test_each_model_loads_once_per_process_for_the_whole_run(tmp_path: Path):
    catalog = write_catalog(tmp_path / "products.parquet", PRODUCTS)
    models.clear_cache()
    run(catalog, tmp_path / "out", {**CHAIN, "rows_per_shard": 1})  # 4 shards through 2 stages
    loads = [(e["what"], e["repo"]) for e in models.load_events() if e["event"] == "load"]
    assert sorted(loads) == sorted([("llm", "tiny:llm"), ("pipeline", "tiny:sd15"), ("safety", "tiny:sd15")])


def test_answers_are_cached_across_run_folders(tmp_path: Path):
    catalog = write_catalog(tmp_path / "products.parquet", PRODUCTS)
    run(catalog, tmp_path / "first", CHAIN)
    models.clear_cache()
    run(catalog, tmp_path / "second", CHAIN)  # another folder: nothing done there yet
    second = results(tmp_path / "second")
    assert second.enhance_cached.all()
    assert not [e for e in models.load_events() if e["what"] == "llm"]  # the LLM was not even loaded
    first = results(tmp_path / "first")
    assert (first.enhance_raw_answer == second.enhance_raw_answer).all()


def test_a_failed_row_is_skipped_downstream_with_its_reason(tmp_path: Path):
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    photos = {"id": ["a", "b", "c"], "prompt": ["a red mug", "a blue vase", "a green lamp"]}
    catalog = write_catalog(tmp_path / "c.parquet", photos)
    out = tmp_path / "out"
    settings = {**FAST, "stages": ["generate", "remove_bg"], "remove_bg.min_coverage": 0.0,
                "remove_bg.max_coverage": 1.0}
    plan = prepare(catalog, load_config(None, settings), out)
    row = plan.planned["generate"].to_pylist()[1]
    blocker = out / plan.store.image_path("generate", row["id"], row["variant"], row["key"])
    blocker.mkdir(parents=True)  # generate cannot write row b's image
    summary = run(catalog, out, settings)
    df = results(out)
    assert df.loc["b", "generate_status"] == "failed" and df.loc["b", "remove_bg_status"] == "skipped"
    assert df.loc["b", "remove_bg_error"].startswith("generate failed: could not write image")
    assert df.loc["b", "status"] == "failed" and df.loc["b", "error"].startswith("generate: ")
    assert summary["stages"]["remove_bg"]["skipped"] == 1
    blocker.rmdir()
    run(catalog, out, settings, retry_failed=True)  # the retry runs b through both stages
    after = results(out)
    assert after.loc["b", "generate_status"] == "ok" and after.loc["b", "remove_bg_status"] in ("ok", "failed")
    assert after.loc["b", "remove_bg_status"] != "skipped"
    assert (after.loc[["a", "c"], "remove_bg_finished_at"] == df.loc[["a", "c"], "remove_bg_finished_at"]).all()


def test_the_openai_backend_through_the_flow_keeps_the_key_secret(tmp_path: Path, monkeypatch, caplog):
    from llm_servers import LLMServer

    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("CATALOGEN_TEST_KEY", secret)
    server = LLMServer().start()
    try:
        catalog = write_catalog(tmp_path / "products.parquet", PRODUCTS)
        out = tmp_path / "out"
        settings = {**CHAIN, "enhance.backend": "openai", "enhance.model": "normal", "enhance.base_url": server.url,
                    "enhance.api_key_env": "CATALOGEN_TEST_KEY", "enhance.timeout_s": 5, "enhance.retry_wait_max_s": 0.02}
        with caplog.at_level(logging.DEBUG):
            summary = run(catalog, out, settings)
        assert summary["stages"]["enhance"] == {"ok": 4} and summary["ok"] == 4
        assert set(server.state.authorization) == {f"Bearer {secret}"}
    finally:
        server.stop()
    df = results(out)
    assert (df.enhance_backend == "openai").all() and (df.enhance_device == "remote").all()
    assert df.generate_prompt.str.startswith("Positive").sum() == 0 and (df.generate_prompt == df.enhance_prompt).all()
    # The key appears in no file the run wrote, and in no log line.
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text


@pytest.mark.slow
def test_sigkill_of_a_two_stage_run_then_rerun_equals_an_uninterrupted_run(prefect_server: str, tmp_path: Path):
    catalog = write_catalog(tmp_path / "products.parquet", {
        "id": [f"P-{i}" for i in range(12)], "title": [f"product {i}" for i in range(12)],
        "color": ["red", "blue", "green"] * 4, "material": ["oak"] * 12,
    })
    args = ["run", str(catalog), "--rows-per-shard", "2", "--stages", "enhance,generate",
            "--set", "template.preset=product-photo", "--set", "generate.steps=4", "--set", "generate.width=32",
            "--set", "generate.height=32", "--set", "enhance.max_new_tokens=16"]
    env = cli_env(prefect_server)
    whole = subprocess.run([str(BIN / "catalogen"), *args, "--out", str(tmp_path / "whole")], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "catalogen"), *args, "--out", str(out)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    generate_parts = out / "stages" / "generate"
    deadline = time.monotonic() + 240
    while not (generate_parts.is_dir() and list(generate_parts.glob("part-*.parquet"))) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(generate_parts.glob("part-*.parquet")))
    assert 1 <= done < 6, "the kill must land mid-run"

    again = subprocess.run([str(BIN / "catalogen"), *args, "--out", str(out)], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    columns = ["variant", "status", "image_sha256", "enhance_key", "enhance_prompt", "generate_key", "generate_seed"]
    expected = pd.read_parquet(tmp_path / "whole" / "results.parquet").set_index("id")[columns]
    got = pd.read_parquet(out / "results.parquet").set_index("id")[columns]
    pd.testing.assert_frame_equal(expected, got)
    for stage in ("enhance", "generate"):
        rows = pa.concat_tables([pq.read_table(p, columns=["id", "variant"]) for p in (out / "stages" / stage).glob("part-*.parquet")])
        assert rows.num_rows == 12 and len(set(zip(*(rows.column(c).to_pylist() for c in ("id", "variant"))))) == 12


def test_the_enhance_key_holds_the_system_prompts_text(tmp_path: Path):
    from catalogen.config import load_config
    from catalogen.run.plan import prepare
    from tasks.llm import DEFAULT_SYSTEM_PROMPT_FILE

    catalog = write_catalog(tmp_path / "products.parquet", PRODUCTS)
    same = tmp_path / "same.txt"
    same.write_text(DEFAULT_SYSTEM_PROMPT_FILE.read_text())
    other = tmp_path / "other.txt"
    other.write_text("Answer with a Positive Prompt: line and a Negative Prompt: line, in French.")

    def keys(**settings) -> dict[str, list[str]]:
        plan = prepare(catalog, load_config(None, {**CHAIN, **settings}), tmp_path / "out")
        return {stage: plan.planned[stage].column("key").to_pylist() for stage in ("enhance", "generate")}

    default = keys()
    assert keys(**{"enhance.system_prompt_file": str(same)}) == default  # the text counts, not the file's path
    changed = keys(**{"enhance.system_prompt_file": str(other)})
    for stage in ("enhance", "generate"):  # every row, in enhance and (chained) in generate
        assert all(a != b for a, b in zip(default[stage], changed[stage])), stage
