"""Where a run's shards execute: threads of this process, or the worker processes of a Dask cluster.

The flow (flows/run.py) is the same for both. `with_runner` hands it the task runner its settings
ask for, through Prefect's `Flow.with_options(task_runner=…)`; inside the run, `placement` says what
that runner offers: how many shards to keep in flight, and whether a GPU shard must ask a worker for
its GPU. Every runner calls the same `tasks.runner.run_shard`.

Dask, through prefect-dask's `DaskTaskRunner`: worker processes live for the whole run, so each
keeps its models resident across shards and stages (the per-process cache of catalogen.models).
Without an address a local cluster is started: dask-cuda's `LocalCUDACluster` where there are GPUs
(one worker per GPU, its own GPU first in `CUDA_VISIBLE_DEVICES`), else a `LocalCluster` of `dask.workers`
processes with one thread each. Worker processes are spawned, never forked: a process that ran a
flow and then forks sees its child fail at exit (DESIGN §7). A local cluster is quiet: distributed
logs warnings only, in this process and in its workers, whose shard lines reach this process's log
through each shard's result (tasks/runner.py), as the threads runner prints them.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import signal
import sys
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from prefect import Flow, flow
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.task_runners import TaskRunner

from catalogen.config import ConfigError, RunConfig
from catalogen.devices import visible_devices
from catalogen.store import RunStore

log = logging.getLogger("catalogen.runners")

CPU_WORKERS = 2  # a local CPU cluster's size unless dask.workers says otherwise
GPU = "GPU"  # the worker resource a GPU shard asks for (`dask worker --resources GPU=1`)
FIRST_WORKER_S = 120.0  # how long a run waits for an existing cluster's first worker


def with_runner(run: Flow, cfg: RunConfig) -> Flow:
    """`run` with the task runner the settings choose; threads: `run` as it is."""
    if cfg.runner == "threads":
        return run
    return run.with_options(task_runner=dask_task_runner(cfg))


def dask_task_runner(cfg: RunConfig) -> TaskRunner:
    """A DaskTaskRunner on `dask.address`, else on a local cluster it starts (and stops) for the run.

    Its workers report task runs to the Prefect API, so there must be one they can reach (the
    CLI starts one; a deployment has one): several processes on Prefect's ephemeral API would
    each start their own.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    if not PREFECT_API_URL.value():
        raise ConfigError("runner dask: its workers report to a Prefect API server; start one "
                          "(`prefect server start`) and set PREFECT_API_URL, or run through `catalogen run`")
    if cfg.dask.address:
        return DaskTaskRunner(address=cfg.dask.address)
    if any(device.name.startswith("cuda") for device in visible_devices(cfg.device)):
        if importlib.util.find_spec("dask_cuda") is None:
            raise ConfigError("runner dask on a machine with GPUs starts dask-cuda's LocalCUDACluster (one worker "
                              "per GPU): pip install dask-cuda, or give dask.address of a cluster you started")
        return DaskTaskRunner(cluster_class=local_cuda_cluster, cluster_kwargs={"n_workers": cfg.dask.workers})
    workers = cfg.dask.workers or CPU_WORKERS
    return DaskTaskRunner(cluster_class=local_cpu_cluster, cluster_kwargs={"n_workers": workers})


# A local cluster's options: no dashboard, and its scheduler's HTTP endpoint (health, metrics) on a
# free port, not 8787, where a second cluster warned on the console that the port is in use.
_LOCAL: dict[str, Any] = {"dashboard_address": None, "scheduler_kwargs": {"dashboard_address": ":0"},
                          "preload": ["flows.runners"]}


def local_cpu_cluster(n_workers: int, **worker: Any) -> Any:
    """Worker processes of one thread each (a shard at a time), spawned; `worker`: more Worker options."""
    from distributed import LocalCluster

    _quiet_distributed()
    with _worker_environment():
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **_LOCAL, **worker)


def local_cuda_cluster(n_workers: int | None) -> Any:
    """One worker per GPU (dask-cuda puts its own first in CUDA_VISIBLE_DEVICES), each declaring a GPU resource."""
    from dask_cuda import LocalCUDACluster

    _quiet_distributed()
    with _worker_environment():
        return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, resources={GPU: 1}, **_LOCAL)


