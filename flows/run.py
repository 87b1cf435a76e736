"""The main flow: catalog in, images and provenance Parquet out.

Ordering and concurrency only. Each shard goes through the configured stages in order: as soon
as its stage-k part exists it is submitted to stage k+1, so on a long run finished rows appear
within minutes; at most `window` task runs are in flight, shards already under way first. Device
leases inside the tasks decide which GPU each uses, so different stages can run at once on
different GPUs. A re-run of the same flow on the same output folder does only what is missing.

The flow's final state says how the rows went: Completed when every row succeeded, Failed (with
the counts in its message, and the summary as its result) when any row failed or a shard crashed,
so a schedule's automations and notifications see a bad night.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from catalogen.config import load_config
from catalogen.devices import visible_devices
from catalogen.hashing import stable_hash
from catalogen.progress import tracker
from catalogen.results import assemble_results, summarize
from catalogen.runplan import (
    RunPlan,
    Selection,
    ShardOutcomes,
    absorb_part,
    check_folder_catalog,
    cut_shards,
    done_results,
    handoff_columns,
    initial_outcomes,
    pending_masks,
    prepare,
    record_invocation,
    set_aside_unreadable_parts,
    stage_input,
)
from tasks.runner import shard_task

# catalogen's loggers reach Prefect's console and API (PREFECT_LOGGING_EXTRA_LOGGERS=catalogen),
# and any other handler, also when the flow's code runs outside a flow run.
log = logging.getLogger("catalogen.flow")

DEMO_CATALOG = "catalogs/demo_prompts.parquet"
FAILED_ROWS_SHOWN = 10


@dataclass
class _InFlight:
    outcomes: ShardOutcomes
    stage: int  # index into the run's stages


def _submit_next(plan: RunPlan, outcomes: ShardOutcomes, start: int, masks) -> tuple[PrefectFuture, int] | None:
    """Submit the shard's first stage from `start` on that has work for it; None when it is through."""
    for index in range(start, len(plan.config.stages)):
        stage = plan.config.stages[index]
        rows = stage_input(plan, stage, outcomes, masks)
        if rows is None:
            continue
        plan.store.write_shard_input(stage, outcomes.shard.name, rows)
        return shard_task.submit(str(plan.store.root), stage, outcomes.shard.name), index
    return None


def _drive(plan: RunPlan, masks, done, window: int) -> list[str]:
    """Run every shard through its stages, at most `window` task runs at once; returns crashed (stage, shard)s."""
    queue = iter(cut_shards(plan, masks))
    in_flight: dict[PrefectFuture, _InFlight] = {}
    crashed = []
    while True:
        while len(in_flight) < window:
            shard = next(queue, None)
            if shard is None:
                break
            outcomes = initial_outcomes(shard, done)
            submitted = _submit_next(plan, outcomes, 0, masks)
            if submitted is not None:
                future, index = submitted
                in_flight[future] = _InFlight(outcomes, index)
        if not in_flight:
            return crashed
        future = next(as_completed(list(in_flight)))
        state = in_flight.pop(future)
        stage = plan.config.stages[state.stage]
        name = state.outcomes.shard.name
        try:
            future.result()
            absorb_part(plan, state.outcomes, stage, pq.read_table(plan.store.part_path(stage, name)))
        except Exception as exc:  # noqa: BLE001 - its rows read as failed in the results
            log.error("%s shard %s crashed: %s", stage, name, exc)
            crashed.append(f"{stage}/{name}")
        submitted = _submit_next(plan, state.outcomes, state.stage + 1, masks)
        if submitted is not None:
            future, index = submitted
            in_flight[future] = _InFlight(state.outcomes, index)


