"""`catalogen run --dry-run`: what a run would do, and about how long, how much and how much disk it takes.

Throughput is measured by real runs: at the end of each, `record_throughput` keeps, per stage and
device kind (`cpu`, `cuda:NVIDIA H100 80GB HBM3`; a stage that takes no device lease counts as
`cpu`), the seconds per row the rows computed in that invocation took (each row's share of its
batch, model loading left out: `catalogen.models.loading.WorkTimer`), the seconds its model loads
took per worker process, and the bytes and files per row of everything it wrote (a sample read
back: images, canvases, renditions). They go into run.json (`throughput`) and, keyed by stage,
models, speed settings and device kind, into the shared store beside the model cache
(catalogen/run/measurements.py), so a dry run in a new folder finds what a sibling folder measured.
`estimate` plans like a run (catalogen.run.plan: the same checks, keys and pending rows), writes
nothing, and prices the pending rows: time, device-hours, cost (`costs:`) and disk per stage, and
against `budget:` the rows that fit. Without a measurement it says "no measurement yet", or, asked
to calibrate, prices with what one batch run in a temporary folder measured (flows/calibrate.py),
and keeps that in the shared store. Disk without a measurement is a rough bound per format.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen import registry
from catalogen.run.costs import hourly
from catalogen.run.measurements import (folder_key, key_hash, measurement_key, read_measurement, usable,
                                        write_measurement)
from catalogen.stage import SKIP_COLUMN

SUCCEEDED_STATUSES = ("ok", "fallback", "degenerate")
SAMPLED_ROWS = 16  # rows whose files are read back per stage and invocation to measure their size
# Rough upper bounds of bytes per pixel, for files no run has measured yet (a 2000 px JPEG product
# shot at quality 90 takes about 0.5 MB, 0.125 bytes a pixel; PNG keeps every pixel losslessly).
BYTES_PER_PIXEL = {"png": 1.5, "jpeg": 0.25, "webp": 0.2, "avif": 0.15}
_SHARED = {"write": True}  # off while calibrating: the dry run keeps that batch's measurement itself


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


def price(costs: Mapping[str, float], kind: str) -> float | None:
    """The price per device-hour of a measurement's device (`cpu`, `cuda:NVIDIA H100 80GB HBM3`)."""
    base, _, name = kind.partition(":")
    return hourly(costs, base, name or None)


@contextmanager
def kept_out_of_the_shared_store() -> Iterator[None]:
    """The calibration's run records into its temporary folder only; the dry run stores what it measured
    under its own settings' keys (a temporary answer cache would make another key)."""
    _SHARED["write"] = False
    try:
        yield
    finally:
        _SHARED["write"] = True


def _stage_kind(stage: str, cfg: Any) -> tuple[str, int, bool]:
    """The device kind this machine would run `stage` on, how many such devices, and whether it takes a lease."""
    from catalogen.run.devices import visible_devices

    check = getattr(registry.stages()[stage], "needs_device", None)
    if check is not None and not check(cfg):
        return "cpu", 1, False  # no lease: the runner records it as run on the CPU (a server may do its work)
    devices = visible_devices(cfg.device)
    return device_kind(devices[0].name) or "cpu", len(devices), True


def _workers(cfg: Any, kind: str, devices: int) -> int:
    """Processes that would each load the stage's models: one per device in this process (threads), a
    Dask cluster's workers otherwise (default one per GPU, else 2)."""
    if cfg.runner != "dask":
        return devices
    return cfg.dask.workers or (devices if kind.startswith("cuda") else 2)


# --- measuring, at the end of a run ---------------------------------------------------------------


def _file_columns(results: pa.Table, stage: str) -> list[str]:
    """Every column of paths to files the stage wrote: its image, canvas, each rendition."""
    return [c for c in results.column_names
            if c.startswith(f"{stage}_") and c.endswith("_path") and pa.types.is_string(results.schema.field(c).type)]


def _fresh_rows(results: pa.Table, stage: str, since: datetime) -> pa.Table:
    status, finished = results.column(f"{stage}_status"), results.column(f"{stage}_finished_at")
    fresh = pc.and_(pc.is_in(status, pa.array(SUCCEEDED_STATUSES)),
                    pc.greater_equal(finished, pa.scalar(since, finished.type)))
    return results.filter(pc.fill_null(fresh, False))


