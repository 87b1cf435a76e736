"""The dask runner, through the CLI, on real clusters of worker processes: the same bytes as the
threads runner, each model loaded once per worker, and a worker killed mid-run costs only its shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, REPO, cli_env

from flows.runners import local_cpu_cluster

pytestmark = pytest.mark.slow

# The demo dataset configuration (generate -> caption), kept small: 6 rows, a shard per row.
DEMO = ["catalogs/demo_prompts.parquet", "--config", "configs/dataset.yaml", "--limit", "6", "--rows-per-shard", "1",
        "--set", "generate.width=32", "--set", "generate.height=32", "--set", "generate.steps=2"]
MODELS = {"tiny:sd15 (pipeline)", "tiny:blip2 (blip2)"}


def start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "catalogen"), "run", *DEMO, "--out", str(out), *args],
                            env={**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    assert "6 rows: 6 ok" in stdout
    return stderr


def made(out: Path) -> pd.DataFrame:
    """What a run made, row by row: every hash, key and caption."""
    df = pd.read_parquet(out / "results.parquet")
    columns = sorted(c for c in df.columns if c.endswith(("sha256", "_key")) or c == "caption_caption")
    return df[["id", "variant", "status", *columns]].sort_values(["id", "variant"]).reset_index(drop=True)


def workers(out: Path) -> dict[str, dict]:
    return json.loads((out / "run.json").read_text())["invocations"][-1]["workers"]


@pytest.fixture
def environ_kept() -> Iterator[None]:
    """A nanny sets its workers' variables (OMP_NUM_THREADS, PYTHONHASHSEED …) in this process too: undone."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


SHARD_LINE = re.compile(r"\| catalogen\.runner - (\w+ shard \w+: \d+ rows on \S+) in [\d.]+ s "
                        r"\(waited [\d.]+ s for the device\): (.+)$")


def shard_lines(stderr: str) -> list[str]:
    """Each shard's summary line as the run printed it, without its timings; sorted."""
    return sorted(": ".join(m.groups()) for m in map(SHARD_LINE.search, stderr.splitlines()) if m)


def loads(stderr: str) -> set[str]:
    return {line.split(" - ", 1)[1] for line in stderr.splitlines() if "| catalogen.models - loading " in line}


@pytest.fixture(scope="module")
def threads_run(tmp_path_factory) -> tuple[pd.DataFrame, str]:
    out = tmp_path_factory.mktemp("threads") / "out"
    stderr = finish(start(out, "--runner", "threads"))
    return made(out), stderr


@pytest.fixture(scope="module")
def threads(threads_run) -> pd.DataFrame:
    return threads_run[0]


@pytest.mark.timeout(480)
def test_a_local_cluster_makes_the_same_bytes_and_keeps_models_resident_per_worker(tmp_path: Path, threads_run):
    threads, threads_stderr = threads_run
    out = tmp_path / "out"
    stderr = finish(start(out, "--runner", "dask", "--dask-workers", "2"))
    pd.testing.assert_frame_equal(made(out), threads)
    # A quiet console: catalogen's lines, each shard's summary as the threads runner prints it (relayed
    # from the worker's result), distributed's lines only from WARNING, and workers that end by themselves.
    assert not [line for line in stderr.splitlines() if "distributed." in line], stderr
    assert "still alive" not in stderr and "killing" not in stderr, stderr
    assert len(shard_lines(stderr)) == 12 and shard_lines(stderr) == shard_lines(threads_stderr), stderr
    assert loads(stderr) == loads(threads_stderr) >= {f"loading {model} on cpu" for model in MODELS}
    assert len(threads) == 6 and threads.image_sha256.notna().all() and threads.caption_caption.notna().all()

    ran = workers(out)
    assert len(ran) == 2 and sum(w["shards"] for w in ran.values()) == 12  # 6 shards through 2 stages
    for worker, info in ran.items():
        assert int(worker.rsplit(":", 1)[1]) != os.getpid()
        assert set(info["loads"].values()) == {1}, ran  # each model once, however many shards
    assert MODELS <= {model for info in ran.values() for model in info["loads"]}
    assert json.loads((out / "run.json").read_text())["config"]["runner"] == "dask"


