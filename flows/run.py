"""The main flow: catalog in, images and provenance Parquet out.

Ordering and concurrency only. Each shard goes through the configured stages in order: as soon
as its stage-k part exists it is submitted to stage k+1, so on a long run finished rows appear
within minutes; at most `window` task runs are in flight, shards already under way first. Device
leases inside the tasks decide which GPU each uses, so different stages can run at once on
different GPUs. A re-run of the same flow on the same output folder does only what is missing.
Where the tasks run (threads here, or Dask worker processes) is the task runner's business: see
flows/runners.py, which gives this flow its runner, and flows/placement.py, which tells it how many
tasks to keep in flight.

The flow's final state says how the rows went: Completed when every row succeeded, Failed (with
the counts in its message, and the summary as its result) when any row failed or a shard crashed,
so a schedule's automations and notifications see a bad night.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.states import Cancelled, Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from catalogen import stopping
from catalogen.config import ConfigError
from catalogen.run.costs import Meter, amount, budget_line, check_budget, given, record_costs
from catalogen.run.devices import visible_devices
from catalogen.run.dryrun import record_folder_files, record_throughput
from catalogen.media.duplicates import COLUMNS as DUPLICATE_COLUMNS
from catalogen.media.duplicates import add_duplicate_columns, previous_hashes
from catalogen.storage.hashing import stable_hash
from catalogen.storage.lease import LeaseLost
from catalogen.run.progress import tracker
from catalogen.publish.report import write_report
from catalogen.review.decisions import DecisionError, latest
from catalogen.review.decisions import read as read_decisions
from catalogen.review.regenerate import record_regenerations
from catalogen.review.select import decide
from catalogen.review.state import REVIEW_SCHEMA, apply_decisions, review_command, state_counts
from catalogen.run.results import NOTE_MEANINGS, assemble_results, kept, summarize
from catalogen.run.plan import (
    RunPlan,
    Selection,
    ShardOutcomes,
    absorb_part,
    approved_masks,
    approved_only,
    check_folder_catalog,
    cut_shards,
    done_results,
    handoff_columns,
    initial_outcomes,
    pending_masks,
    planned_values,
    prepare,
    record_invocation,
    run_settings,
    set_aside_unreadable_parts,
    settings_changes,
    stage_input,
)
from catalogen.storage.store import STATUSES, RunFolderBusy
from flows.placement import Placement, Workers, cancel_remote, placement, record_workers
from tasks.runner import needs_device, relay, shard_task

# catalogen's loggers reach Prefect's console and API (PREFECT_LOGGING_EXTRA_LOGGERS=catalogen),
# and any other handler, also when the flow's code runs outside a flow run.
log = logging.getLogger("catalogen.flow")

DEMO_CATALOG = "catalogs/demo_prompts.parquet"
FAILED_ROWS_SHOWN = 10


@dataclass
class _InFlight:
    outcomes: ShardOutcomes
    stage: int  # index into the run's stages


def _submit_next(plan: RunPlan, outcomes: ShardOutcomes, start: int, masks,
                 where: Placement) -> tuple[PrefectFuture, int] | None:
    """Submit the shard's first stage from `start` on that has work for it; None when it is through."""
    for index in range(start, len(plan.config.stages)):
        stage = plan.config.stages[index]
        rows = stage_input(plan, stage, outcomes, masks)
        if rows is None:
            continue
        plan.store.write_shard_input(stage, outcomes.shard.name, rows)
        with where.submitting(needs_device(stage, plan.config)):
            return shard_task.submit(str(plan.store.root), stage, outcomes.shard.name), index
    return None


