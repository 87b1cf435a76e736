"""The main flow: catalog in, images and provenance Parquet out.

Ordering and concurrency only: stage by stage, every pending shard becomes one task run, and
device leases inside the tasks decide which GPU each uses. A re-run of the same flow on the same
output folder does only what is missing.
"""

from __future__ import annotations

import itertools
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from catalogen.config import load_config
from catalogen.devices import visible_devices
from catalogen.progress import tracker
from catalogen.runplan import (
    RunPlan,
    assemble_results,
    pending_shards,
    prepare,
    record_invocation,
    summarize,
)
from tasks import STAGES
from tasks.runner import shard_task

DEMO_CATALOG = "catalogs/demo_prompts.parquet"


def _run_stage(plan: RunPlan, stage: str, todo: list[tuple[str, pa.Table]], window: int) -> list[str]:
    """Submit one task run per shard, at most `window` at a time; returns the shards that crashed.

    Shard inputs are written just before their task is submitted, so a million-row catalog never
    has thousands of task runs (or shard files) waiting at once.
    """
    log = get_run_logger()
    queue, in_flight, crashed = iter(todo), {}, []
    while True:
        for shard_name, rows in itertools.islice(queue, window - len(in_flight)):
            plan.store.write_shard_input(stage, shard_name, rows)
            in_flight[shard_task.submit(str(plan.store.root), stage, shard_name)] = (shard_name, rows.num_rows)
        if not in_flight:
            return crashed
        future = next(as_completed(list(in_flight)))
        shard_name, size = in_flight.pop(future)
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - its rows read as failed in the results
            log.error("%s shard %s crashed: %s", stage, shard_name, exc)
            crashed.append(shard_name)
        tracker.shard(stage, shard_name, size)


@flow(name="catalogen-run", task_runner=ThreadPoolTaskRunner())
def catalogen_run(
    catalog: str = DEMO_CATALOG,
    out: str | None = None,
    config: str | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run every configured stage over the catalog's pending rows and write results.parquet.

    Args:
        catalog: Parquet (or CSV / JSON Lines) catalog.
        out: output folder; default outputs/<catalog name>-<profile>.
        config: YAML run configuration.
        profile: model profile (tiny, tiny-sdxl, sd15, sdxl); overrides the config file.
        overrides: dotted settings, e.g. {"generate.steps": 30}; override the config file.
        retry_failed: recompute rows whose last attempt failed.
    """
    log = get_run_logger()
    cfg = load_config(config, {**(overrides or {}), "profile": profile})
    plan = prepare(catalog, cfg, out, STAGES)
    with plan.store.exclusive():
        plan.store.clear_leftovers()
        shards = {name: pending_shards(plan, STAGES[name], retry_failed) for name in cfg.stages}
        pending = {name: sum(rows.num_rows for _, rows in todo) for name, todo in shards.items()}
        record_invocation(plan, pending, retry_failed)
        log.info("run folder %s: %d rows (%d catalog ids)", plan.store.root, plan.rows.num_rows, plan.catalog.num_rows)
        window = 2 * len(visible_devices(cfg.device))  # enough to keep every device busy, no more
        crashed = []
        for name in cfg.stages:
            todo = shards[name]
            tracker.begin(name, plan.rows.num_rows)
            tracker.shard(name, "(done before)", plan.rows.num_rows - pending[name])
            if not todo:
                log.info("%s: nothing to do, every row is done", name)
            crashed += _run_stage(plan, name, todo, window)
            tracker.end(name)
        results = assemble_results(plan, STAGES)
        plan.store.write_results(results)
        plan.store.clear_leftovers()
    summary = {**summarize(results), "out": str(plan.store.root), "crashed_shards": len(crashed)}
    log.info("results: %s", summary)
    create_markdown_artifact(
        key="catalogen-run-summary",
        markdown=f"### catalogen run\n\nFolder `{summary['out']}`\n\n| rows | ok | failed | skipped |\n"
        f"|---|---|---|---|\n| {summary['rows']} | {summary['ok']} | {summary['failed']} | {summary['skipped']} |",
        description="Row counts of the run",
    )
    if crashed:
        raise RuntimeError(f"{len(crashed)} shard(s) crashed; their rows read as failed in {plan.store.results_path}")
    return summary
