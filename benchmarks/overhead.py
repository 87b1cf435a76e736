"""What the orchestration costs: the full Prefect flow against a bare loop over the same stage code.

Both sides generate the same rows with the same (already loaded) models on the same device and
write the same images; the flow adds shard files, Prefect task runs, device leases, part files
and results assembly. Prints both throughputs and their ratio. Target: flow >= 0.95 x bare loop
at 256 rows on the tiny profile.

Each measurement runs in a fresh process, as a user's would: once a process's main thread has run
torch's CPU kernels, torch in its other threads was measured 10-20 % slower here, so a flow timed
in the process that just ran the bare loop would be charged for the benchmark's own layout.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py [--rows 256] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from catalogen.catalog import shard  # noqa: E402
from catalogen.config import load_config  # noqa: E402
from catalogen.run.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.models.diffusion import load_pipeline  # noqa: E402
from catalogen.run.plan import prepare  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from tasks import generate  # noqa: E402


def make_catalog(path: Path, rows: int) -> Path:
    subjects = ["a lighthouse", "a teapot", "a fox", "a bicycle", "a castle", "a mug", "a forest", "a robot"]
    styles = ["at dawn", "studio photo", "oil painting", "watercolor", "isometric", "macro shot", "at night", "minimal"]
    pq.write_table(
        pa.table({
            "id": [f"bench-{i:05d}" for i in range(rows)],
            "prompt": [f"{subjects[i % 8]}, {styles[(i // 8) % 8]}, variation {i}" for i in range(rows)],
        }),
        path,
    )
    return path


def bare_loop(catalog: Path, overrides: dict, out: Path) -> tuple[float, float]:
    """Wall time of a plain loop over the shards, and the time spent inside the stage's batches."""
    cfg = load_config(None, overrides)
    plan = prepare(catalog, cfg, out)
    device = visible_devices(cfg.device)[0]
    ctx = StageContext(cfg, plan.store, plan.models["generate"], device, default_dtype(device, cfg.dtype))
    started = time.perf_counter()
    tables = [generate.process(piece, ctx) for piece in shard(plan.planned["generate"], cfg.rows_per_shard)]
    wall = time.perf_counter() - started
    return wall, sum(sum(t.column("seconds").to_pylist()) for t in tables)


def flow_run(catalog: Path, overrides: dict, out: Path) -> tuple[float, float]:
    """Wall time of the whole flow, and the time spent inside the stage's batches."""
    from flows.run import catalogen_run

    started = time.perf_counter()
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
    wall = time.perf_counter() - started
    summary = state.result()
    assert summary["ok"] == summary["rows"], summary
    return wall, pq.read_table(out / "results.parquet", columns=["generate_seconds"]).column(0).to_numpy().sum()


def measure(side: str, catalog: Path, overrides: dict, work: Path) -> None:
    """One side, warmed up, timed, in this (fresh) process; prints its figures as JSON."""
    work.mkdir(parents=True, exist_ok=True)
    if side == "bare":
        cfg = load_config(None, overrides)
        plan = prepare(catalog, cfg, work / "warm")
        device = visible_devices(cfg.device)[0]
        load_pipeline(plan.models["generate"]["pipeline"], device.name, default_dtype(device, cfg.dtype))
        wall, inside = bare_loop(catalog, overrides, work / "run")
        extra = {}
    else:  # warm up through a small flow, so the models load where the flow's tasks run
        started = time.perf_counter()
        flow_run(make_catalog(work / "small.parquet", 2), overrides, work / "warm")
        extra = {"warm_up": time.perf_counter() - started}
        wall, inside = flow_run(catalog, overrides, work / "run")
        started = time.perf_counter()
        flow_run(catalog, overrides, work / "run")
        extra["resume"] = time.perf_counter() - started
    print(json.dumps({"wall": wall, "inside": float(inside), **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["bare", "flow"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {
        "profile": args.profile,
        "generate.steps": args.steps,
        "generate.batch_size": args.batch_size,
        "rows_per_shard": args.rows_per_shard,
    }
    if args.side:
        measure(args.side, args.work / "catalog.parquet", overrides, args.work / args.side)
        return

    work = Path(tempfile.mkdtemp(prefix="catalogen-bench-"))
    runs: dict[str, list[dict]] = {"bare": [], "flow": []}
    for i in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
        for side in ("bare", "flow"):
            folder = work / f"{i}"
            folder.mkdir(exist_ok=True)
            make_catalog(folder / "catalog.parquet", args.rows)
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--side", side, "--work", str(folder)],
                capture_output=True, text=True, check=True,
            )
            runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))

    bare, flow = runs["bare"], runs["flow"]
    b, f = (statistics.median(r["wall"] for r in side) for side in (bare, flow))
    # Noise-resistant view: time outside the stage's batches is what each side adds to the same work.
    b_out, f_out = (statistics.median(r["wall"] - r["inside"] for r in side) for side in (bare, flow))
    inside = statistics.median(r["inside"] for r in bare + flow)
    shards = -(-args.rows // args.rows_per_shard)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, profile {args.profile}, {args.rows} rows, {args.steps} steps, "
          f"{args.rows_per_shard} rows/shard ({shards} shards), batch {args.batch_size}, repeats {args.repeats}")
    print(f"flow warm-up (first flow run, Prefect API start, model load): "
          f"{statistics.median(r['warm_up'] for r in flow):.1f} s")
    for name, side, wall in (("bare loop", bare, b), ("flow", flow, f)):
        walls = ", ".join(f"{r['wall']:.2f}" for r in side)
        outside = ", ".join(f"{r['wall'] - r['inside']:.2f}" for r in side)
        print(f"{name:10}: {wall:7.2f} s  {args.rows / wall:6.2f} rows/s   (runs: {walls}; outside the batches: {outside} s)")
    print(f"throughput ratio flow/bare, measured : {b / f:.3f}  (target >= 0.95)")
    print(f"throughput ratio flow/bare, same work: {(inside + b_out) / (inside + f_out):.3f}  "
          f"(median {inside:.1f} s of batches + each side's own time outside them)")
    print(f"orchestration overhead: {f_out - b_out:+.2f} s per run, {(f_out - b_out) / shards * 1000:+.0f} ms per shard")
    print(f"re-run with nothing to do: {statistics.median(r['resume'] for r in flow):.2f} s for {args.rows} rows")


if __name__ == "__main__":
    main()
