"""Stopping a run on SIGINT / SIGTERM: two process-wide flags that the flow sets and long work reads.

A stop has two steps. `STOPPING`: no new shard starts, shards in flight may finish within the
grace period (`stop_grace_s`). `ABANDON`: the grace period is over; work still running (a
denoising loop, an outbound request, a retry's wait) ends at its next check by raising
`Abandoned`, its shard writes no part, and its rows stay pending for the next run.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
STOPPING = threading.Event()
ABANDON = threading.Event()
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


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


def _on_signal(signum: int, _frame: object) -> None:
    """A stop; a second one abandons work at once. Flags only: the flow's loop logs and acts on them."""
    if STOPPING.is_set():
        ABANDON.set()
    _received.append(signum)
    STOPPING.set()


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
