"""Run one stage over one shard: the unit every runner (threads, Dask workers) executes.

It receives references only (the run folder, the stage and the shard's name), so the same call
runs in a thread of the flow's process, in a Dask worker process, or on another machine that
sees the same folder. The shard's part file appears, complete, only once every row has an
outcome. `run_shard` is plain Python (it logs through the `catalogen` logger, which Prefect
shows when it runs inside a flow); `shard_task` is the same function as a Prefect task.

In a Dask worker, the shard's own lines (its summary, failed rows, model loads) go back in its
result, and the flow logs them (`relay`): a worker's console is not the user's.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from catalogen import stopping
from catalogen.config import RunConfig
from catalogen.run.costs import price, with_device_time
from catalogen.run.devices import Device, default_dtype, lease, visible_devices
from catalogen.models.loading import load_mark, load_seconds_since, loads_since
from catalogen.run.progress import tracker
from catalogen.run.recipe import run_catalog, take_recipes
from catalogen.run.plan import read_config
from catalogen.stage import SKIP_COLUMN, StageContext
from catalogen.storage.store import STATUSES, RunStore, now_utc
from tasks import STAGES

log = logging.getLogger("catalogen.runner")

MAX_LOGGED_FAILURES = 5  # per shard; every failure is in the results' error column


def _skipped(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """Result rows for planned rows whose upstream failed: recorded as skipped, with the reason."""
    finished = now_utc()
    records = [
        {**row, "status": "skipped", "error": row[SKIP_COLUMN], "seconds": 0.0, "finished_at": finished}
        for row in rows.to_pylist()
    ]
    return pa.Table.from_pylist(records, schema=schema)


def _log_outcome(stage: str, shard: str, out: pa.Table, device: str, seconds: float, waited: float) -> dict[str, int]:
    statuses = out.column("status").to_pylist()
    counts = {s: statuses.count(s) for s in STATUSES}
    failures = [r for r in out.select(["id", "variant", "status", "error"]).to_pylist() if r["status"] == "failed"]
    for row in failures[:MAX_LOGGED_FAILURES]:
        log.warning("%s row %s variant %s failed: %s", stage, row["id"], row["variant"], row["error"])
    log.info(
        "%s shard %s: %d rows on %s in %.1f s (waited %.1f s for the device): %s",
        stage, shard, out.num_rows, device, seconds, waited,
        ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]),
    )
    return counts


def run_shard(run_dir: str, stage: str, shard: str) -> dict[str, Any]:
    """Process one shard of one stage under a device lease and write its part.

    Returns row counts per status, and the process that ran it (`host:pid`) with the models it
    loaded meanwhile, and in a Dask worker its log lines: a worker's own records never reach the
    flow's process otherwise.
    """
    with _lines_for_the_flow() as lines:
        outcome = _run_shard(run_dir, stage, shard)
    return {**outcome, "lines": lines} if lines else outcome


def _run_shard(run_dir: str, stage: str, shard: str) -> dict[str, Any]:
    mark = load_mark()
    store = RunStore(run_dir)
    cfg, models = read_config(store)
    module = STAGES[stage]
    source = store.shard_input_path(stage, shard)
    rows, recipes = take_recipes(store.read_table(source), cfg, models, stage, run_catalog(store.read_run_json()))
    blocked = rows.filter(rows.column(SKIP_COLUMN).is_valid())
    todo = rows.filter(rows.column(SKIP_COLUMN).is_null()).drop_columns([SKIP_COLUMN])
    parts = [_skipped(blocked, module.OUTPUT_SCHEMA)] if blocked.num_rows else []
    parts = [with_device_time(part, 0.0, 0.0 if cfg.costs else None) for part in parts]  # skipped: no device held
    device_name, waited, seconds = "-", 0.0, 0.0
    if todo.num_rows:
        asked = time.perf_counter()
        with _device(cfg, stage, shard) as device:
            waited = time.perf_counter() - asked
            started = time.perf_counter()
            ctx = StageContext(
                config=cfg, store=store, models=models[stage], device=device,
                dtype=default_dtype(device, cfg.dtype), progress=_progress(stage, shard, blocked.num_rows),
                recipes=recipes,
            )
            done = module.process(todo, ctx)
            seconds = time.perf_counter() - started
        held = seconds if needs_device(stage, cfg) else 0.0  # a server's work holds no device here
        parts.append(with_device_time(done, held, price(cfg.costs, device)))
        device_name = device.name
    out = pa.concat_tables([part.select(module.OUTPUT_SCHEMA.names) for part in parts])
    stopping.check()  # abandoned during the work: its rows stay pending, whatever the stage recorded
    store.write_part(stage, shard, out)
    counts = _log_outcome(stage, shard, out, device_name, seconds, waited)
    tracker.shard(stage, shard, out.num_rows)
    return {"shard": shard, "stage": stage, "device": device_name, **counts,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "loads": loads_since(mark),
            "load_seconds": load_seconds_since(mark)}


class _Lines(logging.Handler):
    """catalogen's records of one thread, as (level, logger, message)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.lines: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append((record.levelno, record.name, record.getMessage()))


