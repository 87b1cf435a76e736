"""The `catalogen` command: validate a catalog, prepare models, run the flow, inspect a run folder.

Exit codes: 0 done; 1 the catalog, configuration, device or models cannot be used (nothing was
written), or the output folder is busy or belongs to another catalog; 2 a usage error; 3 the run
finished but some rows failed (their reasons are in results.parquet).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
from catalogen.devices import DeviceError
from catalogen.models import MissingModelsError, ModelError, resolve_models
from catalogen.progress import set_reporter
from catalogen.runplan import (
    CatalogChanged,
    Selection,
    check_folder_catalog,
    default_out,
    prepare,
)
from catalogen.store import RunFolderBusy, RunStateError, RunStore

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
RunArg = typer.Argument(..., help="A run folder (what `catalogen run` wrote).", exists=True, file_okay=False)


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
            origins[key] = f"{flag} {value}"
    return values, origins


def _config(config: Optional[Path], items: list[str] | None, **named: tuple[Any, str]) -> RunConfig:
    try:
        overrides, origins = _settings(items, **named)
        return load_config(config, overrides, origins)
    except ConfigError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


@app.command()
def validate(
    catalog: Path = typer.Argument(..., help="Parquet, CSV, TSV or JSON Lines catalog (optionally .gz)."),
    config: Optional[Path] = ConfigOpt,
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Check a catalog against a configuration; list every fault by column and row id. Writes nothing."""
    cfg = _config(config, set_, profile=(profile, "--profile"))
    from catalogen.runplan import config_faults, load_checked_catalog, plan_rows

    try:
        problems = config_faults(cfg)
        if problems:
            raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        table = load_checked_catalog(catalog, cfg)
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
    from tasks import STAGES

    # The tiny profile is one family: prepare its SD1.5- and SDXL-shaped models together.
    names = [p for p in PROFILES if p.startswith("tiny")] if cfg.profile.startswith("tiny") else [cfg.profile]
    specs = {}
    for name in names:
        variant = cfg.model_copy(update={"profile": name})
        for stage, module in STAGES.items():
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