class _ShardProgress:
    """A Prefect progress artifact over (shard, stage) steps: a step counts once its stage finished
    (or crashed) on that shard, or once the shard passed it with nothing to do there."""

    def __init__(self, plan: RunPlan, shards: int) -> None:
        self.total = max(1, shards * len(plan.config.stages))
        self.done = 0
        self.artifact = create_progress_artifact(
            progress=0.0 if shards else 100.0, key=f"{artifact_key(plan.store.root)}-progress",
            description=f"(shard, stage) steps done of {self.total}, catalogen run into {plan.store.root}",
        )

    def advance(self, steps: int) -> None:
        if steps:
            self.done += steps
            update_progress_artifact(self.artifact, progress=round(100.0 * self.done / self.total, 2))


@dataclass
class _Driven:
    crashed: list[str]  # "stage/shard" of shards whose task failed
    stopped: bool = False  # a stop was asked for: rows not reached stay pending
    budget: str | None = None  # the budget setting that stopped it (catalogen/run/costs.py), if one did
    workers: Workers = field(default_factory=Workers)  # the processes that ran shards, and their model loads


class _Heartbeat:
    """One progress line per finished shard, or every `every` seconds while none finishes: what a
    worker's log or CI shows of a long run, where no progress bar is drawn."""

    def __init__(self, plan: RunPlan, masks, every: float = 30.0) -> None:
        self.plan, self.every = plan, every
        self.todo = {name: int(mask.sum()) for name, mask in masks.items()}
        self.done = dict.fromkeys(self.todo, 0)
        self.last = time.monotonic()

    def shard_done(self, stage: str, rows: int, in_flight: int) -> None:
        self.done[stage] += rows
        self.line(in_flight)

    def tick(self, in_flight: int) -> None:
        if time.monotonic() - self.last >= self.every:
            self.line(in_flight)

    def line(self, in_flight: int) -> None:
        self.last = time.monotonic()
        counts = ", ".join(f"{name} {self.done[name]}/{self.todo[name]}" for name in self.todo)
        log.info("progress: %s rows; %d shard(s) in flight", counts, in_flight)


def _over_budget(meter: Meter, in_flight: dict[PrefectFuture, _InFlight], grace: float,
                 starting: int | None = None) -> bool:
    """Whether a budget stops the run now: spent, or crossed by the shard of `starting` rows (see Meter.check)."""
    if meter.reached is not None:
        return True
    if meter.check([(len(s.outcomes.shard.rows), s.stage) for s in in_flight.values()], starting) is None:
        return False
    log.warning("budget.%s reached (%s of %s spent): no new shard starts; %d shard(s) in flight get up to %g s "
                "to finish", meter.reached, amount(meter.spent(meter.reached)), given(getattr(meter.budget, meter.reached)),
                len(in_flight), grace)
    stopping.STOPPING.set()  # as a signal does: shards waiting for a device do not start
    return True


