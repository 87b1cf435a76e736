"""results.parquet: one row per (id, variant), every stage's columns, and a summary.

The catalog's own columns come first, in their own types (so the results join back to the
catalog on `id` in pandas, DuckDB or `datasets`), then `variant`, then the summary, then each
stage's columns under its name (`generate_seed`, `enhance_prompt`, …). A stage's list of named
images (renditions' `renditions` column) becomes columns per name (`renditions_<name>_path`,
`_sha256`, `_bytes`, `_width`, `_height`, `_format`), so every image is a `_path` column.

The summary describes the last stage a row reached: `status` is `ok` when every stage succeeded
(a stage may record `fallback` or `degenerate` and still let the row go on), `failed` at the
first stage that failed (with that stage's name in `error`), and `skipped` only when every stage
skipped the row; `stage` names that stage; `image_*` describe the final image, the one of the
last stage that made one (each stage's own image stays in its `<stage>_image_*` columns);
`product_identical` says whether that final image holds the product's own pixels (the check of the
product stage that made it; null where that stage knows of no product); `device_seconds` and `cost`
sum the row's `<stage>_device_seconds` and `<stage>_cost` (catalogen/run/costs.py).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen.media.images import catalog_as_given
from catalogen.run.costs import row_totals
from catalogen.run.plan import RunPlan, done_results, stage_modules
from catalogen.storage.store import STATUSES, SUCCEEDED

NOTED = ("fallback", "degenerate")  # success statuses a person should still hear about
# What each means, where a count of them is printed (see catalogen/storage/store.py STATUSES)
NOTE_MEANINGS = {"fallback": "LLM answers that could not be used, the prompt kept as given",
                 "degenerate": "captions flagged as useless"}
SUMMARY_REASON_CHARS = 120  # reasons in summarize(): one line of a terminal or a Prefect artifact
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?<![\w.])/[^\s,;:)]+")
_LONG_NUMBER = re.compile(r"\b[0-9a-f]{8,}\b|\b\d{5,}\b")

IMAGE_FIELDS = (("image_path", pa.string()), ("image_sha256", pa.string()), ("image_width", pa.int32()),
                ("image_height", pa.int32()))


def _text(values: pa.Array) -> np.ndarray:
    return np.array(values.to_pylist(), dtype=object)


def _summary(plan: RunPlan, stage_tables: dict[str, pa.Table], pending_label: str | None) -> dict[str, pa.Array]:
    n = plan.rows.num_rows
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    reached = np.full(n, None, dtype=object)
    all_skipped = np.ones(n, dtype=bool)
    image = {name: np.full(n, None, dtype=object) for name, _ in IMAGE_FIELDS}
    product = np.full(n, None, dtype=object)
    for name, table in stage_tables.items():
        s_status = _text(table.column("status"))
        s_error = _text(table.column("error"))
        open_rows = status == "ok"
        missing = open_rows & (s_status == None)  # noqa: E711 - elementwise over an object array
        failed = open_rows & (s_status == "failed")
        status[failed] = "failed"
        if pending_label is None:
            status[missing] = "failed"
            error[missing] = f"{name}: no result recorded (its shard crashed; see the logs)"
        else:
            status[missing] = pending_label
        error[failed] = [f"{name}: {e}" for e in s_error[failed]]
        reached[missing | failed] = name
        succeeded = open_rows & np.isin(s_status, SUCCEEDED)
        reached[succeeded] = name
        all_skipped &= s_status == "skipped"
        if "image_path" in table.column_names:
            has_image = succeeded & (_text(table.column("image_path")) != None)  # noqa: E711
            for column, _ in IMAGE_FIELDS:
                image[column][has_image] = _text(table.column(column))[has_image]
            # whether the final image kept the product's pixels: the verdict of the stage that made it
            kept = _text(table.column("product_identical")) if "product_identical" in table.column_names else None
            product[has_image] = None if kept is None else kept[has_image]
    last = list(stage_tables)[-1]
    status[all_skipped] = "skipped"
    error[all_skipped] = [f"{last}: {e}" for e in _text(stage_tables[last].column("error"))[all_skipped]]
    summary = {"status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
               "stage": pa.array(reached, pa.string())}
    summary.update({column: pa.array(image[column], typ) for column, typ in IMAGE_FIELDS})
    summary["product_identical"] = pa.array(product, pa.bool_())
    summary.update(row_totals(stage_tables))  # device_seconds, cost: the row's, over its stages
    return summary


def assemble_results(plan: RunPlan, pending_label: str | None = None, leave_out: Sequence[str] = ()) -> pa.Table:
    """The results table: catalog columns, `variant`, summary, then every stage's columns.

    A row with no result in a stage failed there (its shard crashed), unless the run was stopped:
    then its status is `pending_label` (a re-run computes it). The stages in `leave_out` (those that
    wait for review states, see flows/run.py) are not part of it.
    """
    table = catalog_as_given(plan.catalog).take(plan.rows.column("index"))
    table = table.append_column("variant", plan.rows.column("variant"))
    stage_tables = {}
    for name, module in stage_modules(plan.config).items():
        if name in leave_out:
            continue
        columns = [c for c in module.OUTPUT_SCHEMA.names if c not in ("id", "variant")]
        stage_tables[name] = done_results(plan, name, columns)
    for column, values in _summary(plan, stage_tables, pending_label).items():
        table = table.append_column(column, values)
    for name, found in stage_tables.items():
        for column in stage_modules(plan.config)[name].OUTPUT_SCHEMA.names:
            if column not in found.column_names:
                continue
            if is_image_list(found.schema.field(column).type):
                for flat, values in image_list_columns(name, found.column(column)).items():
                    table = table.append_column(flat, values)
            else:
                table = table.append_column(f"{name}_{column}", found.column(column))
    if plan.scope is None:
        return table
    # A trial keeps its own rows and every row an earlier run finished, never fewer.
    recorded = np.logical_or.reduce([t.column("status").is_valid().to_numpy(zero_copy_only=False)
                                     for t in stage_tables.values()])
    return table.filter(pa.array(plan.scope | recorded))


def kept(plan: RunPlan) -> tuple[int, int, dict[str, int]]:
    """What the parts on disk hold now, counted as the same command would: (rows finished, that is
    with a result in every stage; rows of the results; per stage, the rows with a result, which a
    re-run skips). Read at the end of a stopped run, after its last part was written, so a stop
    line says what was kept, however the run's summary counted before."""
    recorded = {name: done_results(plan, name, []).column("status").is_valid().to_numpy(zero_copy_only=False)
                for name in plan.config.stages}
    rows = plan.in_scope() | np.logical_or.reduce(list(recorded.values())) if recorded else plan.in_scope()
    finished = np.logical_and.reduce(list(recorded.values())) & rows if recorded else rows
    return int(finished.sum()), int(rows.sum()), {name: int((mask & rows).sum()) for name, mask in recorded.items()}


