"""The Prefect task that runs one stage over one shard.

It receives references only (the run folder and the shard's input file), so the same task runs
in a thread of the flow's process, in a Dask worker process, or on another machine that sees the
same folder. The shard's part file appears, complete, only once every row has an outcome.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from catalogen.devices import default_dtype, lease, visible_devices
from catalogen.progress import tracker
from catalogen.runplan import read_config, summarize
from catalogen.stage import StageContext
from catalogen.store import STATUSES, RunStore, write_parquet_atomic
from tasks import STAGES


MAX_LOGGED_FAILURES = 5  # per shard; every failure is in the results' error column


def run_shard(run_dir: str, stage: str, shard: str) -> dict[str, Any]:
    """Process one shard under a device lease and write its part file; returns row counts."""
    store = RunStore(run_dir)
    cfg, identities = read_config(store)
    module = STAGES[stage]
    source = store.shard_input_path(stage, shard)
    planned = pq.read_table(source)
    log = get_run_logger()
    asked = time.perf_counter()
    with lease(visible_devices(cfg.device)) as device:
        waited = time.perf_counter() - asked
        started = time.perf_counter()
        ctx = StageContext(
            config=cfg,
            store=store,
            identity=identities[stage],
            device=device,
            dtype=default_dtype(device, cfg.dtype),
            progress=lambda done: tracker.shard(stage, shard, done),
        )
        out = module.process(planned, ctx)
    write_parquet_atomic(out, store.part_path(stage, shard))
    Path(source).unlink(missing_ok=True)
    counts = summarize(out)
    failures = [(r["id"], r["variant"], r["error"]) for r in out.select(["id", "variant", "status", "error"]).to_pylist()
                if r["status"] == "failed"]
    for row_id, variant, error in failures[:MAX_LOGGED_FAILURES]:
        log.warning("%s row %s variant %s failed: %s", stage, row_id, variant, error)
    log.info(
        "%s shard %s: %d rows on %s in %.1f s (waited %.1f s for the device): %s",
        stage, shard, out.num_rows, device, time.perf_counter() - started, waited,
        ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]),
    )
    return {"shard": shard, "device": device.name, **counts}


shard_task = task(
    run_shard,
    name="run-shard",
    task_run_name="{stage}-{shard}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
)
