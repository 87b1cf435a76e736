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
from pathlib import Path
from typing import Any

_HOME = Path(tempfile.mkdtemp(prefix="catalogen-tests-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "CATALOGEN_HOME": str(_HOME / "catalogen"),
        "CATALOGEN_LOCK_DIR": str(_HOME / "leases"),
        "PREFECT_HOME": str(_HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
)
os.environ.pop("PREFECT_API_URL", None)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from catalogen.catalog import expand_rows, validate_catalog  # noqa: E402
from catalogen.config import RunConfig, load_config  # noqa: E402
from catalogen.devices import Device  # noqa: E402
from catalogen.models import resolve_model  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.store import RunStore  # noqa: E402
from tasks import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small and fast, but still the real pipeline: 32x32 images, 3 denoising steps.
FAST = {"generate.steps": 3, "generate.width": 32, "generate.height": 32}


def fast_config(**overrides: Any) -> RunConfig:
    return load_config(None, {**FAST, **overrides})


def write_catalog(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def prompts(n: int, prefix: str = "row") -> dict[str, list]:
    return {"id": [f"{prefix}-{i}" for i in range(n)], "prompt": [f"a photo of object number {i}" for i in range(n)]}


def run_stage(table: pa.Table, cfg: RunConfig, out: Path) -> pa.Table:
    """The generate stage on a catalog table, called directly as a benchmark would."""
    catalog = validate_catalog(table, cfg)
    rows = expand_rows(catalog, cfg)
    identity = resolve_model(cfg.model_for("generate"), cfg)
    planned = generate.plan(rows, cfg, identity)
    ctx = StageContext(cfg, RunStore(out), identity, Device("cpu", "cpu"), torch.float32)
    return generate.process(planned, ctx)


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
    env = {**os.environ, "PREFECT_HOME": str(home)}
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
