"""`catalogen run --dry-run`: what a run would do, and about how long and how much disk it takes.

Throughput is measured by real runs: at the end of each, `record_throughput` adds to run.json,
per stage and device kind (`cpu`, `cuda:NVIDIA H100 80GB HBM3`; a stage that takes no device
lease counts as `cpu`), the seconds per row the rows computed in that invocation took (each row's share
of its batch, model loads not counted) and the bytes its image files took per row (a sample of
them read back). `estimate` plans like a run (catalogen.run.plan: the same checks, keys and
pending rows), writes nothing, and prices the pending rows with the measurement of the device
kind this machine would use; without one it says "no measurement yet", or, asked to calibrate,
prices with what one batch run in a temporary folder measured (flows/calibrate.py). Disk without a
measurement is a rough bound from the planned sizes (width x height x 3/2 bytes a PNG), labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen import registry
from catalogen.stage import SKIP_COLUMN

SUCCEEDED_STATUSES = ("ok", "fallback", "degenerate")
SAMPLED_FILES = 16  # image files read back per stage and invocation to measure their size


def device_kind(name: str | None) -> str | None:
    """What a device is, across machines: `cpu`, `cuda:<GPU name>`; None for no device."""
    if not name or name == "-":
        return None
    if name.startswith("cuda"):
        try:
            import torch

            index = int(name.split(":", 1)[1]) if ":" in name else 0
            return f"cuda:{torch.cuda.get_device_name(index)}"
        except Exception:  # noqa: BLE001 - a device the flow's process cannot see: keep its name
            return name
    return name


def _stage_kind(stage: str, cfg: Any) -> tuple[str, int]:
    """The device kind this machine would run `stage` on, and how many such devices there are."""
    from catalogen.run.devices import visible_devices

    check = getattr(registry.stages()[stage], "needs_device", None)
    if check is not None and not check(cfg):
        return "cpu", 1  # no lease: the runner records it as run on the CPU (a server may do its work)
    devices = visible_devices(cfg.device)
    return device_kind(devices[0].name) or "cpu", len(devices)


def record_throughput(store: Any, results: pa.Table, stages: list[str] | tuple[str, ...], since: datetime) -> dict:
    """Add this invocation's measured seconds (and bytes) per row, per stage and device kind, to run.json."""
    measured: dict[str, dict[str, Any]] = {}
    for stage in stages:
        names = {c: f"{stage}_{c}" for c in ("status", "seconds", "device", "finished_at", "image_path", "canvas_path")}
        if any(names[c] not in results.column_names for c in ("status", "seconds", "device", "finished_at")):
            continue
        fresh = pc.and_(pc.is_in(results.column(names["status"]), pa.array(SUCCEEDED_STATUSES)),
                        pc.greater_equal(results.column(names["finished_at"]), pa.scalar(since, results.schema.field(names["finished_at"]).type)))
        rows = results.filter(pc.fill_null(fresh, False))
        if rows.num_rows == 0:
            continue
        devices = rows.column(names["device"]).to_pylist()
        seconds = rows.column(names["seconds"]).to_pylist()
        files = [rows.column(names[c]).to_pylist() if names[c] in rows.column_names else [None] * rows.num_rows
                 for c in ("image_path", "canvas_path")]
        for device in sorted(set(d for d in devices if d)):
            kind = device_kind(device)
            if kind is None:
                continue
            mine = [i for i, d in enumerate(devices) if d == device]
            entry = measured.setdefault(stage, {}).setdefault(kind, {"rows": 0, "seconds": 0.0, "files": []})
            entry["rows"] += len(mine)
            entry["seconds"] += sum(seconds[i] or 0.0 for i in mine)
            entry["files"] += [[column[i] for column in files] for i in mine]
    if not measured:
        return {}
    info = store.read_run_json()
    history = info["throughput"] = info.get("throughput") if isinstance(info.get("throughput"), dict) else {}
    now = datetime.now(timezone.utc).isoformat()
    for stage, kinds in measured.items():
        if not isinstance(history.get(stage), dict):
            history[stage] = {}
        for kind, entry in kinds.items():
            record = {"rows": entry["rows"], "seconds_per_row": entry["seconds"] / entry["rows"], "measured_at": now}
            sample = [paths for paths in entry["files"] if any(paths)][:SAMPLED_FILES]
            if sample:
                total = 0
                for paths in sample:
                    for path in paths:
                        if path:
                            try:
                                total += len(store.read_bytes(path))
                            except OSError:
                                pass
                record["bytes_per_row"] = total / len(sample)
            history.setdefault(stage, {})[kind] = record
    store.write_json(store.run_json, info)
    return measured


@dataclass
class StageEstimate:
    stage: str
    rows: int  # rows to (re)compute
    images: int  # of them, rows that make an image (not skipped by the stage's own plan)
    kind: str  # the device kind it would run on here
    devices: int
    seconds: float | None  # None: no measurement yet
    measured_rows: int
    disk_bytes: float | None
    disk_source: str  # "measured", "calibrated", "bound" or "none"
    calibrated: bool = False  # measured by this dry run's one-batch calibration, not by earlier runs

    def line(self) -> str:
        makes = registry.stages()[self.stage].MAKES_IMAGES
        parts = [f"{self.stage}: {self.rows} rows to do"]
        if makes:
            parts.append(f"{self.images} images to make")
        if self.rows == 0:
            parts.append("nothing to do")
        elif self.seconds is None:
            parts.append(f"time: no measurement yet on {self.kind}")
        else:
            on = f"{self.devices} x {self.kind}" if self.devices > 1 else self.kind
            how = "calibrated now on" if self.calibrated else "measured over"
            parts.append(f"about {_duration(self.seconds)} on {on} ({how} {self.measured_rows} rows)")
        if makes and self.images:
            if self.disk_bytes is None:
                parts.append("disk: unknown until measured")
            else:
                label = {"measured": "measured by earlier runs", "calibrated": "calibrated now"}.get(
                    self.disk_source, "rough bound, width x height x 1.5")
                parts.append(f"disk about {_size(self.disk_bytes)} (estimate, {label})")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _bound(planned: pa.Table, rows: np.ndarray) -> float | None:
    """width x height x 3/2 bytes per image, from the plan's sizes where it has them."""
    for w, h in (("width", "height"), ("canvas_width", "canvas_height")):
        if w in planned.column_names and h in planned.column_names:
            take = pa.array(np.flatnonzero(rows))
            width = pc.fill_null(planned.column(w).take(take), 0).to_numpy(zero_copy_only=False).astype(float)
            height = pc.fill_null(planned.column(h).take(take), 0).to_numpy(zero_copy_only=False).astype(float)
            return float((width * height * 1.5).sum())
    return None