def _drive(plan: RunPlan, masks, done, where: Placement, meter: Meter) -> _Driven:
    """Run every shard through its stages, at most `where.window` task runs at once.

    On a stop (SIGINT, SIGTERM, a Prefect cancel, a budget reached: `meter`) no new task starts;
    tasks in flight get `stop_grace_s` to finish, then are abandoned: they write no part, so their
    rows stay pending (tasks in other processes are cancelled with their futures).
    """
    shards = cut_shards(plan, masks)
    steps = len(plan.config.stages)
    progress = _ShardProgress(plan, len(shards))
    heartbeat = _Heartbeat(plan, masks)
    queue_ = iter(shards)
    in_flight: dict[PrefectFuture, _InFlight] = {}
    finished: queue.Queue[PrefectFuture] = queue.Queue()
    driven = _Driven(crashed=[])
    deadline = None

    def submit(outcomes: ShardOutcomes, start: int) -> int:
        """Submit the shard's next stage with work; returns the steps it passed without work."""
        submitted = _submit_next(plan, outcomes, start, masks, where)
        if submitted is None:
            return steps - start
        future, index = submitted
        in_flight[future] = _InFlight(outcomes, index)
        future.add_done_callback(finished.put)
        return index - start

    upcoming = next(queue_, None)  # the next shard to start
    grace = plan.config.stop_grace_s
    while True:
        if upcoming is not None and deadline is None and not stopping.STOPPING.is_set():
            _over_budget(meter, in_flight, grace)  # spent (wall time too), while shards wait to start
        if stopping.STOPPING.is_set() and deadline is None:
            deadline = time.monotonic() + grace
            driven.stopped = True
            driven.budget = meter.reached if stopping.signal_name() is None else None
            if driven.budget is None:
                log.warning("%s received: no new shard starts; %d shard(s) in flight get up to %g s to finish",
                            stopping.signal_name() or "stop", len(in_flight), grace)
        while deadline is None and upcoming is not None and len(in_flight) < where.window:
            if _over_budget(meter, in_flight, grace, len(upcoming.rows)):
                break
            progress.advance(submit(initial_outcomes(upcoming, done), 0))
            upcoming = next(queue_, None)
        if stopping.STOPPING.is_set() and deadline is None:
            continue  # a budget reached just now: the stop above takes it from here
        if not in_flight:
            return driven
        if deadline is not None and time.monotonic() >= deadline and not stopping.ABANDON.is_set():
            log.warning("abandoning %d shard(s) still in flight after %g s; their rows stay pending",
                        len(in_flight), plan.config.stop_grace_s)
            stopping.ABANDON.set()
            for future in cancel_remote(list(in_flight)):
                in_flight.pop(future)
            continue
        try:
            future = finished.get(timeout=0.5)
        except queue.Empty:
            heartbeat.tick(len(in_flight))
            continue
        state = in_flight.pop(future, None)
        if state is None:  # cancelled when abandoned
            continue
        stage = plan.config.stages[state.stage]
        name = state.outcomes.shard.name
        try:
            counts = future.result()
            relay(counts)
            if counts.get("abandoned"):
                continue  # given up at the stop: its rows stay pending; nothing after it starts
            part = plan.store.read_table(plan.store.part_path(stage, name))
            absorb_part(plan, state.outcomes, stage, part)
            meter.add(stage, part)
            # Removed here, not by the task: a task whose worker died after its part was written runs
            # again elsewhere, and must find its input (it writes the same part again).
            plan.store.shard_input_path(stage, name).unlink(missing_ok=True)
            rows = sum(counts.get(s, 0) for s in STATUSES)
            tracker.shard(stage, name, rows)  # the task's own reports stay in its process when that is a worker's
            driven.workers.add(counts)
            heartbeat.shard_done(stage, rows, len(in_flight))
        except Exception as exc:  # noqa: BLE001 - its rows read as failed in the results
            log.error("%s shard %s crashed: %s", stage, name, exc)
            driven.crashed.append(f"{stage}/{name}")
        if deadline is None:
            progress.advance(1 + submit(state.outcomes, state.stage + 1))


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
    if summary.get("near_duplicates"):
        lines += ["", f"{summary['near_duplicates']} ok row(s) repeat an earlier row's final image (pHash within "
                  f"{plan.config.duplicates.max_distance} bits; column `near_duplicate_of`, groups in the report)"]
    if summary.get("review"):
        counts = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in summary["review"].items())
        lines += ["", f"**Review**: {counts}" + (f"; {review_line(summary)}" if review_line(summary) else "")]
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


def _stage_table(summary: dict[str, Any], results) -> list[dict[str, Any]]:
    """Rows per stage and status, and the stage's seconds: the table artifact."""
    table = []
    for stage, counts in summary["stages"].items():
        seconds = results.column(f"{stage}_seconds").to_pylist()
        table.append({"stage": stage, **{s: counts.get(s, 0) for s in STATUSES},
                      "seconds": round(sum(v for v in seconds if v is not None), 2)})
    return table