@pytest.mark.timeout(480)
def test_a_worker_killed_mid_run_costs_only_its_shards(tmp_path: Path, threads, environ_kept):
    from distributed import Client

    out = tmp_path / "out"
    # Workers that declare a GPU: device-bound shards ask for one, and still run on the CPU here.
    with local_cpu_cluster(2, resources={"GPU": 1}) as cluster, Client(cluster) as client:
        proc = start(out, "--runner", "dask", "--dask-address", cluster.scheduler_address)
        deadline = time.monotonic() + 180
        while not list(out.glob("stages/*/part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = [address for address, keys in client.processing().items() if keys]
        assert busy and proc.poll() is None, "the run ended before a worker could be killed"
        pids = client.run(os.getpid)
        os.kill(pids[busy[0]], signal.SIGKILL)
        stderr = finish(proc)

    assert "GPU resources declared" in stderr
    pd.testing.assert_frame_equal(made(out), threads)  # every row once, every hash and key as threads made them
    for stage in ("generate", "caption"):
        assert len(list((out / "stages" / stage).glob("part-*.parquet"))) == 6


@pytest.mark.timeout(480)
def test_ctrl_c_stops_a_dask_run_and_keeps_what_is_done(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "catalogen"), "run", *DEMO, "--out", str(out), "--runner", "dask",
                             "--set", "generate.steps=20", "--set", "stop_grace_s=1"], env=cli_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("stages/generate/part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the workers of its local cluster are in the group too
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr[-4000:]
    assert "Traceback" not in stderr
    results = pd.read_parquet(out / "results.parquet")
    parts = list((out / "stages" / "generate").glob("part-*.parquet"))
    assert set(results.status) <= {"ok", "pending"} and "pending" in set(results.status)
    # A cancelled task may still finish its part before its worker is stopped; the next run takes it,
    # and the stop line, counted once the workers are gone, says so.
    assert 1 <= (results.generate_status == "ok").sum() <= len(parts) and (results.generate_status == "ok").sum() < 6
    kept = {stage: {i for part in (out / "stages" / stage).glob("part-*.parquet")
                    for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()}
            for stage in ("generate", "caption")}
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert stopped == [f"stopped: {len(kept['generate'] & kept['caption'])} of 6 rows finished; generate kept "
                       f"{len(kept['generate'])}, caption {len(kept['caption'])}; run the same command to continue"]
    assert not [line for line in stderr.splitlines() if "ERROR" in line or "Failed" in line], stderr


@pytest.mark.timeout(400)
def test_the_product_path_makes_the_same_bytes_on_a_local_cluster(tmp_path: Path):
    """The photos demo (remove_bg -> style -> upscale -> renditions) on 2 worker processes: every
    image and rendition the same bytes as with threads. With the dataset demo above this covers
    every stage of the products demo."""
    args = ["catalogs/demo_photos.parquet", "--config", "configs/photos.yaml", "--limit", "2",
            "--set", "style.steps=2", "--set", "upscale.steps=2"]

    def run(out: Path, *runner: str) -> pd.DataFrame:
        result = subprocess.run([str(BIN / "catalogen"), "run", *args, "--out", str(out), *runner], env=cli_env(),
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return made(out)

    threads = run(tmp_path / "threads", "--runner", "threads")
    assert len(threads) == 2 and threads.filter(like="sha256").notna().all().all()
    pd.testing.assert_frame_equal(run(tmp_path / "dask", "--runner", "dask", "--dask-workers", "2"), threads)


@pytest.mark.timeout(420)
def test_the_dask_deployment_runs_on_a_cluster_through_a_worker(prefect_server: str, tmp_path: Path, threads,
                                                                   environ_kept):
    """prefect.yaml's `dataset-on-dask` as deployed: a real server, a process worker, and a Dask
    cluster whose address is the deployment's parameter; the same bytes as the CLI with threads."""
    from distributed import Client
    from test_unattended import api, deploy, final, prefect, wait_for, worker

    shipped = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "dataset-on-dask")
    out = tmp_path / "out"
    settings = {"generate.width": 32, "generate.height": 32, "generate.steps": 2, "rows_per_shard": 1}
    os.environ["PREFECT_API_URL"] = prefect_server  # the cluster's workers report their task runs there
    with local_cpu_cluster(2) as cluster, Client(cluster) as client, \
            worker(prefect_server, "catalogen-dask", tmp_path / "worker.log"):
        parameters = {**shipped["parameters"], "dask_address": cluster.scheduler_address, "out": str(out),
                      "overrides": settings, "limit": 6}
        deployment = deploy(prefect_server, tmp_path, "on-dask", "catalogen-dask", parameters,
                            entrypoint=shipped["entrypoint"])
        prefect("deployment", "run", "catalogen-run-on-dask/on-dask", api_url=prefect_server)
        done = wait_for(lambda: final(prefect_server, deployment, 1), 300, "the run to end", every=1)
        ran = set(client.run(os.getpid).values())
    log = (tmp_path / "worker.log").read_text()
    assert done[0]["state"]["type"] == "COMPLETED", log[-3000:]
    assert done[0]["state"]["message"].startswith("6 rows: 6 ok"), done[0]["state"]
    pd.testing.assert_frame_equal(made(out), threads)
    assert {int(w.rsplit(":", 1)[1]) for w in workers(out)} <= ran  # the shards ran in the cluster's workers
    api(prefect_server, f"deployments/{deployment['id']}", method="DELETE")
