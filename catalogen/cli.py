"""The `catalogen` command: validate a catalog, prepare models, run the flow.

Exit codes: 0 done; 1 the catalog, configuration or models cannot be used (nothing was written);
3 the run finished but some rows failed (their reasons are in results.parquet).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from catalogen.catalog import CatalogError, expand_rows, load_catalog
from catalogen.config import PROFILES, ConfigError, load_config, parse_override
from catalogen.devices import DeviceError
from catalogen.models import MissingModelsError, resolve_models
from catalogen.progress import set_reporter
from catalogen.runplan import check

app = typer.Typer(
    help="Turn Parquet catalogs into images with full provenance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Download or build the models a profile uses.", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run configuration.", exists=True, dir_okay=False)
ProfileOpt = typer.Option(None, "--profile", "-p", help=f"Model profile: {', '.join(PROFILES)} (default tiny).")
SetOpt = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE",
    help="Override any setting, e.g. --set generate.steps=30 --set generate.scheduler=euler_a (repeatable).",
)


def _overrides(items: list[str] | None, **named: Any) -> dict[str, Any]:
    values = dict(parse_override(item) for item in items or [])
    values.update({k: v for k, v in named.items() if v is not None})
    return values


def _fail(exc: Exception) -> None:
    err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
    raise typer.Exit(1)


def _preflight(catalog: Path, config: Optional[Path], overrides: dict[str, Any]) -> None:
    """Refuse a bad catalog, configuration, device or model before Prefect even starts."""
    try:
        check(catalog, load_config(config, overrides))
    except (CatalogError, ConfigError, DeviceError, MissingModelsError) as exc:
        _fail(exc)


@app.command()
def validate(
    catalog: Path = typer.Argument(..., help="Parquet, CSV or JSON Lines catalog."),
    config: Optional[Path] = ConfigOpt,
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Check a catalog against a configuration; list every fault by column and row id."""
    try:
        cfg = load_config(config, _overrides(set_, profile=profile))
        table = load_catalog(catalog, cfg)
    except (CatalogError, ConfigError) as exc:
        _fail(exc)
    images = expand_rows(table, cfg).num_rows
    typer.echo(f"{catalog}: ok, {table.num_rows} ids, {images} images to make with profile {cfg.profile}")


@models_app.command("prepare")
def models_prepare(
    profile: str = typer.Option("tiny", "--profile", "-p", help=f"One of {', '.join(PROFILES)}."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Build the tiny models, or download a real profile's models into the Hugging Face cache."""
    try:
        cfg = load_config(config, _overrides(set_, profile=profile))
        # The tiny profile is one family: prepare its SD1.5- and SDXL-shaped models together.
        names = [p for p in PROFILES if p.startswith("tiny")] if cfg.profile.startswith("tiny") else [cfg.profile]
        specs = {f"{stage} ({name})": spec for name in names for stage, spec in PROFILES[name].items()}
        if cfg.generate.model is not None:
            specs["generate (config)"] = cfg.generate.model
        identities = resolve_models(specs, cfg)
    except (ConfigError, MissingModelsError) as exc:
        _fail(exc)
    for stage, identity in identities.items():
        typer.echo(f"{stage}: {identity.repo} @ {identity.revision}\n  {identity.path}")


def _log_above(console: Console) -> None:
    """Print Prefect's console logs through `console`, so they land above the progress bar
    instead of through it (Prefect's handler writes to the terminal on its own otherwise)."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # Prefect configures logging once per process; later calls keep these handlers
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


@app.command()
def run(
    catalog: Path = typer.Argument(..., help="Parquet, CSV or JSON Lines catalog."),
    config: Optional[Path] = ConfigOpt,
    profile: Optional[str] = ProfileOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default outputs/<catalog>-<profile>)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Recompute rows whose last attempt failed."),
    seed: Optional[int] = typer.Option(None, help="Run seed; rows without a seed column derive theirs from it."),
    rows_per_shard: Optional[int] = typer.Option(None, help="Rows per Prefect task run (default 64)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per pipeline call (default 4)."),
    device: Optional[str] = typer.Option(None, help="auto (every visible GPU, else CPU), cpu, cuda or cuda:N."),
    offline: bool = typer.Option(False, "--offline", help="Never contact the Hub; fail fast if a model is missing."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Generate every pending row of CATALOG; re-running the same command resumes."""
    overrides = _overrides(
        set_, profile=profile, seed=seed, rows_per_shard=rows_per_shard, device=device,
        offline=offline or None, **{"generate.batch_size": batch_size},
    )
    _preflight(catalog, config, overrides)
    # Quiet by default on machines without internet; set either variable to choose otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "catalogen")  # model loads etc. in Prefect's logs
    from flows.run import catalogen_run  # Prefect reads the settings above when it is imported

    _log_above(err)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )
    set_reporter(_RichReporter(progress))
    try:
        with progress:
            summary = catalogen_run(
                catalog=str(catalog), out=str(out) if out else None, config=str(config) if config else None,
                overrides=overrides, retry_failed=retry_failed,
            )
    except Exception as exc:  # noqa: BLE001 - Prefect has logged the traceback
        _fail(exc)
    finally:
        set_reporter(None)
    typer.echo(
        f"{summary['rows']} rows: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped\n"
        f"results: {Path(summary['out']) / 'results.parquet'}"
    )
    if summary["failed"]:
        err.print("[yellow]some rows failed; see the error column, and re-run with --retry-failed[/]")
        raise typer.Exit(3)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
