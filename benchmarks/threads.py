"""Why batches ran slower inside the flow: which thread runs torch, and what ran before it.

The flow's tasks run in worker threads of the flow's process. This times the same generate
batches (32 rows, tiny profile, 10 steps, batch 8, warmed up first) in four set-ups, each in a
fresh process, repeats interleaved:

- `main`: in the main thread (as the bare loop of benchmarks/overhead.py runs them);
- `thread`: in a worker thread of a process whose main thread never ran torch (the flow today);
- `thread-after-main`: in a worker thread after the main thread ran torch first (what the CLI did
  when it built the tiny models during its pre-flight on its main thread);
- `prefect-task`: in a Prefect task of a flow (ThreadPoolTaskRunner), nothing run before.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("main", "thread", "thread-after-main", "prefect-task")


def measure(mode: str) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from catalogen.config import load_config
    from catalogen.run.devices import Device
    from catalogen.run.plan import prepare
    from catalogen.stage import StageContext
    from tasks import generate

    work = Path(tempfile.mkdtemp(prefix="catalogen-threads-"))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(32)], "prompt": [f"a photo of thing {i}" for i in range(32)]}),
                   work / "catalog.parquet")
    cfg = load_config(None, {"generate.steps": 10, "generate.batch_size": 8})
    plan = prepare(work / "catalog.parquet", cfg, work / "out")
    ctx = StageContext(cfg, plan.store, plan.models["generate"], Device("cpu", "cpu"), torch.float32)

    def batches() -> float:
        started = time.perf_counter()
        generate.process(plan.planned["generate"], ctx)
        return time.perf_counter() - started

    def in_thread(function):
        found: dict[str, float] = {}
        thread = threading.Thread(target=lambda: found.setdefault("seconds", function()))
        thread.start()
        thread.join()
        return found["seconds"]

    if mode == "main":
        batches()
        return batches()
    if mode == "thread":
        return in_thread(lambda: (batches(), batches())[1])
    if mode == "thread-after-main":
        batches()
        return in_thread(lambda: (batches(), batches())[1])
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    timed = task(batches)

    @flow(task_runner=ThreadPoolTaskRunner())
    def twice() -> float:
        timed.submit().result()
        return timed.submit().result()

    return twice()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(measure(args.mode))
        return
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True)
            times[mode].append(float(child.stdout.strip().splitlines()[-1]))
    reference = statistics.median(times["main"])
    print(f"32 rows, tiny profile, 10 steps, batch 8, repeats {args.repeats} (median, and each run)")
    for mode, found in times.items():
        median = statistics.median(found)
        runs = ", ".join(f"{t:.2f}" for t in found)
        print(f"{mode:18} {median:6.2f} s   x{median / reference:5.3f} of main   ({runs})")


if __name__ == "__main__":
    main()
