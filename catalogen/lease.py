"""One writer per run folder on object storage: a lease object, created only where none exists.

An object store has no flock, and a lock file left by a killed process never goes away by itself.
So the lock is an object (`<run>/.lock`) holding who took it and until when:

- taking it is a conditional create (S3 `If-None-Match: *`): of two runs, exactly one succeeds;
- the holder renews it every `LEASE_S / 4` seconds with a conditional overwrite (`If-Match` on the
  ETag it wrote last), so a holder that lost it (paused past its expiry, then taken over) learns
  so and stops the run;
- a lease past its expiry, or one whose holder was a process of this machine that is gone (a
  SIGKILLed run, resumed at once), is taken over by a conditional overwrite of exactly that
  version: two runs taking over at once cannot both win;
- the holder deletes it when done.

Expiry is judged by the taker's clock against the holder's; clocks further apart than the lease's
length would let a live lease be taken, so keep machines on NTP. Needs a store with conditional
writes (AWS S3 and its compatibles since 2024, through s3fs); another backend is refused with a
line saying so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from upath import UPath

log = logging.getLogger("catalogen")

LEASE_S = 60.0  # a holder that stops renewing loses the folder after this long


class LeaseError(RuntimeError):
    """The store cannot hold a lease (no conditional writes), or the holder lost its lease."""


class LeaseBusy(RuntimeError):
    """Another live holder has the lease."""


def _record(ttl: float) -> bytes:
    now = time.time()
    return json.dumps({
        "holder": f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "host": socket.gethostname(), "pid": os.getpid(), "renewed": now, "expires": now + ttl,
    }).encode()


def _read(lock: UPath) -> tuple[dict[str, Any] | None, str | None]:
    """The lease's record and the ETag of that version (None, None when there is none)."""
    try:
        info = lock.fs.info(lock.path, refresh=True)
        data = lock.fs.cat_file(lock.path)
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(data[:4096])
    except ValueError:
        record = {}  # unreadable: treat as expired, any taker may replace it
    return (record if isinstance(record, dict) else {}), info.get("ETag")


def _expired(record: dict[str, Any]) -> bool:
    if not isinstance(record.get("expires"), (int, float)) or record["expires"] < time.time():
        return True
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True  # its process on this machine is gone
        except PermissionError:
            return False
    return False


class _Refused(Exception):
    """A conditional write whose condition did not hold (the object exists, or is another version)."""


def _write(lock: UPath, ttl: float, **condition: str) -> str:
    try:
        answer = lock.fs.pipe_file(lock.path, _record(ttl), **condition)
    except FileExistsError:
        raise _Refused from None
    except OSError as exc:  # s3fs: HTTP 412 on If-Match is EINVAL (FileExistsError only for If-None-Match)
        if exc.errno == errno.EINVAL or isinstance(exc, FileNotFoundError):
            raise _Refused from None
        raise
    etag = answer.get("ETag") if isinstance(answer, dict) else None
    if not etag:
        raise LeaseError(f"{lock.protocol}:// cannot hold a run folder's lease (no conditional writes through fsspec); "
                         "use a local folder or S3")
    return etag


def holder(lock: UPath) -> str | None:
    """Who holds the lease now (None if nobody, or only an expired lease is left)."""
    record, _ = _read(lock)
    if record is None or _expired(record):
        return None
    return str(record.get("holder") or "unknown holder")


def take(lock: UPath, ttl: float = LEASE_S) -> str:
    """Take the lease, returning the ETag written; LeaseBusy when a live holder has it."""
    for _ in range(3):  # the lease may vanish or change between reading and writing it
        try:
            return _write(lock, ttl, mode="create")
        except _Refused:
            pass
        record, etag = _read(lock)
        if record is None:
            continue
        if not _expired(record):
            raise LeaseBusy(str(record.get("holder") or "unknown holder"))
        try:
            return _write(lock, ttl, IfMatch=etag)
        except _Refused:
            continue  # another taker won, or the holder released it: look again
    raise LeaseBusy(holder(lock) or "another run taking it at the same time")


@contextmanager
def hold(lock: UPath, ttl: float = LEASE_S, on_lost: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lease while the block runs, renewing it in a background thread."""
    etag = take(lock, ttl)
    done = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not done.wait(ttl / 4):
            try:
                etag = _write(lock, ttl, IfMatch=etag)
            except _Refused:
                log.error("lost the lease on %s to %s; stopping this run", lock.parent, holder(lock) or "nobody")
                if on_lost is not None:
                    on_lost()
                return
            except Exception as exc:  # noqa: BLE001 - a network fault: try again at the next beat
                log.warning("could not renew the lease on %s (%s); trying again", lock.parent, exc)

    beat = threading.Thread(target=renew, name="catalogen-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        done.set()
        beat.join()
        record, current = _read(lock)
        if current == etag:
            lock.fs.rm_file(lock.path)