def _quiet_distributed() -> None:
    """distributed's INFO lines (workers starting, connections, the HTTP proxy's hint) outnumbered
    catalogen's on the console; its warnings and errors still show."""
    logging.getLogger("distributed").setLevel(logging.WARNING)


def dask_setup(worker: Any) -> None:
    """Preloaded in a local cluster's workers: a Ctrl-C (the terminal signals the whole process
    group) or a SIGTERM stops the run through the driver, which ends its workers when it is done;
    killed outright, they would lose their shards and models mid-stop. catalogen's lines go to the
    driver in each shard's result, not to the console here; distributed's only from WARNING."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _quiet_distributed()
    logging.getLogger("catalogen").propagate = False  # Prefect's API handler, on this logger itself, stays
    atexit.register(_exit_when_closed, worker)


def _exit_when_closed(worker: Any) -> None:
    """Registered at start, so run last of the exit handlers: a worker that closed normally exits
    here, its streams flushed, without tearing its interpreter down. Tearing down torch and the
    rest took 7 to 18 s on a busy machine (measured), past the 4 s its nanny waits before it kills
    the process and warns `Worker process still alive after 4.0 seconds, killing`."""
    if getattr(worker.status, "name", None) != "closed":
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _worker_environment() -> AbstractContextManager[Any]:
    """Spawned workers whose torch runs as many threads as this process's: distributed would set
    OMP_NUM_THREADS=1 in them, and float32 CPU results change with the thread count, so a row's
    image would not be the same bytes as the threads runner makes. Their OpenMP threads sleep when
    idle: spinning, several workers sharing the cores ran 3x slower (benchmarks/scaleout.py). A
    nanny keeps this for the workers it restarts, and also sets it in this process (whose OpenMP
    has started by then)."""
    import dask
    import torch

    threads = str(torch.get_num_threads())
    environ = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return dask.config.set({"distributed.worker.multiprocessing-method": "spawn",
                            "distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536, **environ}})


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

    def add(self, outcome: Mapping[str, Any]) -> None:
        worker = outcome.get("worker")
        if worker is None:
            return
        self.shards[worker] += 1
        self.loads.setdefault(worker, {}).update(outcome.get("loads") or {})

    def summary(self) -> dict[str, dict[str, Any]]:
        """{"host:pid": {"shards": 3, "loads": {"tiny:sd15 (pipeline)": 1, …}}}"""
        return {worker: {"shards": shards, "loads": dict(Counter(self.loads.get(worker, {}).values()))}
                for worker, shards in sorted(self.shards.items())}


def record_workers(store: RunStore, workers: Workers) -> None:
    """Under run.json's latest invocation: which processes ran its shards, what each loaded and how often."""
    info = store.read_run_json()
    info["invocations"][-1]["workers"] = workers.summary()
    store.write_json(store.run_json, info)


@flow(name="catalogen-run-on-dask")
def catalogen_run_on_dask(
    dask_address: str,
    catalog: str,
    out: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    retry_failed: bool = False,
    limit: int | None = None,
) -> Any:
    """catalogen-run with its shards on the Dask cluster whose scheduler is at `dask_address`.

    For a deployment: the address is a parameter, the rest are catalogen-run's (see there).
    The cluster's workers must see the same folders and reach the same Prefect API.
    """
    from prefect_dask import DaskTaskRunner

    from flows.run import catalogen_run

    settings = {**(overrides or {}), "runner": "dask", "dask.address": dask_address}
    origins = {"runner": "the catalogen-run-on-dask flow", "dask.address": "its dask_address parameter"}
    run = catalogen_run.with_options(task_runner=DaskTaskRunner(address=dask_address))
    state = run(catalog=catalog, out=out, config=config, overrides=settings, origins=origins,
                retry_failed=retry_failed, limit=limit, return_state=True)
    # A new state, not the subflow's own: Prefect would sum that one up as "All states completed".
    return State(type=state.type, name=state.name, message=state.message, data=state.result(raise_on_failure=False))
