"""The `catalogen` command: validate a catalog, prepare models, run the flow, inspect a run folder.

Exit codes: 0 done; 1 the catalog, configuration, device or models cannot be used (nothing was
written), or the output folder is busy or belongs to another catalog; 2 a usage error; 3 the run
finished but some rows failed (their reasons are in results.parquet).
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

import catalogen
from catalogen.catalog import CatalogError
from catalogen.config import (
    PROFILES,
    ConfigError,
    RunConfig,
    load_config,
    parse_override,
)
from catalogen.run.devices import DeviceError
from catalogen.publish.export import FORMATS, ExportError, ExportOptions, export_run, parse_split, parse_where
from catalogen.storage.locations import Location, LocationError, absolute, display, is_remote, location, storage_folder
from catalogen.models.loading import MissingModelsError, ModelError, resolve_models
from catalogen.run.progress import set_reporter
from catalogen import registry, stopping
from catalogen.run.prefect_api import PrefectAPI, prefect_environment, start_prefect_api
from catalogen.run.plan import (
    CatalogChanged,
    RunPlan,
    Selection,
    check_folder_catalog,
    prepare,
    repeat_trial_command,
    rerun_command,
    run_settings,
)
from catalogen.storage.store import RunFolderBusy, RunStateError, RunStore

EXIT_CODES = (
    "Exit codes: 0 done; 1 refused before anything was written (catalog, configuration, device, models), "
    "or the output folder is busy or belongs to another catalog; 2 usage error; 3 the run finished but "
    "some rows failed (see the error column of results.parquet)."
)
REFUSALS = (CatalogError, ConfigError, DeviceError, MissingModelsError, ModelError, RunFolderBusy, RunStateError,
            CatalogChanged)

app = typer.Typer(
    help=f"Turn Parquet catalogs into images with full provenance.\n\n{EXIT_CODES}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Download or build the models a profile uses.", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run configuration.", dir_okay=False)
ProfileOpt = typer.Option(None, "--profile", "-p", help=f"Model profile: {', '.join(PROFILES)} (default tiny).")
SetOpt = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE",
    help="Override any setting, e.g. --set generate.steps=30 --set generate.scheduler=euler_a (repeatable).",
)


def _located(value: str, option: str | None = None) -> Location:
    """A catalog (`option` None) or a folder named by `option` as a location, or one line saying why it
    cannot be one (an http:// folder, an s3:// URL without a bucket), before any request is made."""
    try:
        return storage_folder(value, option) if option else location(value)
    except LocationError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


def _catalog(value: str) -> str:
    _located(value)
    return value


def _out_folder(value: str | None) -> str | None:
    if value is not None:
        _located(value, "--out")
    return value


def _run_folder(value: str) -> str:
    """A run folder's path or URL; a local one must be an existing folder (a bucket is asked later).
    Refused in one line, exit 1, as a folder without run.json is (not a usage error)."""
    folder = _located(value, "RUN")
    if not is_remote(folder) and not folder.is_dir():
        _fail(f"{absolute(folder)} is not a folder" if folder.exists() else f"{absolute(folder)} does not exist")
    return value


RunArg = typer.Argument(..., help="A run folder (what `catalogen run` wrote): a path, or a URL such as s3://bucket/run.",
                        callback=_run_folder)


def _absolute(value: str) -> Location:
    """A path made absolute (the flow may run elsewhere), or a URL as given."""
    where = location(value)
    return where if is_remote(where) else where.absolute()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"catalogen {catalogen.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Turn Parquet catalogs into images with full provenance."""


def _fail(exc: Exception | str) -> None:
    err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
    raise typer.Exit(1)


def _settings(items: list[str] | None, **named: tuple[Any, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Overrides from --set items and named flags, and where each came from (flags win)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for item in items or []:
        key, value = parse_override(item)
        values[key] = value
        origins[key] = f"--set {item}"
    for key, (value, flag) in named.items():
        if value is not None:
            values[key] = value
            origins[key] = f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"
    return values, origins


def _require_run(run_dir: str) -> None:
    """Refuse a folder that `catalogen run` did not make, before anything (a lock file) is created in it."""
    try:
        made = RunStore(run_dir).is_run()
    except RunStateError as exc:
        _fail(exc)
    if not made:
        _fail(f"{absolute(location(run_dir))} is not a catalogen run folder (no run.json)")


def _config(config: Optional[Path], items: list[str] | None, **named: tuple[Any, str]) -> RunConfig:
    try:
        overrides, origins = _settings(items, **named)
        return load_config(config, overrides, origins)
    except ConfigError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


@app.command()
def validate(
    catalog: str = typer.Argument(..., help="Parquet, CSV, TSV or JSON Lines catalog (optionally .gz): a path or a URL.", callback=_catalog),
    config: Optional[Path] = ConfigOpt,
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Check a catalog against a configuration; list every fault by column and row id. Writes nothing."""
    cfg = _config(config, set_, profile=(profile, "--profile"))
    from catalogen.run.plan import config_faults, faults_error, load_checked_catalog, plan_rows, review_faults

    try:
        problems = config_faults(cfg)
        if problems:
            raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        table = load_checked_catalog(catalog, cfg)
        if review_faults(cfg, table.schema):
            raise faults_error(review_faults(cfg, table.schema))
    except (CatalogError, ConfigError) as exc:
        _fail(exc)
    images = plan_rows(table, cfg).num_rows
    typer.echo(f"{catalog}: ok, {table.num_rows} ids, {images} rows to make with profile {cfg.profile} "
               f"through {' -> '.join(cfg.stages)}")


@models_app.command("prepare")
def models_prepare(
    profile: str = typer.Option("tiny", "--profile", "-p", help=f"One of {', '.join(PROFILES)}."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Build the tiny models, or download a real profile's models (safetensors only) into the Hugging Face cache."""
    cfg = _config(config, set_, profile=(profile, "--profile"))
    # The tiny profile is one family: prepare its SD1.5- and SDXL-shaped models together.
    names = [p for p in PROFILES if p.startswith("tiny")] if cfg.profile.startswith("tiny") else [cfg.profile]
    specs = {}
    for name in names:
        variant = cfg.model_copy(update={"profile": name})
        for stage, module in registry.stages().items():
            for role, spec in module.models(variant).items():
                specs[f"{stage}.{role} ({spec.repo})"] = spec
    try:
        identities = resolve_models(specs, cfg)
    except (MissingModelsError, ModelError) as exc:
        _fail(exc)
    for label, identity in identities.items():
        typer.echo(f"{label}: {identity.repo} @ {identity.revision}\n  {identity.path}")


def _log_above(console: Console) -> None:
    """Print Prefect's console logs through `console`, so they land above the progress bar
    instead of through it (Prefect's handler writes to the terminal on its own otherwise)."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    if not PROCESS_LOGGING_CONFIG:  # configure once per process: a second call would replace every handler
        setup_logging()
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for handler in (h for lg in loggers for h in getattr(lg, "handlers", [])):
        if isinstance(handler, PrefectConsoleHandler):
            handler.console = console


class _RichReporter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def begin(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=total)

    def advance(self, stage: str, done: int) -> None:
        self.progress.update(self.tasks[stage], completed=done)

    def end(self, stage: str) -> None:
        self.progress.refresh()


def _refuse_if_busy(store: RunStore) -> None:
    holder = store.holder()
    if holder:
        raise RunFolderBusy(f"{store.root} is in use by another run ({holder})")


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


@app.command(epilog=EXIT_CODES)
def run(
    catalog: str = typer.Argument(..., help="Parquet, CSV, TSV or JSON Lines catalog (optionally .gz): a path, or a URL such as s3://bucket/catalog.parquet.", callback=_catalog),
    config: Optional[Path] = typer.Option(None, "--config", "-c", dir_okay=False, help="YAML run configuration (default: the settings the output folder was last run with, else the defaults)."),
    profile: Optional[str] = ProfileOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", callback=_out_folder, help="Output folder, a path or a URL such as s3://bucket/run (default outputs/<catalog>-<path hash>-<profile>)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Recompute rows whose last attempt failed."),
    regenerate_rejected: bool = typer.Option(False, "--regenerate-rejected", help="Remake each row a reviewer asked to regenerate, as a new variant: the next seed, the decision's note appended to the prompt; only those rows are computed."),
    new_catalog: bool = typer.Option(False, "--new-catalog", help="Run a catalog other than the one the output folder was made from (its results are replaced)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Trial run: only the catalog's first N rows (rows done earlier stay in the results)."),
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Trial run: N rows picked by a seeded hash of their ids (the same N rows every time)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run, in order (setting `stages`)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed; rows without a seed column derive theirs from it."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Rows per Prefect task run (default 64)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per pipeline call of the generate stage (default 4)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (every visible GPU, else CPU), cpu, cuda or cuda:N."),
    offline: bool = typer.Option(False, "--offline", help="Never contact the Hub; fail fast if a model is missing."),
    runner: Optional[str] = typer.Option(None, "--runner", help="threads (shards in this process, the default) or dask (in the worker processes of a Dask cluster)."),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", metavar="tcp://HOST:8786", help="With --runner dask: the scheduler of a running cluster (default: start a local one)."),
    dask_workers: Optional[int] = typer.Option(None, "--dask-workers", min=1, help="With --runner dask and no address: worker processes of the local cluster (default: one per GPU, else 2)."),
    set_: Optional[list[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and plan as a run does, write nothing; print per stage the rows to do, images to make, estimated time and disk."),
    calibrate: bool = typer.Option(False, "--calibrate", help="With --dry-run, where no earlier run measured this device: time one batch of the first rows in a temporary folder (loads the models)."),
) -> None:
    """Run every stage over each pending row of CATALOG; re-running the same command resumes.

    Ctrl-C or SIGTERM stops it: no new shard starts, shards in flight get `stop_grace_s` to
    finish, results and the report are written for what is done (exit 130 / 143).
    """
    named = {
        "profile": (profile, "--profile"), "seed": (seed, "--seed"), "rows_per_shard": (rows_per_shard, "--rows-per-shard"),
        "device": (device, "--device"), "offline": (offline or None, "--offline"),
        "generate.batch_size": (batch_size, "--batch-size"), "runner": (runner, "--runner"),
        "dask.address": (dask_address, "--dask-address"), "dask.workers": (dask_workers, "--dask-workers"),
        "stages": ([s.strip() for s in stages.split(",") if s.strip()] if stages else None, "--stages"),
    }
    if limit is not None and sample is not None:
        raise typer.BadParameter("give --limit or --sample, not both", param_hint="--limit / --sample")
    if calibrate and not dry_run:
        raise typer.BadParameter("--calibrate goes with --dry-run", param_hint="--calibrate")
    if dry_run:
        _dry_run(_absolute(catalog), config, _absolute(out) if out else None,
                 Selection(limit, sample), retry_failed, new_catalog, named, set_, calibrate)
        return
    try:
        _run(_absolute(catalog), config, _absolute(out) if out else None,
             Selection(limit, sample), retry_failed, new_catalog, named, set_, regenerate_rejected)
    except KeyboardInterrupt:  # Ctrl-C while checking and planning, before any row started
        err.print("stopped before any row started; run the same command again to start")
        raise typer.Exit(130) from None


def _one_batch(catalog: Location, cfg: RunConfig) -> Callable[[], Any]:
    """The dry run's calibration: one batch through every stage in a temporary folder (flows/calibrate.py)."""
    def measure() -> Any:
        from flows.calibrate import CalibrationStopped, calibrate

        try:
            return calibrate(catalog, cfg)
        except CalibrationStopped as exc:  # as a stopped run ends: 130 / 143
            err.print(str(exc), soft_wrap=True, highlight=False)
            raise typer.Exit(stopping.exit_code()) from None
    return measure


def _dry_run(catalog: Location, config: Path | None, out: Location | None, selection: Selection, retry_failed: bool,
             new_catalog: bool, named: dict[str, tuple[Any, str]], set_: list[str] | None,
             calibrate: bool = False) -> None:
    """`run --dry-run`: the checks and plan of a run, and what it would do; nothing is written."""
    from catalogen.run.dryrun import plan_only

    try:
        if out is not None:
            RunStore(out).check_usable()
        overrides, origins = _settings(set_, **named)
        cfg, store, recorded = run_settings(catalog, out, config, overrides, origins)
        plan = prepare(catalog, cfg, store.root, selection)
        check_folder_catalog(store, catalog, new_catalog)
        lines = plan_only(plan, recorded, retry_failed, _one_batch(catalog, cfg) if calibrate else None)
    except REFUSALS as exc:
        _fail(exc)
    holder = store.holder()
    typer.echo("\n".join(lines + ([f"note: a run holds {store.root} now ({holder})"] if holder else [])))


def _run(catalog: Location, config: Path | None, out: Location | None, selection: Selection, retry_failed: bool,
         new_catalog: bool, named: dict[str, tuple[Any, str]], set_: list[str] | None,
         regenerate_rejected: bool = False) -> None:
    prefect_environment()
    api = PrefectAPI()
    try:
        if out is not None:
            RunStore(out).check_usable()
            _refuse_if_busy(RunStore(out))  # at once, before anything starts
        api = start_prefect_api()  # seconds of start-up, overlapped with planning a large catalog
        overrides, origins = _settings(set_, **named)
        cfg, store, _ = run_settings(catalog, out, config, overrides, origins)
        _check_budget(cfg)
        _refuse_if_busy(store)
        plan = prepare(catalog, cfg, store.root, selection)  # remembered: the flow reuses it
        check_folder_catalog(store, catalog, new_catalog)
    except REFUSALS as exc:
        api.abandon()
        _fail(exc)
    url = api.ready()
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.run import catalogen_run
    from flows.runners import with_runner

    _log_above(err)
    # No "View at" link to a temporary server that is gone when the command ends.
    settings = {PREFECT_API_URL: url, PREFECT_UI_URL: ""} if url else {}
    progress = _progress_bar() if err.is_terminal else None
    set_reporter(_RichReporter(progress) if progress else None)
    stopping.reset()
    try:
        with stopping.on_signals(), store.exclusive(), progress or nullcontext(), temporary_settings(settings):
            state = with_runner(catalogen_run, cfg)(
                catalog=str(catalog), out=str(store.root), config=str(config) if config else None,
                overrides=overrides, origins=origins, retry_failed=retry_failed, new_catalog=new_catalog,
                regenerate_rejected=regenerate_rejected,
                limit=selection.limit, sample=selection.sample, return_state=True,
            )
    except (RunFolderBusy, RunStateError, ConfigError) as exc:
        _fail(exc)
    finally:
        set_reporter(None)
    _finish(state, store, plan, cfg.profile)


def _check_budget(cfg: RunConfig) -> None:
    """A cost budget needs a price for the run's devices: refused here, before the flow starts."""
    from catalogen.run.costs import check_budget
    from catalogen.run.devices import visible_devices

    check_budget(cfg, visible_devices(cfg.device))


def _finish(state: Any, store: RunStore, plan: RunPlan, profile: str) -> None:
    """Print the outcome, the report last; exit with the code the README gives for it. A stop's
    line counts the parts on disk now, once every worker is gone."""
    from catalogen.models.tiny.profile import profile_note
    from flows.run import outcome_line, review_line, run_summary, stop_line

    summary = run_summary(state)
    if isinstance(summary, BaseException) and not state.is_cancelled():
        _fail(summary)
    if not isinstance(summary, dict):  # cancelled before it ran: another run holds the folder
        _fail(state.message or "the run was cancelled")

    typer.echo(outcome_line(summary))
    if review_line(summary):
        typer.echo(review_line(summary))
    if profile_note(profile):
        typer.echo(profile_note(profile))
    typer.echo(f"results: {display(location(summary['out']) / 'results.parquet')}")
    code = 0
    if summary.get("budget"):  # stopped by its budget: done for tonight, exit 0
        typer.echo(summary["budget"])
    if summary.get("stopped"):
        err.print(stop_line(plan), soft_wrap=True, highlight=False)
        code = stopping.exit_code()
    elif summary["failed"]:
        err.print(f"[yellow]some rows failed; see the error column, and redo them with:[/] "
                  f"{rerun_command(store, '--retry-failed')}", soft_wrap=True, highlight=False)
        code = 3
    if summary.get("report"):
        typer.echo(f"report: {absolute(location(summary['report']))}")
    raise typer.Exit(code)


@app.command()
def status(run_dir: str = RunArg) -> None:
    """Done, failed and pending rows per stage, from the run folder alone (no model, no Prefect)."""
    _require_run(run_dir)
    from catalogen.run.costs import spending_lines
    from catalogen.run.inspect import folder_status

    try:
        report = folder_status(RunStore(run_dir))
    except RunStateError as exc:
        _fail(exc)
    trial = report["trial"]
    scope = f"trial subset ({trial['selection']}): {trial['rows']} of {report['rows']} rows" if trial else f"{report['rows']} rows"
    table = Table(title=f"{display(run_dir)} ({scope}, catalog {report['catalog']})")
    for column in ("stage", "ok", "fallback", "degenerate", "failed", "skipped", "pending"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, counts in report["stages"].items():
        table.add_row(stage, *(str(counts.get(c, 0)) for c in ("ok", "fallback", "degenerate", "failed", "skipped", "pending")))
    Console().print(table)
    if report.get("review"):
        counts = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in report["review"].items())
        typer.echo(f"review: {counts}" + (f"; decide: catalogen review {display(run_dir)}" if report["review"]["needs_review"] else ""))
    typer.echo(f"running now: {report['running']}" if report["running"] else "not running")
    store = RunStore(run_dir)
    for line in spending_lines(store.read_run_json()):
        typer.echo(line)
    if any(counts.get("failed") for counts in report["stages"].values()):
        typer.echo(f"redo the failed rows: {rerun_command(store, '--retry-failed')}")
    elif any(counts.get("pending") for counts in report["stages"].values()) and not report["running"]:
        if trial:  # its own selection would plan the trial's rows again, all done: nothing
            typer.echo(f"make the rest of the catalog in this folder: {rerun_command(store, trial=False)}")
            typer.echo(f"repeat the trial in a new folder, with these settings: {repeat_trial_command(store)}")
        else:
            typer.echo(f"make the pending rows: {rerun_command(store)}")


@app.command()
def unlock(
    run_dir: str = RunArg,
    yes: bool = typer.Option(False, "--yes", help="Remove the lease without asking."),
) -> None:
    """Remove a bucket run folder's lease that no run will release: one that cannot be read, or whose
    holder will not come back. Shows it and asks first; exit 1 when nothing was removed.

    A local folder's lock ends with the process that holds it: there is nothing to remove.
    """
    from catalogen.storage import lease

    store = RunStore(run_dir)
    lock = store.root / ".lock"
    if not store.remote:
        holder = store.holder()
        if holder:
            _fail(f"{run_dir} is held by a running process ({holder}); its lock ends with that process: stop it")
        typer.echo(f"no run holds {run_dir}; nothing to unlock")
        return
    try:
        found = lease.inspect(lock)
        if found is None:
            typer.echo(f"no run holds {run_dir}; nothing to unlock")
            return
        typer.echo(found[0])
        if not yes and not typer.confirm("Remove it? Only when no run is writing into this folder", default=False):
            typer.echo("nothing removed")
            raise typer.Exit(1)
        if not lease.remove(lock, found[1]):
            _fail(f"{lock} changed while you were asked; nothing removed (run unlock again to see it)")
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend has its own errors
        _fail(f"{lock} cannot be read or removed: {type(exc).__name__}: {exc}")
    typer.echo(f"removed {lock}")


@app.command()
def verify(run_dir: str = RunArg) -> None:
    """Re-hash every image; mark missing or changed ones failed, so `run --retry-failed` redoes them."""
    _require_run(run_dir)
    from catalogen.run.inspect import verify_images

    store = RunStore(run_dir)
    try:
        with store.exclusive(), _LateBar("verify") as bar:
            bad, still_marked = verify_images(store, bar)
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    for row in bad[:20]:
        typer.echo(f"{row['stage']}: {row['id']} v{row['variant']}: {row['error']}")
    redo = f"redo them with: {rerun_command(store, '--retry-failed')}"
    if bad:
        typer.echo(f"{len(bad)} image(s) missing or changed, now marked failed; {redo}")
    if still_marked:
        typer.echo(f"{still_marked} row(s) marked failed by an earlier verify are not redone yet; {redo}")
    if bad or still_marked:
        raise typer.Exit(3)
    typer.echo("every image matches its recorded sha256")


@app.command()
def clean(
    run_dir: str = RunArg,
    yes: bool = typer.Option(False, "--yes", help="Remove the files listed (default: only list them)."),
) -> None:
    """List (and with --yes remove) images that no row of results.parquet points at."""
    _require_run(run_dir)
    from catalogen.run.inspect import orphan_images

    store = RunStore(run_dir)
    try:
        with store.exclusive():
            orphans = orphan_images(store)
            size = sum(bytes_ for _, bytes_ in orphans)
            for path, _ in orphans:
                typer.echo(absolute(store.root / path))
                if yes:
                    store.delete(path)
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    if yes:
        typer.echo(f"removed {len(orphans)} image(s), {size / 2**20:.1f} MB")
    else:
        typer.echo(f"{len(orphans)} image(s), {size / 2**20:.1f} MB, that no row points at; --yes removes them")


@app.command()
def report(
    run_dir: str = RunArg,
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Threads making thumbnails (default: up to 8)."),
) -> None:
    """Write report.html (summary, error reasons, a paged gallery) into a run folder; print its path.

    Open it from the folder or from object storage: it is static, with relative links only.
    Thumbnails go to thumbs/, made once per image.
    """
    _require_run(run_dir)
    from catalogen.publish.report import write_report

    store = RunStore(run_dir)
    try:
        with store.exclusive():
            path = write_report(run_dir, workers=workers)
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    typer.echo(display(path))


@app.command()
def review(
    run_dir: str = RunArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any but 127.0.0.1, localhost or ::1 needs --allow-remote."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Name recorded with each decision (default: your user name)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow --host to be an address other machines can reach."),
    compact: bool = typer.Option(False, "--compact", help="Fold the decision files into one and exit (no page)."),
) -> None:
    """Serve a page where a person approves, rejects, chooses or regenerates each product; prints its URL.

    Each decision is written at once under review/decisions/ in the run folder. Ctrl-C stops it.
    """
    _require_run(run_dir)
    from catalogen.publish import review_page
    from catalogen.review import decisions

    store = RunStore(run_dir)
    if compact:
        try:
            kept, removed = decisions.compact(store)
        except (decisions.DecisionError, OSError) as exc:
            _fail(exc)
        typer.echo(f"{kept} decision(s) in one file ({removed} file(s) folded)")
        return
    if host not in review_page.LOCAL_HOSTS and not allow_remote:
        _fail(f"--host {host} lets other machines reach the page; add --allow-remote to allow it")
    import getpass

    try:
        data = review_page.ReviewData(store, reviewer or getpass.getuser())
        sock = review_page.listen(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except (review_page.ReviewError, decisions.DecisionError, RunStateError) as exc:
        _fail(exc)
    token = review_page.new_token()
    url = review_page.url_of(sock, host, token)
    typer.echo(f"review {display(run_dir)} at {url} (Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    review_page.serve(data, sock, token, display(run_dir))


EXPORT_EXIT_CODES = (
    "Exit codes: 0 done; 1 refused, nothing created: the run folder, an option that does not fit the run "
    "(a column it lacks), or --out (the filesystem root, the run folder or a folder inside it, a file, a path "
    "under a file, a folder that cannot be made, not empty, in use); 2 usage error: an unknown --format, a "
    "malformed --where or --split, an empty --out."
)


def _usage(check: Callable[[Any], Any], value: Any) -> Any:
    """Run an option's syntax check; its refusal becomes a usage error (exit 2), as typer's own are."""
    try:
        check(value)
    except ExportError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _export_format(value: str) -> str:
    if value not in FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(FORMATS)}")
    return value


def _export_folder(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("is empty: name the export folder")
    _located(value, "--out")
    return value


def _split_spec(value: str) -> str:
    return _usage(parse_split, value)


def _where_clauses(values: list[str] | None) -> list[str] | None:
    for clause in values or []:
        _usage(parse_where, clause)
    return values


class _LateBar:
    """A progress bar that appears with the first progress report, so a refusal prints none."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress: Progress | None = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = _progress_bar()
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def __enter__(self) -> "_LateBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command("export", epilog=EXPORT_EXIT_CODES)
def export(
    run_dir: str = RunArg,
    format_: str = typer.Option(..., "--format", "-f", callback=_export_format, help="hf (Parquet shards for `datasets`), webdataset (tar shards) or imagefolder (images + .txt captions + metadata.jsonl)."),
    out: str = typer.Option(..., "--out", "-o", callback=_export_folder, help="Export folder, outside the run folder: absent or empty (an interrupted export of the same options resumes)."),
    image_stage: Optional[str] = typer.Option(None, "--image-stage", "--image", help="Export this image instead of the final one (column image_path): a stage's own (e.g. generate), remove_bg.canvas for remove_bg's marketplace main image, or rendition:NAME for a rendition."),
    text: Optional[str] = typer.Option(None, "--text", help="Results column that becomes the text (default: caption_caption, else enhance_prompt, else generate_prompt, else prompt)."),
    include_degenerate: bool = typer.Option(False, "--include-degenerate", help="Keep rows whose text its stage marked degenerate (a caption flagged as useless); left out by default."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Leave out near-duplicates: a row whose final image's pHash is within the run's duplicates.max_distance of an earlier exported row's (over all ok rows: the rows with near_duplicate_of set)."),
    where: Optional[list[str]] = typer.Option(None, "--where", "-w", metavar="COLUMN<op>VALUE", callback=_where_clauses, help="Keep rows where a results column compares true: >=, <=, >, <, ==, != on numbers, text, true/false or ISO times, e.g. caption_clip_score>=25 (repeatable; all must hold; a null never does)."),
    split: str = typer.Option("train=1", "--split", callback=_split_spec, help="Named fractions, e.g. train=0.9,val=0.1: a row's split is fixed by a hash of its id."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Rows per shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out (only files it wrote; anything else there is refused)."),
    approved: bool = typer.Option(False, "--approved", help="Keep only approved rows (the run's gates with reviewers' decisions applied); the manifest counts the rest by review state and reason."),
    selected: bool = typer.Option(False, "--selected", help="Keep only the candidates select: chose (best-of-N), whatever their review state."),
) -> None:
    """Export the ok rows of a run folder as a training set that `datasets`, `webdataset` or a LoRA trainer loads.

    Writes shards (each renamed into place when complete) and, last, manifest.json: rows per split,
    sha256 and rows per file. The hf format needs the optional `datasets` package (the `export` extra).
    """
    options = ExportOptions(format=format_, image_stage=image_stage, text=text, where=tuple(where or ()),
                            split=split, shard_size=shard_size, overwrite=overwrite,
                            include_degenerate=include_degenerate, dedupe=dedupe,
                            review="approved" if approved else "selected" if selected else None)
    if approved and selected:
        raise typer.BadParameter("give one of --approved and --selected (approved rows are selected ones)")
    try:
        with _LateBar(f"export {format_}") as bar:
            manifest = export_run(run_dir, out, options, bar)
    except (ExportError, RunFolderBusy, RunStateError) as exc:
        _fail(exc)
    splits = ", ".join(f"{name} {info['rows']} rows in {info['shards']} shard(s)" for name, info in manifest["splits"].items())
    left_out = ", ".join(f"{count} {reason}" for reason, count in manifest["excluded"].items() if count)
    typer.echo(f"{manifest['rows']} rows exported ({splits}); text from {manifest['text_column']}, "
               f"image from {manifest['image_column']}")
    if left_out:
        typer.echo(f"left out: {left_out}")
    typer.echo(f"manifest: {display(location(out) / 'manifest.json')}")


REPRODUCE_EXIT_CODES = ("Exit codes: 0 identical; 1 different (the largest pixel difference is printed); 2 the file "
                        "cannot be made again here: not a catalogen image, a malformed recipe, or a model revision "
                        "or input file it needs is missing, not allowed or changed (named); 130 / 143 stopped by "
                        "Ctrl-C / SIGTERM.")


@app.command(epilog=REPRODUCE_EXIT_CODES)
def reproduce(
    image: Path = typer.Argument(..., help="An image catalogen wrote (PNG; JPEG or WebP renditions)."),
    inputs: Optional[list[str]] = typer.Option(
        None, "--input", metavar="NAME=PATH",
        help="The file for the recipe's input NAME (image, style_image, style.style_image …), checked against "
        "its recorded sha256 (repeatable)."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", dir_okay=False,
        help="This machine's configuration: its images.roots are where recorded input paths may be read; its "
        "cache_dir, device and size caps apply. Nothing else of it is used."),
) -> None:
    """Make IMAGE again from the provenance in the file alone, in a temporary folder, and compare.

    Runs the image's row through the stages that made it (the same check, plan and flow as `run`,
    offline, models at the revisions the image records) and prints `identical`, or the largest
    pixel difference, where it is and how many pixels differ. Of the recipe only what decides
    pixels is used; files only where --input or the local images.roots allow.
    Ctrl-C or SIGTERM stops it (exit 130 / 143), its temporary folder removed.
    """
    import os
    import tempfile

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the verdict is the output, not the flow's log
    from catalogen.run.reproduce import Local, Unusable
    from flows.reproduce import Stopped, reproduce_image

    local = _local_settings(config, inputs)
    stopping.reset()
    try:
        with stopping.on_signals(), tempfile.TemporaryDirectory(prefix="catalogen-reproduce-") as folder:
            job, verdict = reproduce_image(image, Path(folder), Local(*local))
    except Unusable as exc:
        err.print(Text.assemble(("error: ", "bold red"), f"{image}: {exc}"), soft_wrap=True)
        raise typer.Exit(2) from None
    except Stopped as exc:
        err.print(f"stopped by {exc}: nothing compared; the temporary folder is removed", soft_wrap=True, highlight=False)
        raise typer.Exit(stopping.exit_code()) from None
    typer.echo(f"{verdict.line}: {job.describe()}" if verdict.identical else verdict.line)
    raise typer.Exit(0 if verdict.identical else 1)


def _local_settings(config: Path | None, inputs: list[str] | None) -> tuple[RunConfig, dict[str, Path], str]:
    """`reproduce`'s own settings (`--config`) and named files (`--input NAME=PATH`); a bad one: exit 2."""
    given: dict[str, Path] = {}
    for item in inputs or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise typer.BadParameter(f"{item!r} is not of the form NAME=PATH", param_hint="--input")
        given[name.strip()] = Path(path).expanduser()
    try:
        return load_config(config), given, str(config) if config else "defaults"
    except ConfigError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        raise typer.Exit(2) from None


def main() -> None:
    try:
        sys.exit(app())
    except registry.StageRegistryError as exc:  # a stage package that cannot load: one line, whatever the command
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
