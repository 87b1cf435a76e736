"""Scale-out: the same run on the threads runner and on Dask clusters of 1 and 2 worker processes.

The demo dataset configuration (generate -> caption, tiny profile) on the first `--rows` rows of
catalogs/demo_prompts.parquet, a shard per `--rows-per-shard` rows, into a fresh folder each time.
Every runner is warmed by one run first (a worker's imports and model loads, the flow process's
for threads), then timed `--repeats` times: models stay resident per process, as they do over a
long run, so what differs is where the shards run. Prints, per runner, rows/s (median and
fastest), the speedup per worker, the seconds of overhead per shard task through Dask (1 worker
against threads, both one shard at a time), the cold first run, and whether every run's hashes,
keys and captions are byte-identical to the first threads run. Last, the threads run again with
its folder in a bucket of a local S3 server (moto's, in a process of its own, through s3fs) against
the same run on the local disk: the cost of object storage per run (ratio of medians).

Dask workers run torch with one thread each (distributed sets OMP_NUM_THREADS=1 in workers); the
threads runner uses the process's default. Compare figures from one invocation only: this VM
drifts by +-15% between runs (DESIGN §7).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaleout.py [--rows 12] [--repeats 3] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # not a line per client connection

import pandas as pd  # noqa: E402

from catalogen.run.prefect_api import prefect_environment, start_prefect_api  # noqa: E402


def made(out: str) -> pd.DataFrame:
    """Every row's hashes, keys and caption: what must not depend on the runner."""
    df = pd.read_parquet(f"{out}/results.parquet")
    columns = sorted(c for c in df.columns if c.endswith(("sha256", "_key")) or c == "caption_caption")
    return df[["id", "variant", "status", *columns]].sort_values(["id", "variant"]).reset_index(drop=True)


def one_run(args: argparse.Namespace, work: str, overrides: dict[str, Any]) -> tuple[float, pd.DataFrame, int]:
    """One run into a fresh folder under `work` (a local folder or a bucket's URL): (seconds, what it made, shard tasks)."""
    from catalogen.config import load_config
    from catalogen.storage.locations import location
    from flows.run import catalogen_run
    from flows.runners import with_runner

    settings = {"generate.width": 32, "generate.height": 32, "generate.steps": args.steps,
                "rows_per_shard": args.rows_per_shard, **overrides}
    config = ROOT / "configs" / "dataset.yaml"
    out = f"{work}/{uuid.uuid4().hex}" if "://" in work else str(Path(tempfile.mkdtemp(dir=work)) / "out")
    run = with_runner(catalogen_run, load_config(config, settings))
    started = time.perf_counter()
    state = run(catalog=str(ROOT / "catalogs" / "demo_prompts.parquet"), out=out, config=str(config),
                overrides=settings, limit=args.rows, return_state=True)
    seconds = time.perf_counter() - started
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict) and summary["ok"] == args.rows, summary
    tasks = sum(1 for _ in location(out).glob("stages/*/part-*.parquet"))
    return seconds, made(out), tasks


def measure(args: argparse.Namespace, work: str, name: str, overrides: dict[str, Any],
            reference: list[pd.DataFrame]) -> dict[str, Any]:
    """A cold run, then `repeats` timed ones; every result is checked against the reference."""
    cold, first, tasks = one_run(args, work, overrides)
    if not reference:
        reference.append(first)
    times, identical = [], first.equals(reference[0])
    for _ in range(args.repeats):
        seconds, result, _ = one_run(args, work, overrides)
        times.append(seconds)
        identical &= result.equals(reference[0])
    row = {"runner": name, "cold_s": cold, "median_s": statistics.median(times), "fastest_s": min(times),
           "tasks": tasks, "identical": identical}
    print(f"  {name:<10} cold {cold:6.1f} s; timed {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--rows-per-shard", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-s3", dest="s3", action="store_false", help="Skip the run folder in a bucket.")
    args = parser.parse_args()

    prefect_environment()
    url = start_prefect_api().ready()  # Dask workers report to it; Prefect's ephemeral API is per process
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runners import local_cpu_cluster

    rows, reference = [], []
    with tempfile.TemporaryDirectory(prefix="scaleout-") as work, temporary_settings({PREFECT_API_URL: url}):
        print(f"{args.rows} rows, generate -> caption, {args.rows_per_shard} row(s) per shard, "
              f"{args.repeats} timed runs each after a cold one", flush=True)
        rows.append(measure(args, work, "threads", {"runner": "threads"}, reference))
        for count in args.workers:
            with local_cpu_cluster(count) as cluster:
                overrides = {"runner": "dask", "dask.address": cluster.scheduler_address}
                rows.append(measure(args, work, f"dask x{count}", overrides, reference))
        if args.s3:
            with s3_server() as bucket:
                rows.append(measure(args, bucket, "threads, S3", {"runner": "threads"}, reference))
    report(rows, args)


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a process of its own on 127.0.0.1, one bucket; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                fs.mkdir("scaleout")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield "s3://scaleout"
    finally:
        server.terminate()
        server.wait()


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    threads = rows[0]
    one = next((r for r in rows if r["runner"] == "dask x1"), None)
    print(f"\n{'runner':<10} {'rows/s median':>14} {'rows/s fastest':>15} {'per worker':>11} {'cold s':>7} "
          f"{'identical':>10}")
    for row in rows:
        per_worker = ""
        if one is not None and row["runner"].startswith("dask x"):
            workers = int(row["runner"].removeprefix("dask x"))
            per_worker = f"{one['median_s'] / row['median_s'] / workers:.2f}"
        print(f"{row['runner']:<11} {args.rows / row['median_s']:>14.2f} {args.rows / row['fastest_s']:>15.2f} "
              f"{per_worker:>11} {row['cold_s']:>7.1f} {str(row['identical']):>10}")
    if one is not None:
        median = (one["median_s"] - threads["median_s"]) / one["tasks"]
        fastest = (one["fastest_s"] - threads["fastest_s"]) / one["tasks"]
        print(f"\noverhead per shard task through Dask (1 worker vs threads, {one['tasks']} tasks): "
              f"{median:+.3f} s median, {fastest:+.3f} s fastest")
    bucket = next((r for r in rows if r["runner"] == "threads, S3"), None)
    if bucket is not None:
        print(f"run folder in a bucket (local S3 server) / on the local disk, threads runner: "
              f"{bucket['median_s'] / threads['median_s']:.3f} median, {bucket['fastest_s'] / threads['fastest_s']:.3f} fastest "
              f"({args.repeats} timed runs each)")
    print(f"speedup per worker: rows/s of N workers / (N x rows/s of 1 worker), medians; "
          f"byte-identical to threads: {all(r['identical'] for r in rows)}")


if __name__ == "__main__":
    main()
