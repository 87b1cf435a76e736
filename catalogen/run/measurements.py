"""Throughput measurements shared by every run folder of this machine, kept beside the model cache.

A dry run in a new folder should know what a sibling folder measured yesterday with the same stages,
models and settings on the same device. So each real run (and `run --dry-run --calibrate`) writes,
per stage, what it measured into `<cache_dir>/measurements/<stage>-<key hash>.json` (or
`$CATALOGEN_MEASUREMENTS/…`), one file per key, replaced atomically (write to a temporary file, then
rename): two runs at once never leave a torn file, the later one wins. The key holds what changes
the speed or the bytes of a row: the stage, its models (repository and resolved revision), its
settings section and the sections it reads (`SETTINGS_FROM`: size, steps, batch size, tile size,
formats…), the dtype and the device kind (`cpu`, `cuda:NVIDIA H100 80GB HBM3`). A change in any of
them is another key, never reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from catalogen import registry
from catalogen.config import RunConfig
from catalogen.models.identity import ModelIdentity
from catalogen.storage.hashing import stable_hash
from catalogen.storage.store import write_atomic

FOLDER = "measurements"
FOLDER_FILES = "folder"  # the key of a run folder's own files, beside the stages' keys
FIELDS = ("seconds_per_row",)  # what a stage's measurement must hold (and rows > 0) to price anything


def store_dir(cfg: RunConfig) -> Path:
    """`CATALOGEN_MEASUREMENTS` (a folder machines or a team share), else `<cache_dir>/measurements`."""
    shared = os.environ.get("CATALOGEN_MEASUREMENTS")
    return Path(shared).expanduser() if shared else cfg.resolved_cache_dir() / FOLDER


def measurement_key(stage: str, cfg: RunConfig, models: Mapping[str, ModelIdentity], kind: str) -> dict[str, Any]:
    """What a stage's seconds and bytes per row depend on (see the module's docstring)."""
    settings = cfg.model_dump(mode="json")
    sections = (stage, *getattr(registry.stages()[stage], "SETTINGS_FROM", ()))
    return {
        "stage": stage,
        "device": kind,
        "dtype": cfg.dtype,
        "models": {role: f"{m.repo}@{m.revision}" for role, m in sorted(models.items())},
        "settings": {name: settings.get(name) for name in sections},
    }


def folder_key(cfg: RunConfig) -> dict[str, Any]:
    """What the bytes per row of a run folder's own files (results, parts, report, thumbnails) depend on."""
    return {"stage": FOLDER_FILES, "stages": list(cfg.stages), "profile": cfg.profile}


def key_hash(key: Mapping[str, Any]) -> str:
    return stable_hash(key)[:16]


def measurement_path(cfg: RunConfig, key: Mapping[str, Any]) -> Path:
    return store_dir(cfg) / f"{key['stage']}-{key_hash(key)}.json"


def write_measurement(cfg: RunConfig, key: Mapping[str, Any], measured: Mapping[str, Any]) -> Path:
    """Replace the key's measurement atomically; returns its file."""
    path = measurement_path(cfg, key)
    body = {**measured, "key": dict(key), "key_hash": key_hash(key)}
    write_atomic(path, json.dumps(body, indent=2, sort_keys=True, default=str).encode())
    return path


def read_measurement(cfg: RunConfig, key: Mapping[str, Any], needed: tuple[str, ...] = FIELDS) -> dict[str, Any] | None:
    """The key's measurement, or None (none yet, or a file that is not one: anyone can edit it)."""
    try:
        found = json.loads(measurement_path(cfg, key).read_text())
    except (OSError, ValueError):
        return None
    return found if usable(found, needed) and found.get("key_hash") == key_hash(key) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def usable(measured: Any, needed: tuple[str, ...] = FIELDS) -> bool:
    """A well-formed measurement: rows > 0 and the `needed` numbers, the others non-negative where given."""
    if not isinstance(measured, Mapping) or not all(_number(measured.get(f)) for f in ("rows", *needed)):
        return False
    optional = ("bytes_per_row", "files_per_row", "load_seconds", "workers")
    return measured["rows"] > 0 and all(_number(measured[f]) for f in optional if measured.get(f) is not None)
