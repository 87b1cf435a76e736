"""How good `run --dry-run`'s estimate is in a new folder, from what a sibling folder measured.

1. `catalogen run` of the catalog's first `--first` rows into folder A (it records its seconds,
   load seconds and bytes per row in a fresh shared store, `CATALOGEN_MEASUREMENTS`);
2. `catalogen run --dry-run` of `--rows` rows into a new folder B: its estimate of the work (seconds)
   and of the disk (bytes, renditions and the folder's own files included);
3. the real run into B, timed: the wall-clock time of the command, and the work its stages
   recorded (seconds per row x rows, plus each model load once); then the bytes B holds (`du -sb`).

Prints the estimate against each, as a ratio (1.0: exact; the target is within 30%). The wall time
also holds what no stage records (starting Prefect, planning, the report), so it runs above the
work on small runs. Not a test: timings depend on the machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/estimate.py [--first 2] [--rows 6] \
        [--catalog catalogs/demo_photos.parquet] [--config configs/photos.yaml] [--set style.steps=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "catalogen.cli"]


def catalogen(*args: str, env: dict[str, str]) -> tuple[str, float]:
    """Run the CLI; its stdout and wall-clock seconds (a failure ends the benchmark with its output)."""
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"catalogen {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout, took


def recorded_work(folder: Path) -> float:
    """What the run's stages recorded: every computed row's seconds, plus each model load once."""
    import pyarrow.parquet as pq

    results = pq.read_table(folder / "results.parquet").to_pandas()
    throughput = json.loads((folder / "run.json").read_text()).get("throughput", {})
    rows = sum(float(results[f"{stage}_seconds"].fillna(0).sum()) for stage in throughput)
    loads = sum(m.get("load_seconds", 0.0) * m.get("workers", 1) for kinds in throughput.values() for m in kinds.values())
    return rows + loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--catalog", default="catalogs/demo_photos.parquet")
    parser.add_argument("--config", default="configs/photos.yaml")
    parser.add_argument("--first", type=int, default=2, help="rows the sibling folder measures")
    parser.add_argument("--rows", type=int, default=6, help="rows the new folder runs (estimated, then run)")
    parser.add_argument("--set", dest="sets", action="append", default=["style.steps=2", "upscale.steps=2"])
    args = parser.parse_args()
    sets = [item for value in args.sets for item in ("--set", value)]
    with tempfile.TemporaryDirectory(prefix="catalogen-estimate-") as scratch:
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a busy machine starts it slowly
               **os.environ, "CATALOGEN_MEASUREMENTS": str(Path(scratch) / "measurements")}
        first, new = Path(scratch) / "a", Path(scratch) / "b"
        common = [args.catalog, "--config", args.config, *sets]
        _, first_wall = catalogen("run", *common, "--out", str(first), "--limit", str(args.first), env=env)
        plan, _ = catalogen("run", *common, "--out", str(new), "--limit", str(args.rows), "--dry-run", env=env)
        work = float(re.search(r"total: ([\d.e+]+) s of work", plan).group(1))
        disk = float(re.search(r"\(estimate, ([\d.e+]+) bytes\)", plan).group(1))
        _, wall = catalogen("run", *common, "--out", str(new), "--limit", str(args.rows), env=env)
        measured = recorded_work(new)
        written = int(subprocess.run(["du", "-sb", str(new)], capture_output=True, text=True).stdout.split()[0])
    print(plan)
    print(f"sibling folder: {args.first} rows measured in {first_wall:.1f} s; new folder: {args.rows} rows")
    print(f"time: estimate {work:.1f} s of work; the run recorded {measured:.1f} s of work "
          f"(estimate / recorded = {work / measured:.2f}); the command took {wall:.1f} s wall-clock "
          f"(estimate / wall = {work / wall:.2f})")
    print(f"disk: estimate {disk / 1e6:.2f} MB; du -sb {written / 1e6:.2f} MB (estimate / du = {disk / written:.2f})")


if __name__ == "__main__":
    main()
