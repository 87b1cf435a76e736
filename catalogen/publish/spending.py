"""The report's device time and cost: per stage, per ok image, and a small static SVG chart.

Read from results.parquet alone (`<stage>_device_seconds`, `<stage>_cost` and the row totals
`device_seconds`, `cost`, see catalogen/run/costs.py): what the rows in the results cost, however
many invocations made them. The chart is geometry only (numbers and labels); the report's template
draws it as inline SVG, its text escaped like the rest of the page, no script, no network.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BAR_WIDTH = 240  # px of the longest bar
HISTOGRAM_BINS = 10
HISTOGRAM_HEIGHT = 80  # px of the tallest bin


def _sum(results: pa.Table, column: str) -> float | None:
    """The column's sum; None where it is absent or every value is null."""
    if column not in results.column_names or results.column(column).null_count == results.num_rows:
        return None
    return float(pc.sum(results.column(column)).as_py() or 0.0)


def _stage_bars(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    longest = max((s["device_seconds"] or 0.0 for s in stages), default=0.0)
    return [{"label": s["name"], "seconds": s["device_seconds"] or 0.0, "y": 4 + 22 * i,
             "width": round(BAR_WIDTH * (s["device_seconds"] or 0.0) / longest, 1) if longest else 0.0}
            for i, s in enumerate(stages)]


def _histogram(seconds: np.ndarray) -> dict[str, Any] | None:
    """Rows per bin of device seconds per row (the rows that held a device)."""
    if not len(seconds):
        return None
    counts, edges = np.histogram(seconds, bins=HISTOGRAM_BINS)
    tallest = int(counts.max())
    bins = [{"x": 22 * i, "height": round(HISTOGRAM_HEIGHT * int(n) / tallest, 1), "rows": int(n),
             "low": float(edges[i]), "high": float(edges[i + 1])} for i, n in enumerate(counts)]
    return {"bins": bins, "low": float(edges[0]), "high": float(edges[-1]), "rows": int(len(seconds))}


def spending(results: pa.Table, stages: Sequence[str]) -> dict[str, Any] | None:
    """Device seconds and cost per stage and in all, per ok image, and the chart; None for results
    without the columns (a folder made before they existed)."""
    if "device_seconds" not in results.column_names:
        return None
    per_stage = [{"name": s, "device_seconds": _sum(results, f"{s}_device_seconds"), "cost": _sum(results, f"{s}_cost")}
                 for s in stages]
    total_seconds, total_cost = _sum(results, "device_seconds"), _sum(results, "cost")
    ok = int(pc.sum(pc.equal(results.column("status"), "ok")).as_py() or 0)
    held = results.column("device_seconds").drop_null().to_numpy()
    return {
        "stages": per_stage,
        "device_seconds": total_seconds or 0.0,
        "cost": total_cost,
        "ok": ok,
        "per_ok_seconds": (total_seconds or 0.0) / ok if ok else None,
        "per_ok_cost": total_cost / ok if ok and total_cost is not None else None,
        "bars": _stage_bars(per_stage),
        "histogram": _histogram(held[held > 0]),
    }