def artifact_key(out: Path) -> str:
    """One artifact per output folder: Prefect keys are lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", out.name.lower()).strip("-")[:40] or "run"
    return f"catalogen-{slug}-{stable_hash(str(out.resolve()))[:8]}"


def _artifact(plan: RunPlan, results, summary: dict[str, Any]) -> str:
    lines = [f"### catalogen run\n\nFolder `{plan.store.root}`, catalog `{plan.catalog_path}`\n",
             "| rows | ok | failed | skipped |", "|---|---|---|---|",
             f"| {summary['rows']} | {summary['ok']} | {summary['failed']} | {summary['skipped']} |\n",
             "| stage | " + " | ".join(["ok", "fallback", "degenerate", "failed", "skipped"]) + " |",
             "|---|---|---|---|---|---|"]
    for stage, counts in summary["stages"].items():
        cells = " | ".join(str(counts.get(s, 0)) for s in ("ok", "fallback", "degenerate", "failed", "skipped"))
        lines.append(f"| {stage} | {cells} |")
    lines += ["", "**Models**", ""]
    for stage, roles in plan.models.items():
        for role, identity in roles.items():
            lines.append(f"- {stage} ({role}): `{identity.repo}` @ `{identity.revision}`")
    failed = [r for r in results.select(["id", "variant", "status", "error"]).to_pylist() if r["status"] == "failed"]
    if failed:
        lines += ["", f"**First failed rows** ({len(failed)} in all)", "", "| id | variant | error |", "|---|---|---|"]
        for row in failed[:FAILED_ROWS_SHOWN]:
            error = str(row["error"]).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {row['id']} | {row['variant']} | {error} |")
    return "\n".join(lines)


@flow(name="catalogen-run", task_runner=ThreadPoolTaskRunner())
def catalogen_run(
    catalog: str = DEMO_CATALOG,
    out: str | None = None,
    config: str | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    retry_failed: bool = False,
    new_catalog: bool = False,
    limit: int | None = None,
    sample: int | None = None,
    origins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every configured stage over the catalog's pending rows and write results.parquet.

    Args:
        catalog: Parquet (or CSV / JSON Lines) catalog.
        out: output folder; default outputs/<catalog name>-<path hash>-<profile>.
        config: YAML run configuration.
        profile: model profile (tiny, tiny-sdxl, sd15, sdxl); overrides the config file.
        overrides: dotted settings, e.g. {"generate.steps": 30}; override the config file.
        retry_failed: recompute rows whose last attempt failed.
        new_catalog: allow a catalog other than the one the output folder was made from.
        limit: run only the catalog's first N rows.
        sample: run only N rows picked by a seeded hash of their ids.
        origins: where each override came from (e.g. "--profile"), for messages and run.json.
    """
    settings = dict(overrides or {})
    named = dict(origins or {})
    if profile is not None:
        settings["profile"] = profile
        named.setdefault("profile", "the flow's profile parameter")
    cfg = load_config(config, settings, named)
    plan = prepare(catalog, cfg, out, Selection(limit, sample))
    with plan.store.exclusive():
        check_folder_catalog(plan.store, plan.catalog_path, new_catalog)
        plan.store.clear_leftovers()
        for moved in set_aside_unreadable_parts(plan):
            log.warning("set aside %s: it cannot be read; its rows will be computed again", moved)
        done = {name: done_results(plan, name, ["error", *handoff_columns(plan, name)]) for name in cfg.stages}
        masks = pending_masks(plan, retry_failed, done)
        pending = {name: int(mask.sum()) for name, mask in masks.items()}
        record_invocation(plan, pending, retry_failed)
        log.info("run folder %s: %d rows (%d catalog ids); pending: %s", plan.store.root, plan.rows.num_rows,
                 plan.catalog.num_rows, ", ".join(f"{k} {v}" for k, v in pending.items()))
        for name in cfg.stages:
            tracker.begin(name, plan.rows.num_rows)
            tracker.shard(name, "(done before)", plan.rows.num_rows - pending[name])
        window = 2 * len(visible_devices(cfg.device))  # enough to keep every device busy, no more
        crashed = _drive(plan, masks, done, window)
        for name in cfg.stages:
            tracker.end(name)
        results = assemble_results(plan)
        plan.store.write_results(results)
        plan.store.clear_leftovers()
    summary = {**summarize(results, cfg.stages), "out": str(plan.store.root), "crashed_shards": len(crashed),
               "pending_before": pending}
    log.info("results: %s", {k: v for k, v in summary.items() if k != "stages"})
    for name, counts in summary["stages"].items():
        untouched = plan.rows.num_rows - pending[name]
        if pending[name] == 0:
            log.info("%s: nothing to do (%s)", name, ", ".join(f"{n} {s}" for s, n in counts.items()) or "no rows")
        elif untouched:
            log.info("%s: %d rows were done before this run", name, untouched)
    create_markdown_artifact(key=artifact_key(plan.store.root), markdown=_artifact(plan, results, summary),
                             description=f"catalogen run into {plan.store.root}")
    if summary["failed"] or crashed:
        message = f"{summary['failed']} of {summary['rows']} rows failed"
        if crashed:
            message += f" ({len(crashed)} shard(s) crashed)"
        return Failed(message=f"{message}; see {plan.store.results_path}", data=summary)
    return summary