IMAGE_LIST_FIELDS = ("path", "sha256", "bytes", "width", "height", "format")


def is_image_list(typ: pa.DataType) -> bool:
    """A stage's list of named images (renditions: name, path, sha256, width, …), see `image_list_columns`."""
    return (pa.types.is_list(typ) and pa.types.is_struct(typ.value_type)
            and {"name", "path", "sha256", "width"} <= {f.name for f in typ.value_type})


def image_list_columns(stage: str, values: pa.ChunkedArray) -> dict[str, pa.Array]:
    """A list of named images per row as columns per name, `<stage>_<name>_path`, `_sha256`, … (so
    `recorded_images` finds each as `<stage>.<name>`), names in order of first appearance."""
    struct = values.type.value_type
    fields = [f for f in IMAGE_LIST_FIELDS if struct.get_field_index(f) >= 0]
    by_name: list[dict[str, dict]] = []  # per row: its images by name
    names: dict[str, None] = {}  # every name, in order of first appearance
    for items in values.to_pylist():
        by_name.append({item["name"]: item for item in items or ()})
        names.update(dict.fromkeys(by_name[-1]))
    columns = {}
    for name in names:
        for field_name in fields:
            found = [row[name][field_name] if name in row else None for row in by_name]
            columns[f"{stage}_{name}_{field_name}"] = pa.array(found, struct.field(field_name).type)
    return columns


