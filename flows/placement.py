"""What the flow run's task runner offers its shards, and which worker processes ran them.

`placement` reads the current flow run's runner (threads of this process, or a Dask cluster, see
flows/runners.py): how many shards to keep in flight, and whether a GPU shard must ask a worker for
its GPU. `Workers` counts, per worker process, the shards it ran and the models it loaded.
Used by flows/run.py; imports neither flows/run.py nor flows/runners.py.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from catalogen.config import ConfigError, RunConfig
from catalogen.run.devices import visible_devices
from catalogen.storage.store import RunStore

log = logging.getLogger("catalogen.runners")

GPU = "GPU"  # the worker resource a GPU shard asks for (`dask worker --resources GPU=1`)
FIRST_WORKER_S = 120.0  # how long a run waits for an existing cluster's first worker


@dataclass(frozen=True)
class Placement:
    """What the flow run's task runner offers: slots for shards, and whether workers declare GPUs."""

    window: int  # task runs in flight: every slot busy, and the next shard ready when one ends
    gpu_resource: bool = False

    def submitting(self, needs_device: bool) -> AbstractContextManager[Any]:
        """Around a submit: a shard that needs a device asks a worker for its GPU, where workers declare
        one; a CPU cluster (no GPU resource) still runs it, and a stage served elsewhere asks for none."""
        if needs_device and self.gpu_resource:
            import dask

            return dask.annotate(resources={GPU: 1})
        return nullcontext()


def placement(cfg: RunConfig) -> Placement:
    """The current flow run's slots: a Dask cluster's worker threads, else the run's devices; x2."""
    context = FlowRunContext.get()
    client = _dask_client(context.task_runner if context else None)
    if client is None:
        return Placement(window=2 * len(visible_devices(cfg.device)))
    try:
        client.wait_for_workers(1, timeout=FIRST_WORKER_S)
    except TimeoutError:
        raise ConfigError(f"no Dask worker joined {client.scheduler.address} within {FIRST_WORKER_S:g} s") from None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    slots = sum(worker["nthreads"] for worker in workers)
    gpus = any(worker.get("resources", {}).get(GPU) for worker in workers)
    log.info("Dask cluster at %s: %d worker(s), %d thread(s)%s", client.scheduler.address, len(workers), slots,
             f", {GPU} resources declared" if gpus else "")
    return Placement(window=2 * max(1, slots), gpu_resource=gpus)


def _dask_client(runner: TaskRunner | None) -> Any:
    """The runner's Dask client (it starts a local cluster on first use), or None for other runners."""
    module = sys.modules.get("prefect_dask.task_runners")
    if runner is None or module is None or not isinstance(runner, module.DaskTaskRunner):
        return None
    return runner.client


def cancel_remote(futures: Iterable[PrefectFuture]) -> list[PrefectFuture]:
    """Cancel the futures whose work runs in other processes, which never see this process's
    abandon flag; returns them. Threads' futures end by themselves (`stopping.check`)."""
    distributed = sys.modules.get("distributed")
    cancelled = []
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        if distributed is not None and isinstance(wrapped, distributed.Future):
            wrapped.cancel()
            cancelled.append(future)
    return cancelled


@dataclass
class Workers:
    """Per worker process (host:pid): the shards it ran and the models it loaded in this run.

    Each shard reports its process's loads by sequence number, so shards that ran at once in one
    process and saw the same load count it once.
    """

    shards: Counter = field(default_factory=Counter)
    loads: dict[str, dict[int, str]] = field(default_factory=dict)
    load_seconds: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)  # stage -> (worker, seq)
    stage_workers: dict[str, set[str]] = field(default_factory=dict)

    def add(self, outcome: Mapping[str, Any]) -> None:
        worker = outcome.get("worker")
        if worker is None:
            return
        self.shards[worker] += 1
        self.loads.setdefault(worker, {}).update(outcome.get("loads") or {})
        stage = str(outcome.get("stage"))
        self.stage_workers.setdefault(stage, set()).add(worker)
        seconds = self.load_seconds.setdefault(stage, {})
        for seq, took in (outcome.get("load_seconds") or {}).items():
            if not any((worker, seq) in loads for loads in self.load_seconds.values()):
                seconds[(worker, seq)] = took  # a load two shards saw counts once, for the first one's stage

    def merge(self, other: Workers) -> None:
        """Take in what another drive of the same run saw (the stages held back for approval)."""
        self.shards.update(other.shards)
        for worker, loads in other.loads.items():
            self.loads.setdefault(worker, {}).update(loads)
        for stage, workers in other.stage_workers.items():
            self.stage_workers.setdefault(stage, set()).update(workers)
        for stage, loads in other.load_seconds.items():
            for load, took in loads.items():
                if not any(load in seen for seen in self.load_seconds.values()):
                    self.load_seconds.setdefault(stage, {})[load] = took

    def stage_loads(self) -> dict[str, dict[str, float]]:
        """Per stage: the workers that ran it and the seconds the models it loaded took in each
        (`catalogen.run.dryrun` adds them once per worker, apart from the seconds per row)."""
        found = {stage: dict.fromkeys(sorted(workers), 0.0) for stage, workers in self.stage_workers.items()}
        for stage, loads in self.load_seconds.items():
            for (worker, _), took in loads.items():
                found[stage][worker] += took
        return found

    def summary(self) -> dict[str, dict[str, Any]]:
        """{"host:pid": {"shards": 3, "loads": {"tiny:sd15 (pipeline)": 1, …}}}"""
        return {worker: {"shards": shards, "loads": dict(Counter(self.loads.get(worker, {}).values()))}
                for worker, shards in sorted(self.shards.items())}


def record_workers(store: RunStore, workers: Workers) -> None:
    """Under run.json's latest invocation: which processes ran its shards, what each loaded and how often."""
    info = store.read_run_json()
    info["invocations"][-1]["workers"] = workers.summary()
    store.write_json(store.run_json, info)
