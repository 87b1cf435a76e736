"""The command line as users run it: subprocesses against a real `prefect server start`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, REPO, cli_env, prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.storage.store import RunStore

FAST_ARGS = ["--set", "generate.width=32", "--set", "generate.height=32"]


def catalogen(*args: str, api_url: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "catalogen"), *args], env=cli_env(api_url), cwd=REPO, capture_output=True, text=True,
        timeout=300, **kwargs,
    )


def api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def parts(out: Path) -> list[Path]:
    return sorted((out / "stages" / "generate").glob("part-*.parquet"))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(prefect_server: str, tmp_path: Path):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(16))
    args = ["run", str(catalog), "--rows-per-shard", "2", "--set", "generate.steps=8"]

    whole = catalogen(*args, "--out", str(tmp_path / "whole"), api_url=prefect_server)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(BIN / "catalogen"), *args, "--out", str(out)], env=cli_env(prefect_server), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not parts(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: CLI, flow, tasks, at once
    proc.wait()
    done_before = len(parts(out))
    assert 1 <= done_before < 8, "the kill must land mid-run"
    assert not (out / "results.parquet").exists()

    again = catalogen(*args, "--out", str(out), api_url=prefect_server)
    assert again.returncode == 0, again.stderr

    columns = ["id", "variant", "status", "image_path", "image_sha256", "generate_seed", "generate_key"]
    expected = pd.read_parquet(tmp_path / "whole" / "results.parquet", columns=columns)
    got = pd.read_parquet(out / "results.parquet", columns=columns)
    pd.testing.assert_frame_equal(expected, got)
    assert not got.duplicated(["id", "variant"]).any()
    # The finished shards were kept, and only the missing rows were generated again.
    assert sum(pq.read_metadata(p).num_rows for p in parts(out)) == 16
    info = json.loads((out / "run.json").read_text())
    assert info["invocations"][-1]["pending"]["generate"] == 16 - 2 * done_before
    assert not (out / "work").exists() and not list((out / "stages").rglob(".*.tmp"))  # no leftovers


@pytest.mark.slow
def test_demo_run_against_a_prefect_server(prefect_server: str, tmp_path: Path):
    out = tmp_path / "demo"
    result = subprocess.run(  # no terminal, as under a worker or CI: lines instead of a progress bar
        [str(BIN / "catalogen"), "run", "catalogs/demo_prompts.parquet", "--out", str(out), "--set", "generate.steps=2",
         "--rows-per-shard", "10", *FAST_ARGS], env={**cli_env(prefect_server), "PREFECT_LOGGING_LEVEL": "INFO"},
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "25 rows: 25 ok, 0 failed, 0 skipped" in result.stdout
    assert result.stdout.splitlines()[-1] == f"report: {out / 'report.html'}"  # the last line names the report
    assert f"plan for {out}: generate 25 of 25 rows pending" in result.stderr
    progress = [line.split(" - ", 1)[1] for line in result.stderr.splitlines() if "catalogen.flow - progress:" in line]
    assert len(progress) >= 3 and progress[-1] == "progress: generate 25/25 rows; 0 shard(s) in flight", progress
    assert "━" not in result.stderr, [line for line in result.stderr.splitlines() if "━" in line]
    runs = api(prefect_server, "flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert any(r["parameters"].get("out") == str(out) for r in runs)
    tasks = api(prefect_server, "task_runs/filter", {})
    assert any(t["name"].startswith("generate-") for t in tasks)
    df = pd.read_parquet(out / "results.parquet")
    assert df.source.eq("demo").all() and len(df) == 25


@pytest.mark.slow
def test_prefect_yaml_deploys_with_its_schedule(prefect_server: str):
    env = cli_env(prefect_server)
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "catalogen", "--type", "process"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    deployments = api(prefect_server, "deployments/filter", {})
    found = next(d for d in deployments if d["name"] == spec["name"])
    assert found["parameters"] == spec["parameters"]
    assert found["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert found["entrypoint"] == "flows/run.py:catalogen_run"


def test_offline_run_with_missing_models_fails_fast(tmp_path: Path):
    result = CliRunner().invoke(app, ["run", "catalogs/demo_prompts.parquet", "--profile", "sd15", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.output and "offline" in result.output
    assert not (tmp_path / "o").exists()


def test_a_device_that_is_not_there_is_refused_up_front(tmp_path: Path):
    result = CliRunner().invoke(app, ["run", "catalogs/demo_prompts.parquet", "--device", "cuda:99", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "CUDA is not available" in result.output or "GPU(s) visible" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_run_with_failed_rows_ends_failed_in_prefect(prefect_server: str, tmp_path: Path):
    from catalogen.config import load_config
    from catalogen.run.plan import prepare

    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(3))
    out = tmp_path / "out"
    settings = {"generate.width": 32, "generate.height": 32, "generate.steps": 2}
    row = prepare(catalog, load_config(None, settings), out).planned["generate"].to_pylist()[2]
    (out / RunStore(out).image_path("generate", row["id"], row["variant"], row["key"])).mkdir(parents=True)
    result = catalogen("run", str(catalog), "--out", str(out), "--set", "generate.steps=2", *FAST_ARGS, api_url=prefect_server)
    assert result.returncode == 3, result.stderr
    assert "3 rows: 2 ok, 1 failed" in result.stdout
    runs = api(prefect_server, "flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
    mine = [r for r in runs if r["parameters"].get("out") == str(out)]
    assert len(mine) == 1 and "1 of 3 rows failed" in mine[0]["state"]["message"]
    artifacts = api(prefect_server, "artifacts/filter", {})
    report = next(a for a in artifacts if a["flow_run_id"] == mine[0]["id"] and a["type"] == "markdown"
                  and not a["key"].endswith("-report"))
    assert report["key"].startswith("catalogen-out-") and "First failed rows" in report["data"]
    assert row["id"] in report["data"] and "tiny:sd15" in report["data"]