def error_reason(error: str) -> str:
    """An error message without what differs from row to row (quoted values, paths, hashes, long
    numbers), so equal causes count together, as img2dataset's status dict does."""
    first_line = error.strip().splitlines()[0] if error.strip() else error
    reason = _QUOTED.sub("'…'", first_line)
    reason = _PATH.sub("…", reason)
    reason = _LONG_NUMBER.sub("…", reason)
    return reason[:200]


def row_notes(results: pa.Table, stages: Sequence[str]) -> list[str | None]:
    """Each row's message: its summary `error` (failed or skipped), else the first stage that
    recorded fallback or degenerate, as `<stage> <status>: <that stage's error>`; None for a clean row.

    An ok row can carry a fallback prompt or a degenerate caption: counting only `error` hides them.
    """
    notes = results.column("error").to_pylist()
    for stage in stages:
        statuses = results.column(f"{stage}_status").to_pylist()
        errors = results.column(f"{stage}_error").to_pylist() if f"{stage}_error" in results.column_names \
            else [None] * results.num_rows
        for i, (status, error) in enumerate(zip(statuses, errors)):
            if notes[i] is None and status in NOTED:
                notes[i] = f"{stage} {status}: {error}" if error else f"{stage} {status}"
    return notes


def count_reasons(notes: Iterable[str | None], chars: int = 200) -> list[tuple[str, int]]:
    """Reasons counted over rows (equal causes together, see `error_reason`), most frequent first."""
    return Counter(error_reason(n)[:chars] for n in notes if n).most_common()


def rows_with(results: pa.Table, stages: Sequence[str], status: str) -> np.ndarray:
    """Which rows some stage recorded `status` for (a per-stage status such as degenerate)."""
    found = np.zeros(results.num_rows, dtype=bool)
    for stage in stages:
        found |= _text(results.column(f"{stage}_status")) == status
    return found


def image_prefix(name: str) -> str:
    """The column prefix of a recorded image: `generate` -> `generate_image`, `remove_bg.canvas` ->
    `remove_bg_canvas` (its columns: `<prefix>_path`, `_sha256`, `_width`, `_height`)."""
    stage, _, image = name.partition(".")
    return f"{stage}_{image or 'image'}"


def recorded_images(results: pa.Table) -> list[str]:
    """The images a run recorded, by name, in column order: `<stage>` for a stage's image, and
    `<stage>.<image>` for another image it wrote, such as remove_bg's marketplace canvas
    (`remove_bg.canvas`). An image is a `_path` column with `_sha256` and `_width` beside it."""
    names = set(results.column_names)
    stages = [c.removesuffix("_status") for c in results.column_names if c.endswith("_status") and c != "status"]
    found = []
    for stage in stages:
        for column in results.column_names:
            prefix = column.removesuffix("_path")
            if column.startswith(f"{stage}_") and column.endswith("_path") and {f"{prefix}_sha256", f"{prefix}_width"} <= names:
                image = prefix.removeprefix(f"{stage}_")
                found.append(stage if image == "image" else f"{stage}.{image}")
    return found


def summarize(results: pa.Table, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Row counts by summary status, rows any stage marked fallback or degenerate, the reasons of
    failed, fallback and degenerate rows (reason -> rows), counts by status within each stage, and
    the rows whose final image is a near-duplicate of an earlier row's (`near_duplicates`)."""
    counts = pc.value_counts(results.column("status")).to_pylist()
    by_status = {c["values"]: c["counts"] for c in counts}
    summary: dict[str, Any] = {"rows": results.num_rows, **{s: by_status.get(s, 0) for s in ("ok", "failed", "skipped")}}
    for status in NOTED:
        summary[status] = int(rows_with(results, stages, status).sum())
    statuses = results.column("status").to_pylist()
    noted = (note for note, status in zip(row_notes(results, stages), statuses) if status != "skipped")
    summary["reasons"] = dict(count_reasons(noted, SUMMARY_REASON_CHARS))
    per_stage = {}
    for name in stages:
        found = {c["values"]: c["counts"] for c in pc.value_counts(results.column(f"{name}_status")).to_pylist()}
        per_stage[name] = {s: found[s] for s in STATUSES if found.get(s)}
    if stages:
        summary["stages"] = per_stage
    if "near_duplicate_of" in results.column_names:  # see catalogen/media/duplicates.py
        summary["near_duplicates"] = int(pc.sum(pc.is_valid(results.column("near_duplicate_of"))).as_py() or 0)
    return summary
