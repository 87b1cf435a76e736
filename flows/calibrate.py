"""`catalogen run --dry-run --calibrate`: measure throughput on this machine with one batch.

The catalog's first rows (one batch: the largest `batch_size` among the stages) run through every
stage with the run's settings, by the same flow as `catalogen run`, into a temporary folder that
is removed afterwards; the seconds and bytes per row that run records (catalogen.run.dryrun) price the
dry run, which keeps them in the shared store beside the model cache under its own settings' keys
(catalogen/run/measurements.py). Nothing is written into the output folder; the model cache may be
filled, as by any run.
SIGINT or SIGTERM stops it as they stop a run (the batch's flow gets its grace), the temporary
folder is removed, and `CalibrationStopped` tells the dry run to end with the signal's exit code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from catalogen import stopping
from catalogen.config import RunConfig
from catalogen.run.prefect_api import prefect_environment, start_prefect_api
from catalogen.storage.store import RunStore

DEFAULT_BATCH = 4


def batch_rows(cfg: RunConfig) -> int:
    """One batch: the largest `batch_size` any of the run's stages has."""
    sizes = [getattr(getattr(cfg, name, None), "batch_size", None) for name in cfg.stages]
    return max([s for s in sizes if isinstance(s, int) and s > 0] or [DEFAULT_BATCH])


class CalibrationStopped(Exception):
    """A stop (SIGINT, SIGTERM) during the calibration: nothing was measured, nothing is left."""


def calibrate(catalog: Any, cfg: RunConfig) -> tuple[dict[str, Any], int]:
    """Run one batch of the catalog's first rows in a temporary folder; its throughput and row count."""
    stopping.reset()
    with stopping.on_signals():
        history, rows = _one_batch(catalog, cfg)
    if stopping.STOPPING.is_set():
        raise CalibrationStopped(f"stopped by {stopping.signal_name()} while calibrating; its temporary folder "
                                 "is removed and nothing was written")
    return history, rows


def _one_batch(catalog: Any, cfg: RunConfig) -> tuple[dict[str, Any], int]:
    rows = batch_rows(cfg)
    prefect_environment()
    api = start_prefect_api()
    with tempfile.TemporaryDirectory(prefix="catalogen-calibrate-") as folder:
        settings = cfg.model_dump(mode="json")
        if isinstance(settings.get("enhance"), dict):  # the LLM answers anew, not from the shared cache
            settings["enhance"]["answer_cache"] = str(Path(folder) / "enhance-answers.sqlite")
        config = Path(folder) / "config.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=True, allow_unicode=True))
        out = Path(folder) / "out"
        url = api.ready()
        if stopping.STOPPING.is_set():  # stopped while the API started: no batch
            return {}, rows
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        from catalogen.run.dryrun import kept_out_of_the_shared_store
        from flows.run import catalogen_run

        api_settings = {PREFECT_API_URL: url, PREFECT_UI_URL: ""} if url else {}
        with temporary_settings(api_settings), kept_out_of_the_shared_store():
            catalogen_run(catalog=str(catalog), out=str(out), config=str(config), limit=rows, return_state=True)
        store = RunStore(out)
        history = store.read_run_json().get("throughput") if store.is_run() else None
    return (history if isinstance(history, dict) else {}), rows
