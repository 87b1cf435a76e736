"""Near-duplicate grouping at scale: `catalogen.media.duplicates.group` over 1,000,000 synthetic pHashes.

The goal (issue 4): a million hashes grouped in at most 60 s on this machine. The hashes are uniform
random 64-bit values (a pHash thresholds each DCT coefficient at the median, so its bits are close
to balanced) with 1% planted near-duplicates: clusters of 2 to 10 rows, each a copy of an earlier
row with 0 to `max_distance` bits flipped. Every planted row must be found (it is checked), and
the figures say what the search did (chunks, table look-ups, candidate pairs compared) besides the
time: median and fastest of N repeats, and the ratio of the median to the 60 s goal.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/duplicates.py [--rows 1000000] [--distance 6] [--repeats 3]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/duplicates.py --distance 0 2 6 10 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalogen.media.duplicates import group  # noqa: E402

GOAL_S = 60.0
ROWS = 1_000_000


def synthetic_hashes(rows: int, max_distance: int, share: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, rows planted as near-duplicates of an earlier row): clusters of 2 to 10 rows."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64 - 1, rows, dtype=np.uint64, endpoint=True)
    want = int(rows * share)
    order = rng.permutation(rows)  # each row in one cluster at most
    taken, planted = 0, []
    while len(planted) < want and taken + 10 <= rows:
        size = int(rng.integers(2, 11))
        members = np.sort(order[taken:taken + size])
        taken += size
        source = int(values[members[0]])
        for target in members[1:]:
            mask = 0
            for bit in rng.choice(64, int(rng.integers(0, max_distance + 1)), replace=False):
                mask |= 1 << int(bit)
            values[target] = source ^ mask
            planted.append(int(target))
    return values, np.array(planted, dtype=np.int64)


def bench_grouping(rows: int = ROWS, max_distance: int = 6, repeats: int = 3) -> dict[str, float]:
    """Time `group` over `rows` synthetic hashes; prints and returns the figures."""
    values, planted = synthetic_hashes(rows, max_distance)
    times, cpu, stats, found = [], [], {}, None
    for _ in range(repeats):
        stats = {}
        start, start_cpu = time.perf_counter(), time.process_time()
        found = group(values, max_distance, stats)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    missed = int((found[planted] < 0).sum())
    if missed:
        raise SystemExit(f"{missed} planted near-duplicates were not found: group is wrong")
    median, fastest = statistics.median(times), min(times)
    print(f"group: {rows:,} hashes, max_distance {max_distance}: median {median:.2f} s, fastest {fastest:.2f} s "
          f"of {repeats}; {median / GOAL_S:.2f} x the {GOAL_S:.0f} s goal (CPU time: median {statistics.median(cpu):.2f} s; "
          f"wall time above it means the cores were shared)")
    print(f"  {stats['distinct']:,} distinct, {stats['chunks']} chunks, {stats['lookups']:,} look-ups, "
          f"{stats['comparisons']:,} pairs compared ({stats['comparisons'] / (rows * (rows - 1) / 2):.1e} of all pairs); "
          f"{int((found >= 0).sum()):,} rows name an earlier one ({len(planted):,} planted, all found)")
    return {"rows": rows, "max_distance": max_distance, "repeats": repeats, "median_s": median, "fastest_s": fastest,
            "cpu_median_s": statistics.median(cpu), "goal_ratio": median / GOAL_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--distance", type=int, nargs="+", default=[6], help="max_distance values to time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for distance in args.distance:
        bench_grouping(args.rows, distance, args.repeats)


if __name__ == "__main__":
    main()
