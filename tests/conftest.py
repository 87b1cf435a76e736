"""Shared fixtures: an isolated, offline environment and helpers to build catalogs and runs.

The environment is set before Prefect or the Hugging Face libraries are imported, so every test
(and every subprocess a test starts) uses throw-away homes and never reaches for the network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_HOME = Path(tempfile.mkdtemp(prefix="catalogen-tests-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "CATALOGEN_HOME": str(_HOME / "catalogen"),
        "CATALOGEN_LOCK_DIR": str(_HOME / "leases"),
        "PREFECT_HOME": str(_HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "catalogen",  # as the CLI and the deployment set it
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # stages also run outside flows here
        # The ephemeral API is a subprocess; on a busy 2-core machine it can take longer than the
        # default 20 s to answer, which would fail a test for a reason that is not ours.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
)
os.environ.pop("PREFECT_API_URL", None)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from catalogen.config import RunConfig, load_config  # noqa: E402
from catalogen.run.devices import Device  # noqa: E402
from catalogen.run.plan import RunPlan, prepare  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from tasks import STAGES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small and fast, but still the real pipeline: 32x32 images, 3 denoising steps.
FAST = {"generate.steps": 3, "generate.width": 32, "generate.height": 32}


@pytest.fixture(scope="session", autouse=True)
def prefect_logging() -> None:
    """Configure Prefect's logging before any test: done later, inside a test, it would replace
    pytest's log capture handler."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()


@pytest.fixture(scope="module")
def server():
    """A fake OpenAI-compatible server on 127.0.0.1 (tests/llm_servers.py), one per test module."""
    from llm_servers import LLMServer

    running = LLMServer().start()
    yield running
    running.stop()


@contextmanager
def held_in_another_process(imports: str, lock: str) -> Iterator[None]:
    """While the block runs, another process holds `with <lock>:` (after `<imports>`), as a second
    invocation would; it is killed afterwards."""
    code = f"import time\n{imports}\nwith {lock}:\n    print('held', flush=True); time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def fast_config(**overrides: Any) -> RunConfig:
    return load_config(None, {**FAST, **overrides})


def write_catalog(path: Path, columns: dict[str, list] | pa.Table) -> Path:
    pq.write_table(columns if isinstance(columns, pa.Table) else pa.table(columns), path)
    return path


def prompts(n: int, prefix: str = "row") -> dict[str, list]:
    return {"id": [f"{prefix}-{i}" for i in range(n)], "prompt": [f"a photo of object number {i}" for i in range(n)]}


def plan_table(table: pa.Table, cfg: RunConfig, out: Path) -> RunPlan:
    """Check and plan a catalog table (written beside the run folder) as a run would."""
    out.mkdir(parents=True, exist_ok=True)
    path = write_catalog(out.parent / f"{out.name}-catalog.parquet", table)
    return prepare(path, cfg, out)


def context(plan: RunPlan, stage: str) -> StageContext:
    return StageContext(plan.config, plan.store, plan.models[stage], Device("cpu", "cpu"), torch.float32)


def run_stage(table: pa.Table, cfg: RunConfig, out: Path, stage: str = "generate") -> pa.Table:
    """One stage over a catalog table, called directly (no Prefect) as a benchmark would."""
    plan = plan_table(table, cfg, out)
    return STAGES[stage].process(plan.planned[stage], context(plan, stage))


def cli_env(api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """A real `prefect server start`, for the tests that run the CLI as users do."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    # The scheduler looks for due schedules every 60 s by default; a schedule test need not wait that long.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
