"""Best-of-N and quality gates at scale: `catalogen.review.select.decide` over 1,000,000 synthetic rows.

(Not named select.py: a script's folder comes first on sys.path, and `select` would hide the standard module.)

The goal (issue 21): selection and gates over a million results rows in at most 10 s and 1 GB on
this machine. The rows are 250,000 ids x 4 variants with the columns the rules read: two scores,
`product_identical`, `generate_safety_flagged`, `caption_status`, `near_duplicate_of` and a 1%
share of failed rows. The settings are a storefront's: a weighted score, two `require` rules, two
`reject_if` and two `approve_if` rules. Printed: seconds (median and fastest of N repeats), the peak
memory the process held above what it held before the first call (tracemalloc sees pyarrow's
buffers only through the default memory pool's statistics, so both are printed), and the states.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/select_gates.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalogen.config import ReviewSettings, SelectSettings  # noqa: E402
from catalogen.review.select import decide  # noqa: E402

GOAL_S, GOAL_GB = 10.0, 1.0
SELECT = SelectSettings(by="score_aesthetic + 0.05 * score_clip", keep=1,
                        require=["product_identical == true", "generate_safety_flagged != true"])
REVIEW = ReviewSettings(reject_if=["caption_status == degenerate", "near_duplicate_of != null"],
                        approve_if=["score_aesthetic >= 5", "score_clip >= 25"])


def synthetic(rows: int, variants: int = 4, seed: int = 0) -> pa.Table:
    """`rows` results rows: ids of `variants` candidates each, with the columns the rules read."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(rows // variants), variants)
    status = np.where(rng.random(rows) < 0.01, "failed", "ok")
    caption = np.where(rng.random(rows) < 0.02, "degenerate", "ok")
    duplicate = np.where(rng.random(rows) < 0.01, "p-0", None)
    return pa.table({
        "id": pa.array([f"p-{i}" for i in ids], pa.string()),
        "variant": pa.array(np.tile(np.arange(variants), rows // variants), pa.int32()),
        "status": pa.array(status),
        "score_aesthetic": pa.array(np.round(rng.normal(5.5, 1.0, rows), 1)),  # rounded: ties happen
        "score_clip": pa.array(rng.normal(28, 4, rows)),
        "product_identical": pa.array(rng.random(rows) < 0.95),
        "generate_safety_flagged": pa.array(rng.random(rows) < 0.001),
        "caption_status": pa.array(caption),
        "near_duplicate_of": pa.array(duplicate, pa.string()),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = synthetic(args.rows)
    pool = pa.default_memory_pool()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    arrow_before = pool.bytes_allocated()
    times, decided = [], table
    for _ in range(args.repeats):
        started = time.perf_counter()
        decided = decide(table, SELECT, REVIEW, datetime.now(timezone.utc))
        times.append(time.perf_counter() - started)
    peak_gb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss_before, 0)
    arrow_peak_gb = (pool.max_memory() - arrow_before) / 2**30 if pool.max_memory() else float("nan")
    states = {c["values"]: c["counts"] for c in pc.value_counts(decided.column("review_state")).to_pylist()}
    median = statistics.median(times)
    print(f"select + gates over {args.rows:,} rows ({args.rows // 4:,} ids x 4 variants), {args.repeats} repeat(s)")
    print(f"seconds: median {median:.2f}, fastest {min(times):.2f} (goal <= {GOAL_S:g} s: {median / GOAL_S:.2f} of it)")
    print(f"peak memory above the table: {peak_gb:.2f} GB process (max RSS growth), {arrow_peak_gb:.2f} GB "
          f"pyarrow pool (goal <= {GOAL_GB:g} GB)")
    print("states:", ", ".join(f"{n:,} {s}" for s, n in sorted(states.items())))


if __name__ == "__main__":
    main()