def _with_duplicates(plan: RunPlan, results, hash_new: bool):
    """The results with `phash` and `near_duplicate_of` (catalogen/media/duplicates.py): the final images
    not hashed by the results this run replaces are decoded once; a stopped run hashes none (it has
    its grace period to finish), and a stop while hashing ends it: the rest is left to the next run.
    Failing here is logged, not fatal."""
    max_distance = plan.config.duplicates.max_distance
    try:
        previous = previous_hashes(plan.store.results_path)
        results, counts = add_duplicate_columns(results, plan.store.read_bytes, max_distance, previous, hash_new,
                                                stop=stopping.STOPPING.is_set)
    except Exception as exc:  # noqa: BLE001 - the results stand without the columns
        log.error("could not look for near-duplicates in %s: %s: %s", plan.store.root, type(exc).__name__, exc)
        return results
    if max_distance is not None:
        log.info("near-duplicates (pHash within %d bits): %d row(s); %d image(s) hashed, %d reused%s%s",
                 max_distance, counts["near_duplicates"], counts["hashed"], counts["reused"],
                 f", {counts['unreadable']} unreadable" if counts["unreadable"] else "",
                 f", {counts['not_hashed']} left for the next run" if counts["not_hashed"] else "")
    return results


def _assembled(plan: RunPlan, driven: _Driven, leave_out: list[str] | None = None):
    """The results with near-duplicates and the run's own selection and gates (catalogen/review/select.py),
    judged without the stages that wait for them (`leave_out`)."""
    results = assemble_results(plan, pending_label="pending" if driven.stopped else None, leave_out=leave_out or ())
    results = _with_duplicates(plan, results, hash_new=not driven.stopped)
    return decide(results, plan.config.select, plan.config.review, datetime.now(timezone.utc))


def _approved_stages(plan: RunPlan, masks, results, driven: _Driven, where: Placement, meter: Meter):
    """Run the `only: approved` stages over the rows approved now (the gates, then reviewers'
    decisions); the other pending rows are recorded as held back. Returns the results with them."""
    try:
        now = apply_decisions(results, latest(read_decisions(plan.store)))
    except DecisionError as exc:  # the run's own states decide; the bad file is named
        log.error("could not read the review decisions in %s: %s; the run's gates decide", plan.store.root, exc)
        now = results
    approved = planned_values(plan, now, "review_state") == "approved"
    done = {name: done_results(plan, name, ["error", *handoff_columns(plan, name)]) for name in plan.config.stages}
    second = approved_masks(plan, masks, done, approved)
    if not any(mask.any() for mask in second.values()):
        return _with_columns_of(assemble_results(plan), results)
    log.info("%s: %d approved row(s) to make, %d held back until approved", ", ".join(approved_only(plan.config)),
             int(sum((m & approved).sum() for m in second.values())), int(sum((m & ~approved).sum() for m in second.values())))
    more = _drive(plan, second, done, where, meter)
    driven.budget = driven.budget or more.budget
    driven.crashed += more.crashed
    driven.stopped |= more.stopped
    driven.workers.merge(more.workers)
    return _with_columns_of(assemble_results(plan, pending_label="pending" if driven.stopped else None), results)


def _with_columns_of(full, judged):
    """The whole results with the near-duplicate and review columns of those judged before the gated
    stages ran (their final images are the same; a rendition changes no choice)."""
    if full.num_rows != judged.num_rows:  # a trial's rows: the same plan and scope, so never expected
        raise RuntimeError(f"results of {full.num_rows} rows, judged on {judged.num_rows}")
    for name in [*(n for n, _ in DUPLICATE_COLUMNS), *REVIEW_SCHEMA.names]:
        if name in judged.column_names:
            full = full.append_column(judged.schema.field(name), judged.column(name))
    return full.replace_schema_metadata(judged.schema.metadata)


def _review_counts(plan: RunPlan, results) -> dict[str, int]:
    """Rows per review state as of now: the run's selection and gates with reviewers' decisions over them."""
    try:
        return state_counts(apply_decisions(results, latest(read_decisions(plan.store))))
    except DecisionError as exc:  # the run's own states stand; the page reports the bad file
        log.error("could not read the review decisions in %s: %s", plan.store.root, exc)
        return state_counts(results)


