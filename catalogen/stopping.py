"""Stopping a run on SIGINT / SIGTERM: two process-wide flags that the flow sets and long work reads.

A stop has two steps. `STOPPING`: no new shard starts, shards in flight may finish within the
grace period (`stop_grace_s`). `ABANDON`: the grace period is over; work still running (a
denoising loop, an outbound request, a retry's wait) ends at its next check by raising
`Abandoned`, its shard writes no part, and its rows stay pending for the next run.

Work that never reaches a check (a storage call to an endpoint that went silent) must not keep
the process alive: `end_process_after` ends it `FINISH_S` after the grace period, whatever its
threads do, with the signal's exit code. A signal once work is abandoned ends it at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger("catalogen")
T = TypeVar("T")
FINISH_S = 10.0  # after a stop's grace period, how long results and the report may take before the process ends
STOPPING = threading.Event()
ABANDON = threading.Event()
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_armed: list[object] = []  # the deadline of the current stop, if one is set (reset() forgets it)
_grace_s: list[float] = [25.0]  # the run's stop_grace_s (set_grace)


class Abandoned(RuntimeError):
    """The run is stopping and its grace period is over: this work is given up, its rows stay pending."""


def check() -> None:
    """Raise `Abandoned` once the grace period of a stop is over; cheap enough for every step."""
    if ABANDON.is_set():
        raise Abandoned("the run was stopped; this shard's rows stay pending")


def reset() -> None:
    """Clear both flags: a new run in the same process (tests, a worker) starts unstopped."""
    STOPPING.clear()
    ABANDON.clear()
    _received.clear()
    _armed.clear()


def _on_signal(signum: int, _frame: object) -> None:
    """A stop; a second one abandons work at once; one once work is abandoned ends the process.
    Otherwise flags only: the flow's loop logs and acts on them."""
    if ABANDON.is_set() and _received:
        _end_process(f"{signal.Signals(signum).name} received again")
    if STOPPING.is_set():
        ABANDON.set()
    _received.append(signum)
    STOPPING.set()
    end_process_after(_grace_s[0] + FINISH_S)


@contextmanager
def on_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM ask for a stop instead of killing the process.

    Only the main thread can take signals; elsewhere (a Dask worker's thread) this does nothing.
    The handlers in place before are restored afterwards, so nesting (the CLI around the flow) works.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_name() -> str | None:
    """The signal that asked for the stop (SIGINT, SIGTERM), or None."""
    return signal.Signals(_received[0]).name if _received else None


def exit_code() -> int:
    """The shell's code for the first stopping signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + (_received[0] if _received else signal.SIGTERM)


def set_grace(seconds: float) -> None:
    """The run's grace period (`stop_grace_s`): a stop ends the process FINISH_S after it at the latest."""
    _grace_s[0] = seconds


def end_process_after(seconds: float) -> None:
    """End the process `seconds` from now if it is still running then, for a stop that a signal
    asked for: threads stuck in a storage call or a device wait would otherwise keep it alive (a
    thread pool joins its threads at exit). Once per stop; nothing for a stop without a signal."""
    if not _received or _armed:
        return
    mark = object()
    _armed.append(mark)

    def watch() -> None:
        time.sleep(seconds)
        if mark in _armed:
            _end_process(f"the run did not end within {seconds:g} s of {signal_name()} (work still waiting on "
                         "storage or a device)")

    threading.Thread(target=watch, name="catalogen-stop-deadline", daemon=True).start()


def _end_process(why: str) -> None:
    """Exit now with the stop's code: rows not finished stay pending (parts are written whole)."""
    # Straight to the file descriptor: a thread stuck mid-write may hold the logging handler's or the
    # stream's lock, and a watchdog that waits on it would not end the process.
    line = f"{why}: ending the process; rows not finished stay pending, run the same command again to resume\n"
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(exit_code())


def bounded(fn: Callable[[threading.Event], T], seconds: float, what: str) -> T:
    """`fn(cancelled)` with a total deadline that no slow peer can stretch, ended early by a stop.

    A per-read timeout never fires on a server that trickles a byte a second; this runs `fn` in a
    daemon thread and stops waiting at the deadline (TimeoutError naming `what`) or when the
    grace period of a stop ends (Abandoned). `fn` should return soon after `cancelled` is set.
    """
    outcome: dict[str, Any] = {}
    cancelled = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = fn(cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"bounded: {what}"[:60], daemon=True)
    deadline = time.monotonic() + seconds
    worker.start()
    try:
        while worker.is_alive():
            check()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: no complete answer within {seconds:g} s")
            worker.join(0.1)
    finally:
        cancelled.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
