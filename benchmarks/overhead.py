"""What the orchestration costs: the full Prefect flow against a bare loop over the same stage code.

Both sides generate the same rows with the same (already loaded) models on the same device and
write the same images; the flow adds shard files, Prefect task runs, device leases, part files
and results assembly. Prints both throughputs and their ratio. Target: flow >= 0.95 x bare loop
at 256 rows on the tiny profile.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py [--rows 256] [--steps 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from catalogen.catalog import shard  # noqa: E402
from catalogen.config import load_config  # noqa: E402
from catalogen.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.models import load_pipeline  # noqa: E402
from catalogen.runplan import prepare  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from tasks import STAGES, generate  # noqa: E402


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
    plan = prepare(catalog, cfg, out, STAGES)
    device = visible_devices(cfg.device)[0]
    ctx = StageContext(cfg, plan.store, plan.identities["generate"], device, default_dtype(device, cfg.dtype))
    started = time.perf_counter()
    tables = [generate.process(piece, ctx) for piece in shard(plan.planned["generate"], cfg.rows_per_shard)]
    wall = time.perf_counter() - started
    return wall, sum(sum(t.column("seconds").to_pylist()) for t in tables)


def flow_run(catalog: Path, overrides: dict, out: Path) -> tuple[float, float]:
    """Wall time of the whole flow, and the time spent inside the stage's batches."""
    from flows.run import catalogen_run

    started = time.perf_counter()
    summary = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides)
    wall = time.perf_counter() - started
    assert summary["ok"] == summary["rows"], summary
    return wall, pq.read_table(out / "results.parquet", columns=["generate_seconds"]).column(0).to_numpy().sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    overrides = {
        "profile": args.profile,
        "generate.steps": args.steps,
        "generate.batch_size": args.batch_size,
        "rows_per_shard": args.rows_per_shard,
    }
    work = Path(tempfile.mkdtemp(prefix="catalogen-bench-"))
    catalog = make_catalog(work / "catalog.parquet", args.rows)

    # Warm-up outside the timings: load the models, start Prefect's ephemeral API.
    cfg = load_config(None, overrides)
    plan = prepare(catalog, cfg, work / "warm", STAGES)
    device = visible_devices(cfg.device)[0]
    load_pipeline(plan.identities["generate"], device.name, default_dtype(device, cfg.dtype))
    small = make_catalog(work / "small.parquet", 2)
    started = time.perf_counter()
    flow_run(small, overrides, work / "warm-flow")
    print(f"warm-up: first flow run incl. Prefect API start {time.perf_counter() - started:.1f} s")

    bare, flow = [], []
    for i in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
        bare.append(bare_loop(catalog, overrides, work / f"bare-{i}"))
        flow.append(flow_run(catalog, overrides, work / f"flow-{i}"))
    started = time.perf_counter()
    flow_run(catalog, overrides, work / f"flow-{args.repeats - 1}")
    resume = time.perf_counter() - started

    b, f = (statistics.median(w for w, _ in runs) for runs in (bare, flow))
    # Noise-resistant view: time outside the stage's batches is what each side adds to the same work.
    b_out, f_out = (statistics.median(w - inside for w, inside in runs) for runs in (bare, flow))
    inside = statistics.median(x for _, x in bare + flow)
    shards = -(-args.rows // args.rows_per_shard)
    print(f"device {device}, profile {args.profile}, {args.rows} rows, {args.steps} steps, "
          f"{args.rows_per_shard} rows/shard ({shards} shards), batch {args.batch_size}, repeats {args.repeats}")
    for name, runs, wall in (("bare loop", bare, b), ("flow", flow, f)):
        print(f"{name:10}: {wall:7.2f} s  {args.rows / wall:6.2f} rows/s   "
              f"(runs: {', '.join(f'{w:.2f}' for w, _ in runs)}; outside the batches: "
              f"{', '.join(f'{w - x:.2f}' for w, x in runs)} s)")
    print(f"throughput ratio flow/bare, measured : {b / f:.3f}  (target >= 0.95)")
    print(f"throughput ratio flow/bare, same work: {(inside + b_out) / (inside + f_out):.3f}  "
          f"(median {inside:.1f} s of batches + each side's own time outside them)")
    print(f"orchestration overhead: {f_out - b_out:+.2f} s per run, {(f_out - b_out) / shards * 1000:+.0f} ms per shard")
    print(f"re-run with nothing to do: {resume:.2f} s for {args.rows} rows")


if __name__ == "__main__":
    main()
