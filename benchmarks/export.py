"""What `catalogen export` costs per format: rows per second and MB per second of the run's images.

Makes a run on the tiny profile (or takes one with --run), then exports it in each format into a
fresh folder and prints the formats side by side. `dummy` reads and checks every image (sha256)
and writes nothing: the floor under the others. MB/s counts the run's image bytes read.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export.py [--rows 128] [--size 64] [--shard-size 1000]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export.py --run outputs/demo
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from catalogen.publish.export import WRITERS, ExportOptions, export_run  # noqa: E402

FORMATS = ("dummy", "hf", "webdataset", "imagefolder")


def make_run(folder: Path, rows: int, size: int) -> Path:
    """A finished run of `rows` prompts at size x size on the tiny profile."""
    from flows.run import catalogen_run

    catalog = folder / "catalog.parquet"
    pq.write_table(pa.table({"id": [f"bench-{i:05d}" for i in range(rows)],
                             "prompt": [f"a product photo, variation {i}" for i in range(rows)]}), catalog)
    out = folder / "run"
    catalogen_run(catalog=str(catalog), out=str(out),
                  overrides={"generate.steps": 2, "generate.width": size, "generate.height": size})
    return out


def image_bytes(run: Path) -> int:
    """Bytes of the final images of the ok rows: what every export reads."""
    table = pq.read_table(run / "results.parquet", columns=["status", "image_path"]).to_pylist()
    return sum((run / row["image_path"]).stat().st_size for row in table if row["status"] == "ok")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(run: Path, fmt: str, scratch: Path, shard_size: int, repeats: int) -> tuple[int, float, int]:
    """(rows, best seconds, output bytes) of exporting `run` as `fmt`."""
    best = float("inf")
    rows = written = 0
    for _ in range(repeats):
        out = scratch / fmt
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        manifest = export_run(run, out, ExportOptions(format=fmt, split="train=0.9,val=0.1", shard_size=shard_size))
        best = min(best, time.perf_counter() - start)
        rows, written = manifest["rows"], folder_bytes(out)
    return rows, best, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="an existing run folder (default: make one)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="image width and height of the run made")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="catalogen-export-bench-") as tmp:
        scratch = Path(tmp)
        run = args.run or make_run(scratch, args.rows, args.size)
        megabytes = image_bytes(run) / 1e6
        print(f"run {run}: {megabytes:.1f} MB of images; best of {args.repeats}, shard size {args.shard_size}")
        print(f"{'format':<12}{'rows':>7}{'seconds':>10}{'rows/s':>10}{'MB/s':>9}{'out MB':>9}")
        for fmt in FORMATS:
            assert fmt in WRITERS
            rows, seconds, written = measure(run, fmt, scratch, args.shard_size, args.repeats)
            print(f"{fmt:<12}{rows:>7}{seconds:>10.3f}{rows / seconds:>10.0f}{megabytes / seconds:>9.1f}{written / 1e6:>9.1f}")


if __name__ == "__main__":
    main()
