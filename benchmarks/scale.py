"""What a very large catalog costs before any image is made: time to the first shard, driver memory.

Runs `catalogen run` on a synthetic catalog of N rows (default 1,000,000) in a fresh process, as
a user would, and watches the output folder: the first shard's input file appears just before
its task is submitted. At that moment it reads the process's peak resident memory (VmHWM), then
stops the run. It does this for a fresh folder, and again for a resume in which half the rows
are already done (their parts are written beforehand, exactly as finished shards would be).

Targets (issue "Trustworthy before it grows"): first shard within 10 s, driver peak under 1 GB,
fresh and resumed alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py [--rows 1000000] [--rows-per-shard 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

BIN = Path(sys.executable).parent


def make_catalog(path: Path, rows: int) -> Path:
    subjects = np.array(["a lighthouse", "a teapot", "a fox", "a bicycle", "a castle", "a mug", "a forest", "a robot"])
    index = np.arange(rows)
    prompts = pc.binary_join_element_wise(
        pa.array(subjects[index % 8]), pa.array([f"variation {i}" for i in range(rows)]), ", "
    )
    pq.write_table(pa.table({"id": pa.array([f"sku-{i:07d}" for i in range(rows)]), "prompt": prompts,
                             "brand": pa.array(["Northfold"] * rows)}), path)
    return path


def pretend_half_done(catalog: Path, out: Path, args: argparse.Namespace) -> int:
    """Write parts for every other shard's worth of rows, as finished shards would have left them."""
    from catalogen.config import load_config
    from catalogen.run.plan import prepare
    from tasks import generate

    plan = prepare(catalog, load_config(None, {"rows_per_shard": args.rows_per_shard}), out)
    planned = plan.planned["generate"]
    done = planned.filter(pa.array(np.arange(planned.num_rows) % 2 == 0))
    now = pa.array([pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()] * done.num_rows, pa.timestamp("us", tz="UTC"))
    extra = {"status": pa.array(["ok"] * done.num_rows), "finished_at": now}
    columns = {name: done.column(name) if name in done.column_names else extra.get(name, pa.nulls(done.num_rows, typ))
               for name, typ in zip(generate.OUTPUT_SCHEMA.names, generate.OUTPUT_SCHEMA.types)}
    table = pa.Table.from_pydict(columns, schema=generate.OUTPUT_SCHEMA)
    folder = out / "stages" / "generate"
    folder.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, table.num_rows, args.rows_per_shard)):
        pq.write_table(table.slice(start, args.rows_per_shard), folder / f"part-pre{number:06d}.parquet")
    return done.num_rows


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` on a free local port (as scheduled deployments run against one)."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("prefect server did not start")


def time_to_first_shard(catalog: Path, out: Path, args: argparse.Namespace, api_url: str | None = None,
                        extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """Seconds from starting `catalogen run` until its first shard input exists, and peak RSS then."""
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    shutil.rmtree(out / "work", ignore_errors=True)  # a killed earlier run's shard inputs (the run sweeps them too)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "catalogen"), "run", str(catalog), "--out", str(out), "--rows-per-shard", str(args.rows_per_shard),
         "--device", "cpu", *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    shard_inputs = out / "work" / "generate"
    try:
        while not (shard_inputs.is_dir() and any(shard_inputs.glob("shard-*.parquet"))):
            if proc.poll() is not None:
                raise RuntimeError(f"catalogen run ended before its first shard: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        peak = peak_rss_mb(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="catalogen-scale-"))
    started = time.perf_counter()
    catalog = make_catalog(work / "catalog.parquet", args.rows)
    print(f"catalog: {args.rows:,} rows, {catalog.stat().st_size / 2**20:.1f} MB ({time.perf_counter() - started:.1f} s to write)")

    fresh = time_to_first_shard(catalog, work / "fresh", args)
    done = pretend_half_done(catalog, work / "resumed", args)
    resumed = time_to_first_shard(catalog, work / "resumed", args)
    # The driver of a Dask run (issue "Many GPUs, many machines": 4 workers, the same targets); the
    # local cluster's 4 worker processes start while the driver plans, and are not the driver.
    dask = time_to_first_shard(catalog, work / "dask", args, extra=("--runner", "dask", "--dask-workers", "4"))
    from flows.runners import local_cpu_cluster  # the same, on a cluster already running (--dask-address)

    with local_cpu_cluster(4) as cluster:
        attached = time_to_first_shard(catalog, work / "attached", args,
                                       extra=("--runner", "dask", "--dask-address", cluster.scheduler_address))
    server, url = prefect_server(work / "prefect")
    try:
        served = time_to_first_shard(catalog, work / "served", args, url)
        resumed_served = time_to_first_shard(catalog, work / "resumed", args, url)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    print(f"{'':28} {'first shard':>12} {'driver peak':>12}   targets: <= 10 s, < 1024 MB")
    print(f"{'fresh, ephemeral API':28} {fresh[0]:10.1f} s {fresh[1]:9.0f} MB")
    print(f"{'resumed, ephemeral API':28} {resumed[0]:10.1f} s {resumed[1]:9.0f} MB   ({done:,} rows already done)")
    print(f"{'fresh, dask, 4 workers':28} {dask[0]:10.1f} s {dask[1]:9.0f} MB   (starting its local cluster)")
    print(f"{'fresh, dask, running cluster':28} {attached[0]:10.1f} s {attached[1]:9.0f} MB   (4 workers, --dask-address)")
    print(f"{'fresh, prefect server':28} {served[0]:10.1f} s {served[1]:9.0f} MB")
    print(f"{'resumed, prefect server':28} {resumed_served[0]:10.1f} s {resumed_served[1]:9.0f} MB")


if __name__ == "__main__":
    main()