@contextmanager
def _lines_for_the_flow() -> Iterator[list[tuple[int, str, str]]]:
    """In a Dask worker, catalogen's lines of this shard's thread, kept for its result (`relay`);
    elsewhere nothing: the flow's own process shows them as they are logged."""
    if not _in_dask_worker():
        yield []
        return
    ours = logging.getLogger("catalogen")
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    handler = _Lines()
    ours.addHandler(handler)
    try:
        yield handler.lines
    finally:
        ours.removeHandler(handler)


def relay(outcome: dict[str, Any]) -> None:
    """Log a shard's lines that a Dask worker kept in its result, under their own loggers, as the
    threads runner logs them."""
    for level, name, message in outcome.get("lines") or ():
        logging.getLogger(name).log(level, "%s", message)


def needs_device(stage: str, cfg: RunConfig) -> bool:
    """Whether the stage's shards hold a device (a GPU where there is one): not one whose work a
    server does (a server-backed enhance)."""
    check = getattr(STAGES[stage], "needs_device", None)
    return check is None or bool(check(cfg))


@contextmanager
def _device(cfg: RunConfig, stage: str, shard: str) -> Iterator[Device]:
    """A lease on one of the run's devices; none for a stage whose work runs elsewhere (a server),
    nor for the CPU of a Dask worker."""
    devices = visible_devices(cfg.device) if needs_device(stage, cfg) else []
    if not devices or (devices == [Device("cpu", "cpu")] and _in_dask_worker()):
        yield Device("cpu", "cpu")
        return
    with lease(devices, timeout=cfg.lease_timeout_s, on_wait=_log_wait(stage, shard)) as device:
        yield device


def _in_dask_worker() -> bool:
    """In a Dask worker the cluster's size bounds the work; one machine-wide CPU lease would run a
    machine's workers one at a time."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def _progress(stage: str, shard: str, already: int):
    def report(done: int) -> None:
        tracker.shard(stage, shard, already + done)

    return report


def _log_wait(stage: str, shard: str):
    def report(device: str, holder: str, waited: float) -> None:
        log.info("%s shard %s: waiting %.0f s for %s, held by %s", stage, shard, waited, device, holder)

    return report


def _retry_unless_stopping(task: Any, task_run: Any, state: Any) -> bool:
    """A crashed shard is tried once more, but not while the run is stopping."""
    return not stopping.STOPPING.is_set()


def _shard_unless_stopped(run_dir: str, stage: str, shard: str) -> dict[str, Any] | State:
    """`run_shard`; a shard given up at a stop (not started, or still running when the grace period
    ended) is no failure: its task ends Completed, named Abandoned, and its rows stay pending."""
    try:
        return run_shard(run_dir, stage, shard)
    except stopping.Abandoned as exc:
        outcome = {"stage": stage, "shard": shard, "abandoned": str(exc)}
        return Completed(name="Abandoned", message=str(exc), data=outcome)


shard_task = task(
    _shard_unless_stopped,
    name="run-shard",
    task_run_name="{stage}-{shard}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_stopping,
)
