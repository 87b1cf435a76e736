"""results.parquet: one row per (id, variant), every stage's columns, and a summary.

The catalog's own columns come first, in their own types (so the results join back to the
catalog on `id` in pandas, DuckDB or `datasets`), then `variant`, then the summary, then each
stage's columns under its name (`generate_seed`, `enhance_prompt`, …).

The summary describes the last stage a row reached: `status` is `ok` when every stage succeeded
(a stage may record `fallback` or `degenerate` and still let the row go on), `failed` at the
first stage that failed (with that stage's name in `error`), and `skipped` only when every stage
skipped the row; `stage` names that stage; `image_*` describe the final image, the one of the
last stage that made one (each stage's own image stays in its `<stage>_image_*` columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen.images import catalog_as_given
from catalogen.runplan import RunPlan, done_results, stage_modules
from catalogen.store import STATUSES, SUCCEEDED

IMAGE_FIELDS = (("image_path", pa.string()), ("image_sha256", pa.string()), ("image_width", pa.int32()),
                ("image_height", pa.int32()))


def _text(values: pa.Array) -> np.ndarray:
    return np.array(values.to_pylist(), dtype=object)


def _summary(plan: RunPlan, stage_tables: dict[str, pa.Table]) -> dict[str, pa.Array]:
    n = plan.rows.num_rows
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    reached = np.full(n, None, dtype=object)
    all_skipped = np.ones(n, dtype=bool)
    image = {name: np.full(n, None, dtype=object) for name, _ in IMAGE_FIELDS}
    for name, table in stage_tables.items():
        s_status = _text(table.column("status"))
        s_error = _text(table.column("error"))
        open_rows = status == "ok"
        missing = open_rows & (s_status == None)  # noqa: E711 - elementwise over an object array
        failed = open_rows & (s_status == "failed")
        status[missing | failed] = "failed"
        error[missing] = f"{name}: no result recorded (its shard crashed; see the logs)"
        error[failed] = [f"{name}: {e}" for e in s_error[failed]]
        reached[missing | failed] = name
        succeeded = open_rows & np.isin(s_status, SUCCEEDED)
        reached[succeeded] = name
        all_skipped &= s_status == "skipped"
        if "image_path" in table.column_names:
            has_image = succeeded & (_text(table.column("image_path")) != None)  # noqa: E711
            for column, _ in IMAGE_FIELDS:
                image[column][has_image] = _text(table.column(column))[has_image]
    status[all_skipped] = "skipped"
    error[all_skipped] = [f"{plan.config.stages[-1]}: {e}" for e in _text(stage_tables[plan.config.stages[-1]].column("error"))[all_skipped]]
    summary = {"status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
               "stage": pa.array(reached, pa.string())}
    summary.update({column: pa.array(image[column], typ) for column, typ in IMAGE_FIELDS})
    return summary


def assemble_results(plan: RunPlan) -> pa.Table:
    """The results table: catalog columns, `variant`, summary, then every stage's columns."""
    table = catalog_as_given(plan.catalog).take(plan.rows.column("index"))
    table = table.append_column("variant", plan.rows.column("variant"))
    stage_tables = {}
    for name, module in stage_modules(plan.config).items():
        columns = [c for c in module.OUTPUT_SCHEMA.names if c not in ("id", "variant")]
        stage_tables[name] = done_results(plan, name, columns)
    for column, values in _summary(plan, stage_tables).items():
        table = table.append_column(column, values)
    for name, found in stage_tables.items():
        for column in stage_modules(plan.config)[name].OUTPUT_SCHEMA.names:
            if column in found.column_names:
                table = table.append_column(f"{name}_{column}", found.column(column))
    return table


def summarize(results: pa.Table, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Row counts by summary status, and by status within each stage."""
    counts = pc.value_counts(results.column("status")).to_pylist()
    by_status = {c["values"]: c["counts"] for c in counts}
    summary: dict[str, Any] = {"rows": results.num_rows, **{s: by_status.get(s, 0) for s in ("ok", "failed", "skipped")}}
    per_stage = {}
    for name in stages:
        found = {c["values"]: c["counts"] for c in pc.value_counts(results.column(f"{name}_status")).to_pylist()}
        per_stage[name] = {s: found[s] for s in STATUSES if found.get(s)}
    if stages:
        summary["stages"] = per_stage
    return summary
