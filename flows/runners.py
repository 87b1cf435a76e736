"""Where a run's shards execute: threads of this process, or the worker processes of a Dask cluster.

The flow (flows/run.py) is the same for both. `with_runner` hands it the task runner its settings
ask for, through Prefect's `Flow.with_options(task_runner=…)`; inside the run, flows/placement.py says
what that runner offers: how many shards to keep in flight, and whether a GPU shard must ask a worker
for its GPU. Every runner calls the same `tasks.runner.run_shard`. This module imports flows/run.py
(for the dask deployment's flow), never the other way round.

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
from contextlib import AbstractContextManager
from typing import Any

from prefect import Flow, flow
from prefect.states import State
from prefect.task_runners import TaskRunner

from catalogen.config import ConfigError, RunConfig
from catalogen.run.devices import visible_devices
from flows.placement import GPU

log = logging.getLogger("catalogen.runners")

CPU_WORKERS = 2  # a local CPU cluster's size unless dask.workers says otherwise


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