def _prefect_environment() -> None:
    """Settings Prefect reads when it is imported; any the user has set win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no usage reporting from batch jobs
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "catalogen")  # model loads etc. in Prefect's logs
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # catalogen also logs outside runs


@dataclass
class _PrefectAPI:
    """A Prefect API server of this process's own, started in the background.

    Prefect's ephemeral API takes seconds to come up; started at once, it does so while the catalog
    is checked and planned, and the flow is then pointed at it. Its URL is published only once it
    answers, so a refused invocation need not wait for it and nothing ever talks to a half-started
    server; later invocations in the same process reuse it. It stops when the process exits.
    """

    thread: threading.Thread | None = None
    url: str | None = None

    def ready(self) -> str | None:
        """Wait for it; its API URL, or None if it did not start (the flow then starts Prefect's own)."""
        if self.thread is not None:
            self.thread.join()
        return self.url

    def abandon(self) -> None:
        """A refused run leaves at once; Prefect's exit handler stops the server once it exists."""
        if self.thread is not None:
            self.thread.join(timeout=1.0)


_api: _PrefectAPI | None = None
_api_lock = threading.Lock()


def _start_prefect_api() -> _PrefectAPI:
    global _api
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a server the user runs
        return _PrefectAPI()
    with _api_lock:
        failed = _api is not None and _api.thread is not None and not _api.thread.is_alive() and _api.url is None
        if _api is None or failed:
            _api = _PrefectAPI()
            _api.thread = threading.Thread(target=_serve, args=(_api,), name="prefect-api-start", daemon=True)
            _api.thread.start()
        return _api


def _serve(api: _PrefectAPI) -> None:
    from prefect.server.api.server import SubprocessASGIServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = SubprocessASGIServer(port=port)
    try:
        server.start()
    except Exception:  # noqa: BLE001 - the flow starts Prefect's own, and reports any error
        return
    api.url = server.api_url


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
    catalog: Path = typer.Argument(..., help="Parquet, CSV, TSV or JSON Lines catalog (optionally .gz)."),
    config: Optional[Path] = ConfigOpt,
    profile: Optional[str] = ProfileOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default outputs/<catalog>-<path hash>-<profile>)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Recompute rows whose last attempt failed."),
    new_catalog: bool = typer.Option(False, "--new-catalog", help="Run a catalog other than the one the output folder was made from (its results are replaced)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Trial run: only the catalog's first N rows."),
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Trial run: N rows picked by a seeded hash of their ids (the same N rows every time)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run, in order (setting `stages`)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed; rows without a seed column derive theirs from it."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Rows per Prefect task run (default 64)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per pipeline call of the generate stage (default 4)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (every visible GPU, else CPU), cpu, cuda or cuda:N."),
    offline: bool = typer.Option(False, "--offline", help="Never contact the Hub; fail fast if a model is missing."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run every stage over each pending row of CATALOG; re-running the same command resumes."""
    named = {
        "profile": (profile, "--profile"), "seed": (seed, "--seed"), "rows_per_shard": (rows_per_shard, "--rows-per-shard"),
        "device": (device, "--device"), "offline": (offline or None, "--offline"),
        "generate.batch_size": (batch_size, "--batch-size"),
        "stages": ([s.strip() for s in stages.split(",") if s.strip()] if stages else None, "--stages"),
    }
    _prefect_environment()
    api = _PrefectAPI()
    try:
        if out is not None:
            _refuse_if_busy(RunStore(out))  # at once, before anything starts
        api = _start_prefect_api()  # seconds of start-up, overlapped with planning a large catalog
        overrides, origins = _settings(set_, **named)
        cfg = load_config(config, overrides, origins)
        folder = out if out is not None else default_out(catalog, cfg)
        store = RunStore(folder)
        _refuse_if_busy(store)
        prepare(catalog, cfg, folder, Selection(limit, sample))  # remembered: the flow reuses it
        check_folder_catalog(store, catalog, new_catalog)
    except REFUSALS as exc:
        api.abandon()
        _fail(exc)
    url = api.ready()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.run import catalogen_run

    _log_above(err)
    progress = _progress_bar()
    set_reporter(_RichReporter(progress))
    try:
        with store.exclusive(), progress, temporary_settings({PREFECT_API_URL: url} if url else {}):
            state = catalogen_run(
                catalog=str(catalog), out=str(folder), config=str(config) if config else None,
                overrides=overrides, origins=origins, retry_failed=retry_failed, new_catalog=new_catalog,
                limit=limit, sample=sample, return_state=True,
            )
    except RunFolderBusy as exc:
        _fail(exc)
    finally:
        set_reporter(None)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):
        _fail(summary)
    typer.echo(
        f"{summary['rows']} rows: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped\n"
        f"results: {Path(summary['out']) / 'results.parquet'}"
    )
    if summary.get("report"):
        typer.echo(f"report: {summary['report']}")
    if summary["failed"]:
        err.print("[yellow]some rows failed; see the error column, and re-run with --retry-failed[/]")
        raise typer.Exit(3)


@app.command()
def status(run_dir: Path = RunArg) -> None:
    """Done, failed and pending rows per stage, from the run folder alone (no model, no Prefect)."""
    from catalogen.inspect import folder_status

    try:
        report = folder_status(RunStore(run_dir))
    except RunStateError as exc:
        _fail(exc)
    table = Table(title=f"{run_dir} ({report['rows']} rows, catalog {report['catalog']})")
    for column in ("stage", "ok", "fallback", "degenerate", "failed", "skipped", "pending"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, counts in report["stages"].items():
        table.add_row(stage, *(str(counts.get(c, 0)) for c in ("ok", "fallback", "degenerate", "failed", "skipped", "pending")))
    Console().print(table)
    typer.echo(f"running now: {report['running']}" if report["running"] else "not running")


@app.command()
def verify(run_dir: Path = RunArg) -> None:
    """Re-hash every image; mark missing or changed ones failed, so `run --retry-failed` redoes them."""
    from catalogen.inspect import verify_images

    store = RunStore(run_dir)
    try:
        with store.exclusive(), _progress_bar() as progress:
            task = progress.add_task("verify", total=None)
            bad, still_marked = verify_images(store, lambda done, total: progress.update(task, completed=done, total=total))
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    for row in bad[:20]:
        typer.echo(f"{row['stage']}: {row['id']} v{row['variant']}: {row['error']}")
    redo = f"redo them with `catalogen run CATALOG --out {run_dir} --retry-failed`"
    if bad:
        typer.echo(f"{len(bad)} image(s) missing or changed, now marked failed; {redo}")
    if still_marked:
        typer.echo(f"{still_marked} row(s) marked failed by an earlier verify are not redone yet; {redo}")
    if bad or still_marked:
        raise typer.Exit(3)
    typer.echo("every image matches its recorded sha256")


@app.command()
def clean(
    run_dir: Path = RunArg,
    yes: bool = typer.Option(False, "--yes", help="Remove the files listed (default: only list them)."),
) -> None:
    """List (and with --yes remove) images that no row of results.parquet points at."""
    from catalogen.inspect import orphan_images

    store = RunStore(run_dir)
    try:
        with store.exclusive():
            orphans = orphan_images(store)
            size = sum(p.stat().st_size for p in orphans)
            for path in orphans:
                typer.echo(str(path.relative_to(store.root)))
                if yes:
                    path.unlink()
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    if yes:
        typer.echo(f"removed {len(orphans)} image(s), {size / 2**20:.1f} MB")
    else:
        typer.echo(f"{len(orphans)} image(s), {size / 2**20:.1f} MB, that no row points at; --yes removes them")


@app.command()
def report(
    run_dir: Path = RunArg,
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Threads making thumbnails (default: up to 8)."),
) -> None:
    """Write report.html (summary, error reasons, a paged gallery) into a run folder; print its path.

    Open it from the folder or from object storage: it is static, with relative links only.
    Thumbnails go to thumbs/, made once per image.
    """
    from catalogen.report import write_report

    store = RunStore(run_dir)
    try:
        with store.exclusive():
            path = write_report(run_dir, workers=workers)
    except (RunStateError, RunFolderBusy) as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command("export")
def export(
    run_dir: Path = RunArg,
    format_: str = typer.Option(..., "--format", "-f", help="hf (Parquet shards for `datasets`), webdataset (tar shards) or imagefolder (images + .txt captions + metadata.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder: absent or empty (an interrupted export of the same options resumes)."),
    image_stage: Optional[str] = typer.Option(None, "--image-stage", help="Export this stage's image (default: the final image, column image_path)."),
    text: Optional[str] = typer.Option(None, "--text", help="Results column that becomes the text (default: caption_caption, else enhance_prompt, else generate_prompt, else prompt)."),
    where: Optional[list[str]] = typer.Option(None, "--where", "-w", metavar="COLUMN<op>VALUE", help="Keep rows where a results column compares true: >=, <=, >, <, ==, != on numbers, text, true/false or ISO times, e.g. caption_clip_score>=25 (repeatable; all must hold; a null never does)."),
    split: str = typer.Option("train=1", "--split", help="Named fractions, e.g. train=0.9,val=0.1: a row's split is fixed by a hash of its id."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Rows per shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out (only files it wrote; anything else there is refused)."),
) -> None:
    """Export the ok rows of a run folder as a training set that `datasets`, `webdataset` or a LoRA trainer loads.

    Writes shards (each renamed into place when complete) and, last, manifest.json: rows per split,
    sha256 and rows per file. The hf format needs the optional `datasets` package (the `export` extra).
    """
    from catalogen.export import ExportError, ExportOptions, export_run

    options = ExportOptions(format=format_, image_stage=image_stage, text=text, where=tuple(where or ()),
                            split=split, shard_size=shard_size, overwrite=overwrite)
    try:
        with _progress_bar() as progress:
            task = progress.add_task(f"export {format_}", total=None)
            manifest = export_run(run_dir, out, options, lambda done, total: progress.update(task, completed=done, total=total))
    except (ExportError, RunFolderBusy) as exc:
        _fail(exc)
    splits = ", ".join(f"{name} {info['rows']} rows in {info['shards']} shard(s)" for name, info in manifest["splits"].items())
    left_out = ", ".join(f"{count} {reason}" for reason, count in manifest["excluded"].items() if count)
    typer.echo(f"{manifest['rows']} rows exported ({splits}); text from {manifest['text_column']}, "
               f"image from {manifest['image_column']}")
    if left_out:
        typer.echo(f"left out: {left_out}")
    typer.echo(f"manifest: {out / 'manifest.json'}")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