def review_line(summary: dict[str, Any]) -> str:
    """`3 row(s) need review: catalogen review <folder>`, or '' when none does."""
    waiting = summary.get("review", {}).get("needs_review", 0)
    return f"{waiting} row(s) need review: {review_command(summary['out'])}" if waiting else ""


def _record_throughput(plan: RunPlan, results, started, workers: Workers) -> None:
    """Seconds and bytes per row and load seconds, per stage and device kind, into run.json and the
    shared store beside the model cache (what `run --dry-run` prices with); one that cannot be
    recorded is logged, not fatal."""
    try:
        record_throughput(plan, results, started, workers.stage_loads())
    except Exception as exc:  # noqa: BLE001 - the run's outputs are complete without it
        log.warning("could not record throughput in %s: %s: %s", plan.store.run_json, type(exc).__name__, exc)


def _record_folder_files(plan: RunPlan, results) -> None:
    """Bytes per row of the folder's own files, into the shared store (`run --dry-run` counts them)."""
    try:
        record_folder_files(plan, results)
    except Exception as exc:  # noqa: BLE001 - the run's outputs are complete without it
        log.warning("could not measure the files of %s: %s: %s", plan.store.root, type(exc).__name__, exc)


def _write_report(plan: RunPlan) -> Path | None:
    """report.html; a report that cannot be written is logged, not fatal: the results stand."""
    try:
        return write_report(plan.store.root)
    except Exception as exc:  # noqa: BLE001 - the run's outputs are complete without it
        log.error("could not write the report into %s: %s: %s", plan.store.root, type(exc).__name__, exc)
        return None


def _report_artifacts(plan: RunPlan, results, summary: dict[str, Any], report: Path | None) -> None:
    key = artifact_key(plan.store.root)
    create_table_artifact(key=f"{key}-stages", table=_stage_table(summary, results),
                          description=f"rows per stage and status, catalogen run into {plan.store.root}")
    if report is not None:
        uri = report.resolve().as_uri()
        create_markdown_artifact(key=f"{key}-report", markdown=f"### catalogen report\n\n[{report}]({uri})\n",
                                 description=f"report of the catalogen run into {plan.store.root}")


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _log_at_prefects_level() -> None:
    """catalogen's lines reach the flow run's logs: Prefect gives its extra loggers handlers but no
    level, so they would inherit the root's WARNING and drop every INFO line (plan, progress)."""
    ours = logging.getLogger("catalogen")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.getLogger("prefect.extra").getEffectiveLevel())


def project_path(value: str | None) -> str | None:
    """A relative path of a deployment's parameters, from the project root (a worker may start the
    flow in any folder), or from the working directory where it exists there; made absolute, so
    every line that names it is the same wherever the flow ran. The CLI passes absolute paths."""
    if value is None or "://" in value or Path(value).is_absolute():
        return value
    return str(Path(value).absolute() if Path(value).exists() else PROJECT_ROOT / value)


