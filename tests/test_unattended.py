"""Runs nobody watches, as they are deployed: a real `prefect server start`, a process work pool and
a worker, a schedule that fires, a cancel from the API, overlapping runs, and signals to the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, REPO, cli_env, prompts, write_catalog

pytestmark = pytest.mark.slow

FAST = {"generate.width": 32, "generate.height": 32}


def api(url: str, path: str, body: dict | None = None, method: str = "POST") -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def prefect(*args: str, api_url: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "prefect"), *args], env={**cli_env(api_url), **env}, cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@contextmanager
def worker(api_url: str, pool: str, log: Path) -> Iterator[None]:
    """`prefect worker start` on a process pool, polling often; catalogen logs at INFO."""
    prefect("work-pool", "create", pool, "--type", "process", "--overwrite", api_url=api_url)
    env = {**cli_env(api_url), "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def deploy(api_url: str, tmp_path: Path, name: str, pool: str, parameters: dict, **extra) -> dict:
    """Deploy the flow as prefect.yaml does (its concurrency limit included), from a file of the test's."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    spec = {"name": name, "entrypoint": shipped["entrypoint"], "parameters": parameters,
            "work_pool": {"name": pool, "job_variables": shipped["work_pool"]["job_variables"]},
            "concurrency_limit": shipped["concurrency_limit"], **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "catalogen-tests", "deployments": [spec]}))
    prefect("--no-prompt", "deploy", "--prefect-file", str(path), "--name", name, api_url=api_url)
    return next(d for d in api(api_url, "deployments/filter", {}) if d["name"] == name)