def _file_sizes(store: Any, rows: list[list[str | None]]) -> dict[str, float]:
    """Bytes and files per row over a sample of rows that wrote files (read back: any storage)."""
    sample = [paths for paths in rows if any(paths)][:SAMPLED_ROWS]
    if not sample:
        return {}
    total = files = 0
    for path in (p for paths in sample for p in paths if p):
        try:
            total += len(store.read_bytes(path))
            files += 1
        except OSError:
            pass
    return {"bytes_per_row": total / len(sample), "files_per_row": files / len(sample)}


def _measure_stage(store: Any, results: pa.Table, stage: str, since: datetime,
                   loads: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per device kind: rows, seconds per row, bytes and files per row, load seconds per worker."""
    if any(f"{stage}_{c}" not in results.column_names for c in ("status", "seconds", "device", "finished_at")):
        return {}
    rows = _fresh_rows(results, stage, since)
    if rows.num_rows == 0:
        return {}
    devices = rows.column(f"{stage}_device").to_pylist()
    seconds = rows.column(f"{stage}_seconds").to_pylist()
    paths = list(zip(*[rows.column(c).to_pylist() for c in _file_columns(rows, stage)])) or [()] * rows.num_rows
    now = datetime.now(timezone.utc).isoformat()
    measured = {}
    for device in sorted(set(d for d in devices if d)):
        kind = device_kind(device)
        if kind is None:
            continue
        mine = [i for i, d in enumerate(devices) if d == device]
        record = measured.setdefault(kind, {"rows": 0, "seconds": 0.0, "paths": []})
        record["rows"] += len(mine)
        record["seconds"] += sum(seconds[i] or 0.0 for i in mine)
        record["paths"] += [list(paths[i]) for i in mine]
    found = {}
    for kind, record in measured.items():
        found[kind] = {"rows": record["rows"], "seconds_per_row": record["seconds"] / record["rows"],
                       "measured_at": now, **_file_sizes(store, record["paths"])}
        if loads:
            found[kind].update(load_seconds=sum(loads.values()) / len(loads), workers=len(loads))
    return found


def record_throughput(plan: Any, results: pa.Table, since: datetime,
                      loads: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """Keep this invocation's measurements per stage and device kind in run.json and the shared store.

    `loads`: per stage, the seconds its model loads took in each worker process that ran it.
    """
    store, cfg = plan.store, plan.config
    measured = {stage: kinds for stage in cfg.stages
                if (kinds := _measure_stage(store, results, stage, since, (loads or {}).get(stage) or {}))}
    if not measured:
        return {}
    info = store.read_run_json()
    history = info["throughput"] = info.get("throughput") if isinstance(info.get("throughput"), dict) else {}
    for stage, kinds in measured.items():
        if not isinstance(history.get(stage), dict):
            history[stage] = {}
        for kind, record in kinds.items():
            key = measurement_key(stage, cfg, plan.models.get(stage, {}), kind)
            history[stage][kind] = record = {**record, "key_hash": key_hash(key)}
            if _SHARED["write"]:
                write_measurement(cfg, key, {**record, "source": "run", "folder": str(store.root)})
    store.write_json(store.run_json, info)
    return measured


def record_folder_files(plan: Any, results: pa.Table) -> dict[str, Any] | None:
    """Bytes per row of the folder's own files (results, stage parts, run.json, report, thumbnails: all
    but images/), into the shared store; called once the report is written."""
    status = results.column("status")
    rows = int(pc.sum(pc.fill_null(pc.not_equal(status, "pending"), False)).as_py() or 0)
    if rows == 0 or not _SHARED["write"]:
        return None
    total = sum(size for path, size in plan.store.files_under("") if not path.startswith("images/"))
    measured = {"rows": rows, "bytes_per_row": total / rows, "measured_at": datetime.now(timezone.utc).isoformat(),
                "source": "run", "folder": str(plan.store.root)}
    write_measurement(plan.config, folder_key(plan.config), measured)
    return measured


# --- pricing, in the dry run ----------------------------------------------------------------------


@dataclass
class Measurement:
    """A measurement and where it came from: `store` (the shared one), `folder` (this folder's run.json)
    or `calibrated` (this dry run's one batch)."""

    values: Mapping[str, Any]
    origin: str

    def where(self, kind: str, folder: Any) -> str:
        if self.origin == "calibrated":
            return "calibrated now"
        day = str(self.values.get("measured_at") or "")[:10] or "an unknown day"
        if self.values.get("source") == "calibrate":
            return f"from calibrate on {kind} {day}"
        return f"from a run on {kind} {day} in {self.values.get('folder') or folder}"


@dataclass
class StageEstimate:
    stage: str
    rows: int  # rows to (re)compute
    images: int  # of them, rows that make an image (not skipped by the stage's own plan)
    kind: str  # the device kind it would run on here
    devices: int
    seconds: float | None  # None: no measurement yet; else work (spread over the devices) + loading
    measured_rows: int
    disk_bytes: float | None
    disk_source: str  # "measured", "calibrated", "bound" or "none"
    calibrated: bool = False  # measured by this dry run's one-batch calibration, not by earlier runs
    runs: int = 0  # rows the stage computes (not skipped)
    leased: bool = True  # takes a device lease: its time is device time
    workers: int = 1  # processes that each load its models
    measurement: Measurement | None = None
    price: float | None = None  # per device-hour, from `costs:`
    bound_label: str = "rough bound, width x height x 1.5"
    writes_files: bool = False

    @property
    def per_row(self) -> float:
        return float(self.measurement.values["seconds_per_row"]) if self.measurement else 0.0

    @property
    def load(self) -> float:
        return float(self.measurement.values.get("load_seconds") or 0.0) if self.measurement else 0.0

    @property
    def device_seconds(self) -> float:
        """Device time held: every row's seconds plus each worker's loads; none without a lease."""
        return self.per_row * self.runs + self.load * self.workers if self.leased else 0.0

    @property
    def cost(self) -> float | None:
        return None if self.price is None else self.device_seconds / 3600 * self.price

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
        if self.runs and self.writes_files:
            if self.disk_bytes is None:
                parts.append("disk: unknown until measured")
            else:
                label = {"measured": "measured by earlier runs", "calibrated": "calibrated now"}.get(
                    self.disk_source, self.bound_label)
                parts.append(f"disk about {_size(self.disk_bytes)} (estimate, {label})")
        return ", ".join(parts)

    def details(self, folder: Any) -> list[str]:
        """The sums behind the line, and where its measurement came from (what a person can check)."""
        if not self.rows or self.measurement is None:
            return []
        time = (f"time {self.seconds:.6g} s = {self.runs} rows x {self.per_row:.6g} s"
                + (f" / {self.devices} devices" if self.devices > 1 else "") + f" + {self.load:.6g} s loading")
        if not self.leased:
            money = "no device lease: no device time, no cost"
        else:
            money = f"{self.device_seconds / 3600:.6g} device-hours"
            money += (f", cost {self.cost:.6g} ({self.kind} at {self.price:g} per device-hour)" if self.price is not None
                      else f", cost: no price for {self.kind} in costs:")
        files = self.measurement.values.get("files_per_row")
        disk = (f"; disk {self.disk_bytes:.6g} bytes = {self.runs} rows x {self.measurement.values['bytes_per_row']:.6g} "
                f"bytes ({files:g} files per row)" if self.disk_source in ("measured", "calibrated") and files else "")
        return [f"    {time}; {money}{disk}", f"    {self.measurement.where(self.kind, folder)}"]


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


def _pixels_bound(planned: pa.Table, rows: np.ndarray) -> float | None:
    """width x height x 3/2 bytes per image (a PNG), from the plan's sizes where it has them."""
    for w, h in (("width", "height"), ("canvas_width", "canvas_height")):
        if w in planned.column_names and h in planned.column_names:
            take = pa.array(np.flatnonzero(rows))
            width = pc.fill_null(planned.column(w).take(take), 0).to_numpy(zero_copy_only=False).astype(float)
            height = pc.fill_null(planned.column(h).take(take), 0).to_numpy(zero_copy_only=False).astype(float)
            return float((width * height * BYTES_PER_PIXEL["png"]).sum())
    return None


def _bound(module: Any, planned: pa.Table, rows: np.ndarray, cfg: Any) -> tuple[float | None, str]:
    """A rough bound of the bytes the rows' files take: the stage's own (`disk_bound`), else its
    planned image size as PNG."""
    own = getattr(module, "disk_bound", None)
    if own is not None:
        per_row = own(cfg)
        return (None if per_row is None else per_row * int(rows.sum()),
                "rough bound, width x height x bytes per pixel of each format")
    return _pixels_bound(planned, rows), "rough bound, width x height x 1.5"


def _entry(throughput: Mapping[str, Any] | None, stage: str, kind: str) -> Any:
    kinds = (throughput or {}).get(stage)
    return kinds.get(kind) if isinstance(kinds, Mapping) else None


def _measurement(plan: Any, name: str, kind: str, history: Mapping[str, Any],
                 calibration: Mapping[str, Any] | None) -> Measurement | None:
    """This dry run's calibration, else the shared store's measurement of this key, else this
    folder's run.json one of the same key (run.json is a file anyone can edit: checked)."""
    calibrated = _entry(calibration, name, kind)
    if usable(calibrated):
        return Measurement(calibrated, "calibrated")
    key = measurement_key(name, plan.config, plan.models.get(name, {}), kind)
    stored = read_measurement(plan.config, key)
    if stored is not None:
        return Measurement(stored, "store")
    mine = _entry(history, name, kind)
    if usable(mine) and mine.get("key_hash") == key_hash(key):
        return Measurement(mine, "folder")
    return None


def estimate(plan: Any, masks: Mapping[str, np.ndarray], history: Mapping[str, Any],
             calibration: Mapping[str, Any] | None = None) -> list[StageEstimate]:
    """Per stage: rows to do, images to make, time, device time, cost and disk, priced from
    `calibration` (this dry run's batch), else the shared store, else `history` (run.json's throughput)."""
    found = []
    for name in plan.config.stages:
        todo = masks[name]
        planned = plan.planned[name]
        runs = todo.copy()
        if SKIP_COLUMN in planned.column_names:
            runs &= ~planned.column(SKIP_COLUMN).is_valid().to_numpy(zero_copy_only=False)
        module = registry.stages()[name]
        count = int(runs.sum())
        kind, devices, leased = _stage_kind(name, plan.config)
        measured = _measurement(plan, name, kind, history, calibration)
        values = measured.values if measured else {}
        seconds = (values["seconds_per_row"] * count / max(devices, 1) + float(values.get("load_seconds") or 0.0)
                   if measured else None)
        bound, label = _bound(module, planned, runs, plan.config)
        writes = module.MAKES_IMAGES or bound is not None or bool(values.get("files_per_row"))
        disk, source = None, "none"
        if count and measured and values.get("bytes_per_row") is not None:
            disk, source = values["bytes_per_row"] * count, ("calibrated" if measured.origin == "calibrated" else "measured")
        elif count and bound is not None:
            disk, source = bound, "bound"
        found.append(StageEstimate(
            name, int(todo.sum()), count if module.MAKES_IMAGES else 0, kind, devices, seconds,
            int(values["rows"]) if measured else 0, disk, source, measured is not None and measured.origin == "calibrated",
            count, leased, _workers(plan.config, kind, devices), measured, price(plan.config.costs, kind), label, writes))
    return found


# --- what the dry run prints ----------------------------------------------------------------------


BUDGETS = (("device_hours", "device-hours"), ("cost", "cost"), ("wall_hours", "wall hours"))


def _spend(e: StageEstimate, what: str) -> tuple[float, float]:
    """(per row, once) of one budget's unit for a stage: hours of device or wall time, or money."""
    if what == "wall_hours":
        return e.per_row / max(e.devices, 1) / 3600, e.load / 3600
    if not e.leased:
        return 0.0, 0.0
    hours = (e.per_row / 3600, e.load * e.workers / 3600)
    return hours if what == "device_hours" else (hours[0] * (e.price or 0.0), hours[1] * (e.price or 0.0))


def rows_that_fit(estimates: list[StageEstimate], what: str, budget: float) -> tuple[int, int, float, float]:
    """How many of the pending rows one budget covers: (rows, of rows, per row, once), assuming each
    stage's rows to compute are spread evenly over the run's pending rows."""
    busy = [e for e in estimates if e.runs]
    total = max(e.runs for e in busy)
    per_row = once = 0.0
    for e in busy:
        each, fixed = _spend(e, what)
        per_row += each * e.runs / total
        once += fixed
    if per_row <= 0:
        return (total if once <= budget else 0), total, per_row, once
    return max(0, min(total, math.floor((budget - once) / per_row))), total, per_row, once


def _budget_lines(estimates: list[StageEstimate], cfg: Any) -> list[str]:
    asked = [(what, unit, getattr(cfg.budget, what)) for what, unit in BUDGETS if getattr(cfg.budget, what) is not None]
    busy = [e for e in estimates if e.runs]
    if not asked or not busy:
        return []
    missing = [f"{e.stage} on {e.kind}" for e in busy if e.seconds is None]
    if missing:
        return [f"budget: cannot say how many rows fit: no measurement yet of {', '.join(missing)} "
                "(--calibrate measures one batch)"]
    lines = []
    for what, unit, amount in asked:
        unpriced = [e.kind for e in busy if what == "cost" and e.leased and e.price is None]
        if unpriced:
            lines.append(f"budget: cost {amount:g}: cannot say how many rows fit: no price for {', '.join(sorted(set(unpriced)))} in costs:")
            continue
        fit, total, per_row, once = rows_that_fit(estimates, what, amount)
        lines.append(f"budget: {amount:g} {unit} fits {fit} of {total} rows (estimate: {once:.6g} once + "
                     f"{per_row:.6g} per row)" + ("; the whole run fits" if fit == total else "; run again to continue"))
    return lines


def _folder_files(plan: Any, estimates: list[StageEstimate]) -> tuple[float | None, list[str]]:
    """The folder's own files for the rows to do, as earlier runs of these stages measured them per row."""
    rows = max([e.runs for e in estimates] or [0])
    measured = read_measurement(plan.config, folder_key(plan.config), ("bytes_per_row",))
    if not rows or measured is None:
        return None, []
    disk = measured["bytes_per_row"] * rows
    where = Measurement(measured, "store").where("any device", plan.store.root)
    return disk, [f"  folder files (results, stage parts, report, thumbnails): disk about {_size(disk)} (estimate, "
                  "measured by earlier runs)",
                  f"    disk {disk:.6g} bytes = {rows} rows x {measured['bytes_per_row']:.6g} bytes", f"    {where}"]


def _total_lines(estimates: list[StageEstimate], folder_bytes: float | None = None) -> list[str]:
    busy = [e for e in estimates if e.rows]
    lines = []
    if busy and all(e.seconds is not None for e in busy):
        seconds = sum(e.seconds for e in busy)
        hours = sum(e.device_seconds for e in busy) / 3600
        costs = [e.cost for e in busy if e.leased]
        money = (f"cost {sum(costs):.6g}" if all(c is not None for c in costs)
                 else "cost: no prices (set costs: per device kind or name)")
        lines.append(f"total: about {_duration(seconds)} of work (stages overlap across shards, so "
                     "the run may take less)")
        lines.append(f"total: {seconds:.6g} s of work, {hours:.6g} device-hours, {money}")
    disk = [e.disk_bytes for e in estimates if e.runs and e.disk_bytes is not None]
    disk += [folder_bytes] if folder_bytes is not None else []
    if disk:
        lines.append(f"disk: about {_size(sum(disk))} of new files (estimate, {sum(disk):.6g} bytes)")
    return lines


def plan_only(plan: Any, recorded: Mapping | None, retry_failed: bool,
              calibrate: Callable[[], tuple[Mapping[str, Any], int]] | None = None) -> list[str]:
    """What `run --dry-run` prints: the plan a run would follow, priced; reads the folder, writes nothing
    into it (a calibration keeps its measurement in the shared store beside the model cache).

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
        stored = _store_calibration(plan, calibration)
        if stored:
            lines.append(f"calibrated: kept for later dry runs and runs in {stored}")
        estimates = estimate(plan, masks, history, calibration)
    for e in estimates:
        lines += [f"  {e.line()}", *e.details(plan.store.root)]
    folder = _folder_files(plan, estimates)
    lines += folder[1]
    lines += _total_lines(estimates, folder[0])
    lines += _budget_lines(estimates, plan.config)
    return lines


def _store_calibration(plan: Any, calibration: Mapping[str, Any]) -> str | None:
    """Keep the calibration's measurements in the shared store under this run's keys; the folder."""
    folder = None
    for name in plan.config.stages:
        kinds = calibration.get(name) if isinstance(calibration.get(name), Mapping) else {}
        for kind, values in kinds.items():
            if usable(values):
                key = measurement_key(name, plan.config, plan.models.get(name, {}), kind)
                folder = write_measurement(plan.config, key, {**values, "source": "calibrate"}).parent
    return str(folder) if folder else None
