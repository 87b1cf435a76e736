"""Looking after a run folder without running anything: status, verify, clean.

These read the folder alone (run.json, the parts, results.parquet), never the catalog or a
model, so they answer in seconds even for runs of millions of rows.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from catalogen.storage.hashing import sha256_file
from catalogen.run.results import image_prefix, is_image_list, recorded_images
from catalogen.review.decisions import DecisionError
from catalogen.review.state import current, state_counts
from catalogen.stage import SHARED_COLUMNS
from catalogen.storage.store import STATUSES, SUCCEEDED, RunStateError, RunStore, now_utc

_RECORD = pa.schema(SHARED_COLUMNS)


def _stages(info: dict[str, Any]) -> list[str]:
    return list(info.get("config", {}).get("stages", []))


def _parts(store: RunStore, stage: str, schema: pa.Schema) -> pa.Table:
    return store.dataset(store.part_files(stage), schema).to_table()


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
    return {"rows": rows, "catalog": info.get("catalog", {}).get("path"), "stages": stages, "running": store.holder(),
            "trial": info.get("trial"), "review": review_status(store)}


def review_status(store: RunStore) -> dict[str, int] | None:
    """Rows per review state as of now (the run's gates, then reviewers' decisions); None before any results."""
    if not store.results_path.exists():
        return None
    try:
        return state_counts(current(store))
    except DecisionError as exc:
        raise RunStateError(str(exc)) from None


VERIFY_PREFIX = "verify: "


def verify_images(
    store: RunStore, progress: Callable[[int, int], None] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Re-hash every file the current results point at, in every stage; mark missing or changed ones failed.

    Only what results.parquet points at is checked: images of superseded settings are `clean`'s
    business. The failures go into a new part per stage under the row's current key (the newest
    result wins, so `run --retry-failed` redoes those rows and the stages after them), and into
    results.parquet. Returns the new failures, and how many rows an earlier verify marked that no
    run has redone yet.
    """
    if not store.results_path.exists():
        raise RunStateError(f"{store.results_path} does not exist yet: finish a run before verifying")
    results = store.read_table(store.results_path)
    ids = pc.cast(results.column("id"), pa.string()).to_pylist()
    variants = results.column("variant").to_pylist()
    checks = []
    still_marked = 0
    for stage in _stages(store.read_run_json()):
        if f"{stage}_status" not in results.column_names:
            continue
        status = results.column(f"{stage}_status").to_pylist()
        errors = results.column(f"{stage}_error").to_pylist()
        keys = results.column(f"{stage}_key").to_pylist()
        still_marked += sum(s == "failed" and (e or "").startswith(VERIFY_PREFIX) for s, e in zip(status, errors))
        for image in (name for name in recorded_images(results) if name.split(".")[0] == stage):
            column = f"{image_prefix(image)}_path"
            paths = results.column(column).to_pylist()
            hashes = results.column(f"{image_prefix(image)}_sha256").to_pylist()
            for row, path in enumerate(paths):
                if path and status[row] in SUCCEEDED:
                    checks.append({"stage": stage, "id": ids[row], "variant": variants[row], "key": keys[row],
                                   "column": column, "image_path": path, "image_sha256": hashes[row]})
    bad = []
    for done, check in enumerate(checks, start=1):
        path = store.root / check["image_path"]
        if not path.is_file():
            bad.append({**check, "error": f"{VERIFY_PREFIX}image missing: {check['image_path']}"})
        elif sha256_file(path) != check["image_sha256"]:
            bad.append({**check, "error": f"{VERIFY_PREFIX}image changed since it was written: {check['image_path']}"})
        if progress is not None and (done % 100 == 0 or done == len(checks)):
            progress(done, len(checks))
    for stage in dict.fromkeys(b["stage"] for b in bad):
        finished = now_utc()
        records = {}
        for b in (b for b in bad if b["stage"] == stage):  # one record per row, whichever of its files failed
            records.setdefault((b["id"], b["variant"]), {
                "id": b["id"], "variant": b["variant"], "key": b["key"], "status": "failed", "error": b["error"],
                "seconds": 0.0, "device": "verify", "finished_at": finished})
        store.write_part(stage, f"verify-{time.strftime('%Y%m%dT%H%M%S')}",
                         pa.Table.from_pylist(list(records.values()), schema=_RECORD))
    if bad:
        _mark_results(store, results, bad)
    return bad, still_marked


def _mark_results(store: RunStore, results: pa.Table, bad: list[dict[str, Any]]) -> None:
    """Mark the rows whose file is bad as failed in results.parquet too."""
    for stage in dict.fromkeys(b["stage"] for b in bad):
        reasons = {(b["id"], b["variant"]): b["error"] for b in bad if b["stage"] == stage}
        rows = zip(pc.cast(results.column("id"), pa.string()).to_pylist(), results.column("variant").to_pylist())
        errors = pa.array([reasons.get(row) for row in rows], pa.string())
        hit = errors.is_valid()
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


def orphan_images(store: RunStore) -> list[tuple[str, int]]:
    """Files under images/ that no current row points at (not in results.parquet, in any stage's file
    column, nor in a part written since): their paths relative to the folder, and their sizes."""
    if not store.results_path.exists():
        raise RunStateError(f"{store.results_path} does not exist yet: finish a run before cleaning")
    results = store.read_table(store.results_path)
    referenced = set()
    for name in results.column_names:
        if name.endswith("_path"):
            referenced.update(p for p in results.column(name).to_pylist() if isinstance(p, str))
    written = store.results_path.stat().st_mtime
    for stage in _stages(store.read_run_json()):
        for part in store.part_files(stage):
            if part.stat().st_mtime > written:
                table = store.read_table(part)
                for name in (c for c in table.column_names if c.endswith("_path")):
                    referenced.update(p for p in table.column(name).to_pylist() if isinstance(p, str))
                for name in (c for c in table.column_names if is_image_list(table.schema.field(c).type)):
                    referenced.update(_listed_paths(table.column(name)))  # renditions, as a part holds them
    return [(path, size) for path, size in store.files_under("images") if path not in referenced]


def _listed_paths(column: pa.ChunkedArray) -> set[str]:
    """The `path` of every item of a list-of-images column (see `results.is_image_list`)."""
    paths = set()
    for items in column.to_pylist():
        paths.update(item["path"] for item in items or () if item.get("path"))
    return paths
