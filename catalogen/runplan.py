"""A run from start to finish, without the orchestrator: plan, what is pending, the results.

The Prefect flow (flows/run.py) decides only ordering and concurrency; everything it needs to
know about rows, keys and files comes from here, so a benchmark or a test can drive a run with a
plain loop and get the same outputs.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

import catalogen
from catalogen.catalog import expand_rows, load_catalog, shard
from catalogen.config import RunConfig
from catalogen.devices import visible_devices
from catalogen.hashing import sha256_file, stable_hash
from catalogen.models import ModelIdentity, resolve_models
from catalogen.stage import Stage
from catalogen.store import STATUSES, RunStore

SUMMARY_COLUMNS = ("status", "error", "image_path", "image_sha256", "image_width", "image_height")
_PACKAGES = ("torch", "diffusers", "transformers", "prefect", "pyarrow", "pydantic")


@dataclass
class RunPlan:
    catalog_path: Path
    catalog: pa.Table  # validated input, one row per id
    rows: pa.Table  # one row per (id, variant): the catalog's columns, variant, row_seed
    config: RunConfig
    store: RunStore
    identities: dict[str, ModelIdentity]
    planned: dict[str, pa.Table]  # per stage: effective parameters and idempotency keys


def default_out(catalog_path: str | Path, cfg: RunConfig, root: str | Path = "outputs") -> Path:
    """A stable folder per (catalog, profile), so re-running a command resumes it."""
    return Path(root) / f"{Path(catalog_path).stem}-{cfg.profile}"


def check(catalog_path: str | Path, cfg: RunConfig) -> tuple[pa.Table, dict[str, ModelIdentity]]:
    """Everything that can refuse a run, done before anything is written or a model loaded.

    Raises CatalogError, DeviceError or MissingModelsError; returns the validated catalog and
    every stage's model identity.
    """
    catalog = load_catalog(catalog_path, cfg)
    visible_devices(cfg.device)  # a device that is not there fails now, not in every shard
    return catalog, resolve_models({name: cfg.model_for(name) for name in cfg.stages}, cfg)


def prepare(
    catalog_path: str | Path,
    cfg: RunConfig,
    out: str | Path | None,
    stages: Mapping[str, Stage],
) -> RunPlan:
    """Check the run and plan every stage; nothing is written before all of that passes."""
    catalog_path = Path(catalog_path)
    catalog, identities = check(catalog_path, cfg)
    rows = expand_rows(catalog, cfg)
    planned = {name: stages[name].plan(rows, cfg, identities[name]) for name in cfg.stages}
    store = RunStore(out if out is not None else default_out(catalog_path, cfg))
    return RunPlan(catalog_path, catalog, rows, cfg, store, identities, planned)


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "catalogen": catalogen.__version__, "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def record_invocation(plan: RunPlan, pending: Mapping[str, int], retry_failed: bool) -> None:
    """Write run.json: the configuration tasks read, and a history of every invocation."""
    store = plan.store
    previous = store.read_run_json() if store.run_json.exists() else {}
    now = datetime.now(timezone.utc).isoformat()
    invocation = {
        "started_at": now,
        "catalog": str(plan.catalog_path),
        "catalog_sha256": sha256_file(plan.catalog_path),
        "config_hash": stable_hash(plan.config.model_dump(mode="json"))[:16],
        "retry_failed": retry_failed,
        "rows": plan.rows.num_rows,
        "pending": dict(pending),
    }
    store.write_json(
        store.run_json,
        {
            "created_at": previous.get("created_at", now),
            "updated_at": now,
            "catalog": {"path": str(plan.catalog_path), "ids": plan.catalog.num_rows, "rows": plan.rows.num_rows},
            "config": plan.config.model_dump(mode="json"),
            "models": {stage: identity.to_dict() for stage, identity in plan.identities.items()},
            "versions": _versions(),
            "invocations": previous.get("invocations", []) + [invocation],
        },
    )


def read_config(store: RunStore) -> tuple[RunConfig, dict[str, ModelIdentity]]:
    """The configuration and model identities a task works with, from run.json."""
    info = store.read_run_json()
    identities = {stage: ModelIdentity(**value) for stage, value in info["models"].items()}
    return RunConfig.model_validate(info["config"]), identities


def pending_shards(plan: RunPlan, stage: Stage, retry_failed: bool) -> list[tuple[str, pa.Table]]:
    """The rows still to do, alike rows together, cut into shards named by their content.

    A shard's name hashes its rows' keys, so the same pending work gets the same names on a
    re-run, and a part file always holds exactly the rows its name promises. Sorting (stable, so
    catalog order is kept within a kind) changes which rows share a shard, never an image.
    """
    todo = plan.store.pending(stage.NAME, plan.planned[stage.NAME], stage.OUTPUT_SCHEMA, retry_failed)
    todo = todo.sort_by([(column, "ascending") for column in stage.SHARD_ORDER])
    return [
        (stable_hash(piece.column("key").to_pylist())[:16], piece)
        for piece in shard(todo, plan.config.rows_per_shard)
    ]


def assemble_results(plan: RunPlan, stages: Mapping[str, Stage]) -> pa.Table:
    """One row per (id, variant): the catalog's columns first, then a summary, then each stage's columns.

    A row without a result (its shard's task crashed) reads as failed, with the reason.
    """
    table = plan.rows.drop_columns(["row_seed"])
    n = table.num_rows
    status: list[str | None] = [None] * n
    error: list[str | None] = [None] * n
    image: dict[str, list] = {c: [None] * n for c in ("image_path", "image_sha256", "image_width", "image_height")}
    stage_columns: list[tuple[str, pa.ChunkedArray]] = []
    for name in plan.config.stages:
        stage = stages[name]
        found = plan.store.latest_results(name, plan.planned[name], stage.OUTPUT_SCHEMA)
        s_status = found.column("status").to_pylist()
        s_error = found.column("error").to_pylist()
        s_images = {c: found.column(c).to_pylist() for c in image}
        for i in range(n):
            if status[i] == "failed":
                continue
            if s_status[i] is None:
                status[i], error[i] = "failed", f"{name}: no result recorded (its shard crashed; see the logs)"
            elif s_status[i] == "failed":
                status[i], error[i] = "failed", f"{name}: {s_error[i]}"
            else:
                status[i] = s_status[i] if status[i] in (None, "skipped") else status[i]
                if s_images["image_path"][i] is not None:
                    for c in image:
                        image[c][i] = s_images[c][i]
        stage_columns += [
            (f"{name}_{c}", found.column(c)) for c in found.column_names if c not in ("id", "variant")
        ]
    summary = {
        "status": pa.array(status, pa.string()),
        "error": pa.array(error, pa.string()),
        "image_path": pa.array(image["image_path"], pa.string()),
        "image_sha256": pa.array(image["image_sha256"], pa.string()),
        "image_width": pa.array(image["image_width"], pa.int32()),
        "image_height": pa.array(image["image_height"], pa.int32()),
    }
    for column, values in [*summary.items(), *stage_columns]:
        table = table.append_column(column, values)
    return table


def summarize(results: pa.Table) -> dict[str, Any]:
    statuses = results.column("status").to_pylist()
    counts = {s: statuses.count(s) for s in STATUSES}
    return {"rows": results.num_rows, **counts}