class RunOutcome(Exception):
    """A Failed or Cancelled run's summary, carried as its state's data. Prefect turns a failed or
    cancelled state's data into the exception it raises at the end of a deployment's run: a plain
    dict there ends in a TypeError traceback in the worker's log."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def run_summary(state: Any) -> Any:
    """The summary a run of this flow returned, whatever its final state (or the exception it raised)."""
    value = state.result(raise_on_failure=False)
    return value.summary if isinstance(value, RunOutcome) else value


def outcome_line(summary: dict[str, Any]) -> str:
    """`25 rows: 23 ok (2 degenerate: captions flagged as useless), 1 failed, 1 skipped`: the counts a
    final state carries, each note with what it means."""
    notes = [f"{summary[k]} {k}: {meaning}" for k, meaning in NOTE_MEANINGS.items() if summary.get(k)]
    ok = f"{summary['ok']} ok" + (f" ({'; '.join(notes)})" if notes else "")
    line = f"{summary['rows']} rows: {ok}, {summary['failed']} failed, {summary['skipped']} skipped"
    return line + (f", {summary['pending']} pending" if summary.get("pending") else "")


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
    regenerate_rejected: bool = False,
) -> Any:
    """Run every configured stage over the catalog's pending rows and write results.parquet.

    Relative paths start at the project root. Without `config`, an existing output folder's
    recorded settings are used (then `overrides`). Ends Completed when every row succeeded, or when
    its `budget:` stopped it (the message: `budget reached: …; run again to continue`), Failed
    when any failed, Cancelled when stopped (SIGINT, SIGTERM, a cancel from the Prefect API) or
    when another run holds the folder; the state's message carries the counts.

    Args:
        catalog: Parquet (or CSV / JSON Lines) catalog.
        out: output folder; default outputs/<catalog name>-<path hash>-<profile>.
        config: YAML run configuration; default: the folder's recorded settings, else the defaults.
        profile: model profile (tiny, tiny-sdxl, sd15, sdxl); overrides the config file.
        overrides: dotted settings, e.g. {"generate.steps": 30}; override the config file.
        retry_failed: recompute rows whose last attempt failed.
        new_catalog: allow a catalog other than the one the output folder was made from.
        limit: run only the catalog's first N rows (rows done earlier stay in the results).
        sample: run only N rows picked by a seeded hash of their ids.
        origins: where each override came from (e.g. "--profile"), for messages and run.json.
        regenerate_rejected: remake each row a reviewer asked to regenerate as a new variant
            (catalogen/review/regenerate.py); only those rows are computed.
    """
    settings = dict(overrides or {})
    named = dict(origins or {})
    if profile is not None:
        settings["profile"] = profile
        named.setdefault("profile", "the flow's profile parameter")
    _log_at_prefects_level()
    catalog, out, config = project_path(catalog), project_path(out), project_path(config)
    cfg, store, recorded = run_settings(catalog, out, config, settings, named)
    try:
        check_budget(cfg, visible_devices(cfg.device))
    except ConfigError as exc:  # a deployment's settings: one line in its state, no traceback
        log.error("%s; this run did nothing", exc)
        return Failed(message=f"{exc}; this run did nothing")
    if regenerate_rejected:
        for entry in record_regenerations(store):
            log.info("regenerate %s: variant %d (from variant %d%s)", entry["id"], entry["variant"],
                     entry["from_variant"], f", note {entry['note']!r}" if entry["note"] else "")
    plan = prepare(catalog, cfg, store.root, Selection(limit, sample))
    try:
        with stopping.on_signals(), plan.store.exclusive():
            summary, report = _run(plan, retry_failed, new_catalog, settings_changes(recorded, cfg))
    except RunFolderBusy as exc:
        log.error("%s; this run did nothing", exc)
        return Cancelled(message=f"{exc}; this run did nothing")
    except LeaseLost as exc:  # the folder may be another run's now: its results were not written
        return Failed(message=str(exc), data=exc)
    line = outcome_line(summary)
    log.info("report: %s", report) if report else log.info("results: %s", plan.store.results_path)
    if summary["stopped"]:
        message = stop_line(plan)
        return Cancelled(message=message, data=RunOutcome(message, summary))
    if summary["failed"] or summary["crashed_shards"]:
        message = f"{summary['failed']} of {summary['rows']} rows failed"
        if summary["crashed_shards"]:
            message += f" ({summary['crashed_shards']} shard(s) crashed)"
        message = f"{message}: {line}; see {plan.store.results_path}"
        return Failed(message=message, data=RunOutcome(message, summary))
    waiting = review_line(summary)
    line = summary.get("budget") or line
    return Completed(message=f"{line}; {waiting}" if waiting else line, data=summary)


def stop_line(plan: RunPlan) -> str:
    """`stopped: 4 of 25 rows finished; generate kept 8, caption 4; run the same command to continue`:
    what the parts on disk hold when it is written (what the same command then skips)."""
    finished, rows, stages = kept(plan)
    counts = [f"{name} {'kept ' if not index else ''}{n}" for index, (name, n) in enumerate(stages.items())]
    return f"stopped: {finished} of {rows} rows finished; {', '.join(counts)}; run the same command to continue"


def _run(plan: RunPlan, retry_failed: bool, new_catalog: bool, changes: list[str]) -> tuple[dict[str, Any], Path | None]:
    """The run inside the folder's lock: plan what is pending, drive the shards, write results and report."""
    cfg = plan.config
    stopping.set_grace(cfg.stop_grace_s)
    check_folder_catalog(plan.store, plan.catalog_path, new_catalog)
    plan.store.clear_leftovers()
    for moved in set_aside_unreadable_parts(plan):
        log.warning("set aside %s: it cannot be read; its rows will be computed again", moved)
    done = {name: done_results(plan, name, ["error", *handoff_columns(plan, name)]) for name in cfg.stages}
    masks = pending_masks(plan, retry_failed, done)
    pending = {name: int(mask.sum()) for name, mask in masks.items()}
    record_invocation(plan, pending, retry_failed)
    scope = int(plan.in_scope().sum())
    trial = f" (trial: {plan.selection.describe()}, {scope} of {plan.rows.num_rows} rows)" if plan.selection else ""
    todo = ", ".join(f"{name} {n} of {scope} rows pending" for name, n in pending.items())
    log.info("plan for %s%s: %s", plan.store.root, trial, todo)
    if changes:
        log.warning("settings changed since the folder's last run: %s; so %s", "; ".join(changes), todo)
    for name in cfg.stages:
        tracker.begin(name, scope)
        tracker.shard(name, "(done before)", scope - pending[name])
    started = datetime.now(timezone.utc)
    meter = Meter(cfg.budget, cfg.stages)
    where = placement(cfg)
    gated = approved_only(cfg)
    plan.held = {}
    driven = _drive(plan, {n: m & (n not in gated) for n, m in masks.items()}, done, where, meter)
    results = _assembled(plan, driven, gated)
    if gated and not driven.stopped:  # the stages that wait for review states: renditions.only approved
        results = _approved_stages(plan, masks, results, driven, where, meter)
    if driven.budget is not None and stopping.signal_name() is None:
        stopping.reset()  # the budget's stop is over: a later run in this process starts unstopped
    record_workers(plan.store, driven.workers)
    record_costs(plan.store, meter)
    for name in cfg.stages:
        tracker.end(name)
    plan.store.write_results(results)
    _record_throughput(plan, results, started, driven.workers)
    plan.store.clear_leftovers()
    report = _write_report(plan)
    _record_folder_files(plan, results)
    summary = {**summarize(results, cfg.stages), "out": str(plan.store.root), "crashed_shards": len(driven.crashed),
               "pending_before": pending, "report": str(report) if report else None,
               "stopped": driven.stopped and driven.budget is None}  # a budget's stop is no interruption
    summary["pending"] = int(pc.sum(pc.equal(results.column("status"), "pending")).as_py() or 0)
    summary["costs"] = meter.totals()
    if driven.budget is not None and summary["pending"]:
        limit = getattr(cfg.budget, driven.budget)
        summary["budget"] = budget_line(driven.budget, meter.spent(driven.budget), limit, summary["pending"], summary["rows"])
        log.warning("%s", summary["budget"])
    summary["review"] = _review_counts(plan, results)
    for name, counts in summary["stages"].items():
        if pending[name] == 0:
            log.info("%s: nothing to do (%s)", name, ", ".join(f"{n} {s}" for s, n in counts.items()) or "no rows")
    create_markdown_artifact(key=artifact_key(plan.store.root), markdown=_artifact(plan, results, summary),
                             description=f"catalogen run into {plan.store.root}")
    _report_artifacts(plan, results, summary, report)
    log.info("done: %s%s", outcome_line(summary), f"; {review_line(summary)}" if review_line(summary) else "")
    return summary, report