def estimate(plan: Any, masks: Mapping[str, np.ndarray], history: Mapping[str, Any],
             calibration: Mapping[str, Any] | None = None) -> list[StageEstimate]:
    """Per stage: rows to do, images to make, time and disk, priced from `history` (run.json's
    throughput), else from `calibration` (the same shape, measured by this dry run)."""
    found = []
    for name in plan.config.stages:
        todo = masks[name]
        planned = plan.planned[name]
        runs = todo.copy()
        if SKIP_COLUMN in planned.column_names:
            runs &= ~planned.column(SKIP_COLUMN).is_valid().to_numpy(zero_copy_only=False)
        module = registry.stages()[name]
        images = int(runs.sum()) if module.MAKES_IMAGES else 0
        kind, devices = _stage_kind(name, plan.config)
        kinds = _measurements(history, name)
        measured = kinds.get(kind)
        calibrated = measured is None and kind in _measurements(calibration or {}, name)
        if calibrated:
            measured = _measurements(calibration or {}, name)[kind]
        seconds = measured["seconds_per_row"] * int(runs.sum()) / max(devices, 1) if measured else None
        disk, source = None, "none"
        sized = [m for m in ([measured] if measured else []) + list(kinds.values()) if _number(m.get("bytes_per_row"))]
        if images and sized:  # this device's measurement, else a size from any device will do
            disk = sized[0]["bytes_per_row"] * images
            source = "calibrated" if calibrated and sized[0] is measured else "measured"
        elif images:
            disk = _bound(planned, runs)
            source = "bound" if disk is not None else "none"
        found.append(StageEstimate(name, int(todo.sum()), images, kind, devices, seconds,
                                   int(measured["rows"]) if measured else 0, disk, source, calibrated))
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _measurements(history: Any, stage: str) -> dict[str, dict[str, Any]]:
    """A stage's well-formed measurements by device kind (run.json is a file anyone can edit)."""
    kinds = history.get(stage) if isinstance(history, Mapping) else None
    if not isinstance(kinds, Mapping):
        return {}
    return {kind: m for kind, m in kinds.items()
            if isinstance(m, Mapping) and _number(m.get("seconds_per_row")) and _number(m.get("rows")) and m["rows"] > 0}


def plan_only(plan: Any, recorded: Mapping | None, retry_failed: bool,
              calibrate: Callable[[], tuple[Mapping[str, Any], int]] | None = None) -> list[str]:
    """What `run --dry-run` prints: the plan a run would follow, priced; reads the folder, writes nothing.

    `calibrate` (flows/calibrate.py) measures one batch in a temporary folder; it is called only
    when a stage with work has no measurement on this device kind.
    """
    from catalogen.run.plan import done_results, pending_masks, settings_changes

    stages = list(plan.config.stages)
    lines = []
    try:
        done = {name: done_results(plan, name, ["error"]) for name in stages}
    except (pa.ArrowInvalid, OSError) as exc:  # a run sets unreadable parts aside and redoes their rows
        lines.append(f"note: a part of {plan.store.root} cannot be read ({exc}); a run would set it aside and redo its rows")
        done = {name: pa.table({"status": pa.nulls(plan.rows.num_rows, pa.string())}) for name in stages}
    masks = pending_masks(plan, retry_failed, done)
    history = plan.store.read_run_json().get("throughput") or {} if plan.store.is_run() else {}
    scope = int(plan.in_scope().sum())
    trial = f" (trial: {plan.selection.describe()}, {scope} of {plan.rows.num_rows} rows)" if plan.selection else ""
    where = plan.store.root if plan.store.is_run() else f"{plan.store.root} (a new folder)"
    lines.insert(0, f"dry run for {where}{trial}: {scope} rows through {' -> '.join(stages)}; nothing was written")
    for change in settings_changes(recorded, plan.config):
        lines.append(f"setting changed since the folder's last run: {change}")
    estimates = estimate(plan, masks, history)
    if calibrate is not None and any(e.rows and e.seconds is None for e in estimates):
        calibration, rows = calibrate()
        lines.append(f"calibrated: one batch of {rows} rows run through every stage in a temporary folder, now removed")
        estimates = estimate(plan, masks, history, calibration)
    lines += [f"  {e.line()}" for e in estimates]
    busy = [e for e in estimates if e.rows]
    if busy and all(e.seconds is not None for e in busy):
        lines.append(f"total: about {_duration(sum(e.seconds for e in busy))} of work (stages overlap across shards, so "
                     "the run may take less)")
    disk = [e.disk_bytes for e in estimates if e.images and e.disk_bytes is not None]
    if disk:
        lines.append(f"disk: about {_size(sum(disk))} of new images (estimate)")
    return lines
