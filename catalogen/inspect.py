"""Looking after a run folder without running anything: status, verify, clean.

These read the folder alone (run.json, the parts, results.parquet), never the catalog or a
model, so they answer in seconds even for runs of millions of rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from catalogen.hashing import sha256_file
from catalogen.stage import IMAGE_COLUMNS, SHARED_COLUMNS
from catalogen.store import STATUSES, SUCCEEDED, RunStateError, RunStore, now_utc

_RECORD = pa.schema(SHARED_COLUMNS)
_WITH_IMAGES = pa.schema([*SHARED_COLUMNS, *IMAGE_COLUMNS])


def _stages(info: dict[str, Any]) -> list[str]:
    return list(info.get("config", {}).get("stages", []))


def _parts(store: RunStore, stage: str, schema: pa.Schema, newer_than: float | None = None) -> pa.Table:
    files = [p for p in store.part_files(stage) if newer_than is None or p.stat().st_mtime > newer_than]
    return ds.dataset([str(p) for p in files], format="parquet", schema=schema).to_table()


def _newest(rows: pa.Table, by: list[str]) -> pa.Table:
    """The newest row per `by` group (by finished_at)."""
    if rows.num_rows == 0:
        return rows
    rows = rows.sort_by([("finished_at", "ascending")])
    others = [c for c in rows.column_names if c not in by]
    newest = rows.group_by(by, use_threads=False).aggregate([(c, "last") for c in others])
    return newest.rename_columns([*by, *others])


def folder_status(store: RunStore) -> dict[str, Any]:
    """Per stage: rows by their newest recorded status, and rows with none yet (pending).

    Counts what the parts record, whatever the key; rows whose settings changed since are counted
    by their old result until a run recomputes them.
    """
    info = store.read_run_json()
    rows = int(info.get("catalog", {}).get("rows", 0))
    stages = {}
    for stage in _stages(info):
        newest = _newest(_parts(store, stage, _RECORD).select(["id", "variant", "status", "finished_at"]),
                         ["id", "variant"])
        counts = {c["values"]: c["counts"] for c in pc.value_counts(newest.column("status")).to_pylist()} if newest.num_rows else {}
        counts = {s: counts.get(s, 0) for s in STATUSES}
        counts["pending"] = max(0, rows - newest.num_rows)
        stages[stage] = counts
    return {"rows": rows, "catalog": info.get("catalog", {}).get("path"), "stages": stages, "running": store.holder()}


VERIFY_PREFIX = "verify: "


def verify_images(
    store: RunStore, progress: Callable[[int, int], None] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Re-hash every image a result row points at; record missing or changed ones as failed.

    The failures go into a new part per stage (the newest result wins, so `run --retry-failed`
    redoes those rows, and the stages after them), and into results.parquet. Returns the new
    failures, and how many rows an earlier verify marked that no run has redone yet.
    """
    info = store.read_run_json()
    checks = []
    still_marked = 0
    for stage in _stages(info):
        found = _newest(_parts(store, stage, _WITH_IMAGES), ["id", "variant", "key"])
        if found.num_rows == 0:
            continue
        marked = pc.starts_with(pc.fill_null(found.column("error"), ""), VERIFY_PREFIX)
        still_marked += pc.sum(pc.and_(marked, pc.equal(found.column("status"), "failed"))).as_py() or 0
        ok = pc.and_(pc.is_in(found.column("status"), pa.array(list(SUCCEEDED))), found.column("image_path").is_valid())
        for row in found.filter(ok).select(["id", "variant", "key", "image_path", "image_sha256"]).to_pylist():
            checks.append((stage, row))
    bad = []
    for done, (stage, row) in enumerate(checks, start=1):
        path = store.root / row["image_path"]
        if not path.is_file():
            bad.append({"stage": stage, **row, "error": f"{VERIFY_PREFIX}image missing: {row['image_path']}"})
        elif sha256_file(path) != row["image_sha256"]:
            bad.append({"stage": stage, **row, "error": f"{VERIFY_PREFIX}image changed since it was written: {row['image_path']}"})
        if progress is not None and (done % 100 == 0 or done == len(checks)):
            progress(done, len(checks))
    for stage in {b["stage"] for b in bad}:
        mine = [b for b in bad if b["stage"] == stage]
        finished = now_utc()
        records = [{"id": b["id"], "variant": b["variant"], "key": b["key"], "status": "failed", "error": b["error"],
                    "seconds": 0.0, "device": "verify", "finished_at": finished} for b in mine]
        store.write_part(stage, f"verify-{time.strftime('%Y%m%dT%H%M%S')}", pa.Table.from_pylist(records, schema=_RECORD))
    if bad and store.results_path.exists():
        _mark_results(store, bad)
    return bad, still_marked


def _mark_results(store: RunStore, bad: list[dict[str, Any]]) -> None:
    """Mark the rows whose image is bad as failed in results.parquet too."""
    results = pq.read_table(store.results_path)
    for stage in {b["stage"] for b in bad}:
        column = f"{stage}_image_path"
        if column not in results.column_names:
            continue
        reasons = {b["image_path"]: b["error"] for b in bad if b["stage"] == stage}
        paths = results.column(column)
        hit = pc.fill_null(pc.is_in(paths, pa.array(list(reasons))), False)
        errors = pa.array([reasons.get(p) for p in paths.to_pylist()], pa.string())
        updates = {
            f"{stage}_status": pc.if_else(hit, "failed", results.column(f"{stage}_status")),
            f"{stage}_error": pc.if_else(hit, errors, results.column(f"{stage}_error")),
            "error": pc.if_else(pc.and_(hit, pc.not_equal(results.column("status"), "failed")),
                                pc.binary_join_element_wise(pa.scalar(stage), errors, ": "), results.column("error")),
            "status": pc.if_else(hit, "failed", results.column("status")),
        }
        for name, values in updates.items():
            results = results.set_column(results.schema.get_field_index(name), name, values)
    store.write_results(results)


def orphan_images(store: RunStore) -> list[Path]:
    """Image files no current row points at: not in results.parquet, nor in a part written since."""
    if not store.results_path.exists():
        raise RunStateError(f"{store.results_path} does not exist yet: finish a run before cleaning")
    results = pq.read_table(store.results_path)
    referenced = set()
    for name in results.column_names:
        if name.endswith("image_path"):
            referenced.update(p for p in results.column(name).to_pylist() if p)
    written = store.results_path.stat().st_mtime
    for stage in _stages(store.read_run_json()):
        recent = _parts(store, stage, _WITH_IMAGES, newer_than=written)
        referenced.update(p for p in recent.column("image_path").to_pylist() if p)
    images = store.root / "images"
    files = sorted(p for p in images.rglob("*") if p.is_file()) if images.is_dir() else []
    return [p for p in files if str(p.relative_to(store.root)) not in referenced]