def runs_of(api_url: str, deployment: dict) -> list[dict]:
    return api(api_url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def final(api_url: str, deployment: dict, count: int) -> list[dict] | None:
    runs = runs_of(api_url, deployment)
    done = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")]
    return done if len(done) >= count else None


def flow_run_logs(api_url: str, run_id: str) -> list[str]:
    logs = api(api_url, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return [f"{entry['name']}: {entry['message']}" for entry in logs]


@pytest.mark.timeout(420)
def test_a_schedule_fires_and_an_overlapping_run_waits_its_turn(prefect_server: str, tmp_path: Path):
    """The scheduled run has a budget of 3.6 ms of device time: it stops after its first shard, Completed
    with the budget's line; the run started by hand meanwhile, with room, waits, then finishes the rest."""
    catalog = write_catalog(tmp_path / "nightly.parquet", prompts(3))
    out = tmp_path / "nightly"
    # A cron due at the next minute that is at least 40 s away (time to deploy), once a day after that.
    due = (datetime.now(timezone.utc) + timedelta(seconds=100)).replace(second=0, microsecond=0)
    overrides = {**FAST, "generate.steps": 2, "rows_per_shard": 1}
    parameters = {"catalog": str(catalog), "out": str(out), "overrides": {**overrides, "budget.device_hours": 0.000001}}
    schedule = {"cron": f"{due.minute} {due.hour} * * *", "timezone": "UTC", "active": True}
    with worker(prefect_server, "catalogen-schedule", tmp_path / "worker.log"):
        deployment = deploy(prefect_server, tmp_path, "due-soon", "catalogen-schedule", parameters, schedules=[schedule])
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        scheduled = wait_for(lambda: [r for r in runs_of(prefect_server, deployment) if r["auto_scheduled"]],
                             90, "the scheduler to create a run")
        first_due = min(r["expected_start_time"] for r in scheduled)  # it also plans the next days' runs
        assert first_due.startswith(due.strftime("%Y-%m-%dT%H:%M")), first_due
        wait_for(lambda: any(r["state"]["type"] == "RUNNING" for r in runs_of(prefect_server, deployment)),
                 200, "the scheduled run to start")
        # Someone starts the same deployment by hand meanwhile: it waits, it does not collide.
        manual = prefect("deployment", "run", "catalogen-run/due-soon", "--params",
                         json.dumps({"overrides": {**overrides, "budget.device_hours": 1}}), api_url=prefect_server)
        assert "Created flow run" in manual.stdout
        both = wait_for(lambda: final(prefect_server, deployment, 2), 240, "both runs to finish", every=2)
    log = (tmp_path / "worker.log").read_text()
    assert {r["state"]["type"] for r in both} == {"COMPLETED"}, log[-3000:]
    assert sum(r["auto_scheduled"] for r in both) == 1
    first = next(r for r in both if r["auto_scheduled"])
    second = next(r for r in both if not r["auto_scheduled"])
    assert second["start_time"] >= first["end_time"]  # one at a time on the folder
    budget = re.fullmatch(r"budget reached: [0-9.]+ of 0.000001 device-hours; ([12]) of 3 rows pending; "
                          r"run again to continue", first["state"]["message"])
    assert budget, first["state"]["message"]
    assert second["state"]["message"] == "3 rows: 3 ok, 0 failed, 0 skipped"
    assert pd.read_parquet(out / "results.parquet").status.tolist() == ["ok", "ok", "ok"]
    lines = flow_run_logs(prefect_server, first["id"])
    assert any(line.startswith("catalogen.flow: plan for") and "generate 3 of 3 rows pending" in line for line in lines), lines
    assert any(line.startswith("catalogen.flow: report: ") for line in lines), lines
    # the second continued where the first stopped
    wait_for(lambda: any(f"generate {budget.group(1)} of 3 rows pending" in line
                         for line in flow_run_logs(prefect_server, second["id"])), 30, "the second run's logs")
    assert not any("View at" in line for line in lines)
    api(prefect_server, f"deployments/{deployment['id']}", method="DELETE")


@pytest.mark.timeout(420)
def test_a_cancel_from_the_api_stops_the_run_and_keeps_what_is_done(prefect_server: str, tmp_path: Path):
    catalog = write_catalog(tmp_path / "long.parquet", prompts(6))
    out = tmp_path / "long"
    parameters = {"catalog": str(catalog), "out": str(out),
                  "overrides": {**FAST, "generate.steps": 20, "rows_per_shard": 1, "stop_grace_s": 5}}
    with worker(prefect_server, "catalogen-cancel", tmp_path / "worker.log"):
        deployment = deploy(prefect_server, tmp_path, "to-cancel", "catalogen-cancel", parameters)
        prefect("deployment", "run", "catalogen-run/to-cancel", api_url=prefect_server)
        wait_for(lambda: list((out / "stages" / "generate").glob("part-*.parquet")), 240, "a first part", every=0.5)
        run = runs_of(prefect_server, deployment)[0]
        asked = time.monotonic()
        api(prefect_server, f"flow_runs/{run['id']}/set_state",
            {"state": {"type": "CANCELLING", "message": "cancelled by the test"}, "force": True})
        done = wait_for(lambda: final(prefect_server, deployment, 1), 120, "the run to end", every=0.5)
        took = time.monotonic() - asked
    log = (tmp_path / "worker.log").read_text()
    assert done[0]["state"]["type"] == "CANCELLED", log[-3000:]
    assert took < 60, took  # the worker's poll, the 5 s grace, writing results: not the 30 s SIGKILL path twice
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 6 and set(results.status) == {"ok", "pending"}, results.status.tolist()
    assert (results.status == "ok").sum() == len(list((out / "stages" / "generate").glob("part-*.parquet")))
    wait_for(lambda: any("SIGTERM received: no new shard starts" in line
                         for line in flow_run_logs(prefect_server, run["id"])), 30, "the stop's line in the run's logs")
    # Nothing of ours raised; Prefect's engine itself may log the CancelledRun it raises at the end
    # of a cancelled run (when its control channel did not mark the outcome handled).
    assert not re.search(r'File ".*/(catalogen|flows|tasks)/', log) and "TypeError" not in log, log[-3000:]
    # The next run resumes: only the pending rows are made.
    resumed = subprocess.run([str(BIN / "catalogen"), "run", str(catalog), "--out", str(out)], env=cli_env(prefect_server),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "6 rows: 6 ok" in resumed.stdout
    api(prefect_server, f"deployments/{deployment['id']}", method="DELETE")


def start_cli(out: Path, catalog: Path, *args: str, api_url: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "catalogen"), "run", str(catalog), "--out", str(out), *args],
        env={**cli_env(api_url), "PREFECT_LOGGING_LEVEL": "INFO"}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def part_ids(out: Path, stage: str) -> set[str]:
    """The ids in a stage's parts on disk, read with pyarrow: what the same command then skips."""
    parts = list((out / "stages" / stage).glob("part-*.parquet"))
    return {i for part in parts for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()}


def stop_line(stderr: str) -> str:
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, stderr
    return stopped[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, code, resume", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_a_signal_stops_the_cli_cleanly_and_the_same_command_resumes(tmp_path: Path, signum: int, code: int,
                                                                     resume: bool):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(6))
    out = tmp_path / "out"
    args = ("--rows-per-shard", "1", "--stages", "generate,caption", "--set", "generate.steps=12",
            "--set", "stop_grace_s=2", "--set", "generate.width=32", "--set", "generate.height=32")
    proc = start_cli(out, catalog, *args)
    wait_for(lambda: list((out / "stages" / "generate").glob("part-*.parquet")) or proc.poll() is not None,
             240, "a first part", every=0.1)
    os.killpg(proc.pid, signum)  # as Ctrl-C does (the terminal signals the whole foreground group)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "ConnectError" not in stderr
    assert "View at" not in stderr  # no link to a temporary server that is gone when the command ends
    # A shard that never started (it waited for the device) or was given up is no error.
    assert not [line for line in stderr.splitlines() if "ERROR" in line or "Failed" in line], stderr
    assert stdout.splitlines()[-1] == f"report: {out / 'report.html'}"  # the last line names the report
    # The stop line counts what the parts on disk hold per stage: what the same command skips.
    generated, captioned = part_ids(out, "generate"), part_ids(out, "caption")
    assert stop_line(stderr) == (f"stopped: {len(generated & captioned)} of 6 rows finished; generate kept "
                                 f"{len(generated)}, caption {len(captioned)}; run the same command to continue")
    results = pd.read_parquet(out / "results.parquet")
    assert set(results.id[results.status == "ok"]) == generated & captioned and 1 <= len(generated) < 6
    assert set(results.id[results.status == "pending"]) == set(results.id) - (generated & captioned)
    assert not (out / "work").exists() or not any((out / "work").rglob("*.parquet"))
    if not resume:
        return

    again = subprocess.run([str(BIN / "catalogen"), "run", str(catalog), "--out", str(out)],
                           env={**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO"}, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"generate {6 - len(generated)} of 6 rows pending, caption {6 - len(captioned)} of 6" in again.stderr
    resumed = pd.read_parquet(out / "results.parquet")
    assert (resumed.status == "ok").all() and len(resumed) == 6
    assert set(resumed.generate_steps) == {12}  # the folder's settings, not the defaults


GRACE_S = 10  # stop_grace_s of the next test
QUICK_S, SLOW_S = 3, GRACE_S + 3  # after the stop, when the server answers each shard


@pytest.mark.timeout(300)
def test_a_shard_in_flight_may_finish_within_the_grace_and_not_after(prefect_server: str, tmp_path: Path):
    """Two shards held in flight by the LLM server at the stop: the one answered 3 s into the 10 s
    grace writes its part, its row ok; the one answered 3 s after the grace was abandoned at the
    grace's end: no part, its row pending, and the command ended by then with 130."""
    from llm_servers import LLMServer

    server = LLMServer().start()
    catalog = write_catalog(tmp_path / "catalog.parquet", {"id": ["quick", "slow"],
                                                          "prompt": ["a QUICK answer", "a SLOW answer"]})
    out = tmp_path / "out"
    try:
        proc = start_cli(out, catalog, "--stages", "enhance", "--rows-per-shard", "1", "--set", f"stop_grace_s={GRACE_S}",
                         "--set", "enhance.backend=openai", "--set", "enhance.model=held",
                         "--set", f"enhance.base_url={server.url}", "--set", "enhance.timeout_s=120",
                         "--set", f"enhance.answer_cache={tmp_path / 'answers.sqlite'}", api_url=prefect_server)
        wait_for(lambda: server.state.requests["held"] == 2 or proc.poll() is not None, 240, "both shards in flight",
                 every=0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stopped = time.monotonic()
        for word, after in (("QUICK", QUICK_S), ("SLOW", SLOW_S)):
            while proc.poll() is None and time.monotonic() < stopped + after:
                time.sleep(0.05)
            server.state.released.add(word)
        stdout, stderr = proc.communicate(timeout=GRACE_S + 20)
        took = time.monotonic() - stopped
    finally:
        server.state.released.add("")  # every request answers, so the server stops
        server.stop()
    assert proc.returncode == 130, stderr
    assert took < GRACE_S + 20, took  # the grace, then results, report and exit: not a wait for the slow shard
    assert part_ids(out, "enhance") == {"quick"}
    results = pd.read_parquet(out / "results.parquet").set_index("id")
    assert results.status.to_dict() == {"quick": "ok", "slow": "pending"}
    assert results.loc["quick", "enhance_prompt"].startswith("product photograph of a QUICK answer")
    assert stop_line(stderr) == "stopped: 1 of 2 rows finished; enhance kept 1; run the same command to continue"
    assert "abandoning 1 shard(s) still in flight after 10 s" in stderr
    assert not [line for line in stderr.splitlines() if "ERROR" in line or "Failed" in line], stderr


@pytest.mark.timeout(200)
def test_the_temporary_api_server_dies_with_a_killed_cli(tmp_path: Path):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(6))
    out = tmp_path / "out"
    proc = start_cli(out, catalog, "--rows-per-shard", "1", "--set", "generate.steps=20", "--set", "generate.width=32",
                     "--set", "generate.height=32")
    wait_for(lambda: list((out / "stages" / "generate").glob("part-*.parquet")) or proc.poll() is not None,
             180, "a first part", every=0.1)
    servers = [int(pid) for pid in subprocess.run(["pgrep", "-f", f"catalogen.run.prefect_api {proc.pid} "],
                                                  capture_output=True, text=True).stdout.split()]
    assert len(servers) == 1
    os.killpg(proc.pid, signal.SIGKILL)  # as a supervisor kills a job that ignored SIGTERM
    proc.wait()
    wait_for(lambda: subprocess.run(["ps", "-p", str(servers[0]), "-o", "stat="], capture_output=True,
                                    text=True).stdout.strip() in ("", "Z"), 30, "the server to stop")


def readme_terminals() -> list[list[str]]:
    """The code blocks of the README's "Scheduling with Prefect" section, up to its first paragraph
    after them: one per terminal, as lists of command lines."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Scheduling with Prefect\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\n```\n(.*?)\n```\n", section, flags=re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def fresh_clone(folder: Path) -> Path:
    """The repository's tracked files, as a clone has them, with the `.venv` `make install` makes."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes((REPO / name).read_bytes())
    (folder / ".venv").symlink_to(BIN.parent)
    return folder


@pytest.mark.timeout(600)
def test_the_readmes_prefect_section_works_as_written(prefect_server: str, tmp_path: Path):
    server, deploy_and_work, run_now = readme_terminals()
    # Terminal 1 is the session's server, started as the README says (on a free port, so the URL
    # the other terminals export is that port's).
    assert server == ["source .venv/bin/activate", "prefect server start"]
    clone = fresh_clone(tmp_path / "catalogen")
    env = {k: v for k, v in cli_env().items() if not k.startswith("PREFECT_API")}  # the README exports it
    env.update(PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5")  # poll often

    def script(lines: list[str]) -> list[str]:
        body = "\n".join(lines).replace("http://127.0.0.1:4200/api", prefect_server)
        return ["bash", "-e", "-c", body]

    log = tmp_path / "terminal-2.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(script(deploy_and_work), cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        def worker_up() -> bool:
            if worker.poll() is not None:
                return True
            try:
                return bool(api(prefect_server, "work_pools/catalogen/workers/filter", {}))
            except urllib.error.HTTPError:  # no such pool yet
                return False

        wait_for(worker_up, 300, "the worker to start", every=2)
        assert worker.poll() is None, log.read_text()[-3000:]
        third = subprocess.run(script(run_now), cwd=clone, env=env, capture_output=True, text=True, timeout=420)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        for deployment in api(prefect_server, "deployments/filter", {}):
            if deployment["name"] in ("nightly-dataset", "nightly-products", "photos", "dataset-on-dask"):
                api(prefect_server, f"deployments/{deployment['id']}", method="DELETE")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:] + log.read_text()[-3000:]
    assert "Flow run finished successfully in 'Completed'" in third.stdout
    out = clone / "outputs" / "nightly-dataset"
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 25 and (results.status == "ok").all()
    # The CLI line, against the same server and folder, had nothing left to make.
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    assert [i["pending"] for i in invocations] == [{"generate": 25, "caption": 25}, {"generate": 0, "caption": 0}]
    assert "25 rows: 25 ok" in third.stdout and third.stdout.splitlines()[-1] == f"report: {out / 'report.html'}"
