"""One writer per run folder on object storage: a lease object, created only where none exists.

An object store has no flock, and a lock file left by a killed process never goes away by itself.
So the lock is an object (`<run>/.lock`) holding who took it and until when:

- taking it is a conditional create (S3 `If-None-Match: *`): of two runs, exactly one succeeds;
- the holder renews it every `ttl / 4` seconds with a conditional overwrite (`If-Match` on the
  ETag it wrote last); each renewal has a deadline of `ttl / 4`, and every one that fails is logged;
- by its own clock, the holder writes nothing more into the folder once `ttl - ttl / 4` seconds
  have passed since the last renewal it sent that succeeded (a `Guard` checked before every write):
  it stops before any taker could see its lease expire. It then stops the run;
- what it writes is fenced too: a file is created only where none exists, or overwritten only at
  the version it saw while its lease held, so a request that a network held back and delivered
  after a takeover is refused by the store instead of overwriting the new holder's file;
- a lease past its expiry, or one whose holder was a process of this machine that is gone (a
  SIGKILLed run, resumed at once), is taken over by a conditional overwrite of exactly that
  version: two runs taking over at once cannot both win;
- a lease object that cannot be read as one (too large, not JSON, a field out of range) counts as
  held, naming `catalogen unlock`: guessing it expired would let two runs write at once;
- the holder deletes it when done.

Expiry is judged by the taker's clock against the holder's; clocks further apart than `ttl / 4`
would let a live lease be taken, so keep machines on NTP. Needs a store with conditional writes
(AWS S3 and its compatibles since 2024, through s3fs); another backend is refused with a line
saying so. `CATALOGEN_LEASE_S` sets `ttl` (default 60 s, at least 2).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from upath import UPath

log = logging.getLogger("catalogen")

LEASE_S = 60.0  # a holder that stops renewing loses the folder after this long
MIN_LEASE_S = 2.0
MAX_RECORD_BYTES = 4096  # a lease record is a few hundred bytes; a larger object is not one
HUGE_PUT = 5 * 2**30  # s3fs sends up to this in one PUT (a multipart upload cannot be conditional)


class LeaseError(RuntimeError):
    """The store cannot hold a lease (no conditional writes), or the holder lost its lease."""


class LeaseBusy(RuntimeError):
    """Another live holder has the lease (or a lease object that cannot be read is there)."""


class LeaseLost(LeaseError):
    """This process's lease may have expired, or another writer changed a file: it writes no more."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, limit: int = 200) -> str:
    """Text read from a lock, safe for a terminal: control characters (escape sequences that retitle
    a terminal or erase a line, bidi overrides) shown as `\\xNN` escapes, length bounded."""
    text = text[:limit] + ("…" if len(text) > limit else "")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def lease_seconds() -> float:
    """The lease's length: `CATALOGEN_LEASE_S` (tests shorten it), else 60 s."""
    value = os.environ.get("CATALOGEN_LEASE_S")
    if not value:
        return LEASE_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not MIN_LEASE_S <= seconds <= 3600:  # also refuses NaN
        raise LeaseError(f"CATALOGEN_LEASE_S={value!r}: give seconds from {MIN_LEASE_S:g} to 3600")
    return seconds


class LeaseRecord(BaseModel):
    """What a lease object holds; every field checked (a NaN expiry, a pid of 10**30 are refused)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    holder: str = Field(max_length=300)
    host: str = Field(max_length=255)
    pid: int = Field(ge=1, le=2**31 - 1)
    expires: float = Field(ge=0, le=1e11)
    renewed: Union[float, None] = Field(None, ge=0, le=1e11)
    token: str = Field("", max_length=64)


@dataclass(frozen=True)
class Malformed:
    """A lease object that is not a lease record: held until a person removes it."""

    lock: UPath
    reason: str

    def describe(self) -> str:
        return (f"its lease {self.lock} cannot be read ({printable(self.reason)}); if no run is writing "
                f"into the folder, remove it with: catalogen unlock {self.lock.parent}")


Found = Union[LeaseRecord, Malformed]


def _read(lock: UPath, timeout: float | None = None) -> tuple[Found | None, str | None]:
    """The lease and the ETag of that version (None, None when there is none); never more than
    MAX_RECORD_BYTES of it read."""
    try:
        info = lock.fs.info(lock.path, refresh=True, timeout=timeout)
        data = lock.fs.cat_file(lock.path, start=0, end=MAX_RECORD_BYTES + 1, timeout=timeout)
    except FileNotFoundError:
        return None, None
    return _parse(lock, data, int(info.get("size") or 0)), info.get("ETag")


def _parse(lock: UPath, data: bytes, size: int) -> Found:
    if max(size, len(data)) > MAX_RECORD_BYTES:
        return Malformed(lock, f"{max(size, len(data))} bytes, more than a lease record's {MAX_RECORD_BYTES}")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return Malformed(lock, "not JSON")
    if not isinstance(value, dict):
        return Malformed(lock, "not a JSON object")
    try:
        return LeaseRecord.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "record"
        return Malformed(lock, f"{field}: {first['msg']}")


def _expired(record: Found) -> bool:
    if isinstance(record, Malformed):
        return False
    if record.expires < time.time():
        return True
    if record.host == socket.gethostname():
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return True  # its process on this machine is gone
        except (PermissionError, OverflowError):
            return False
    return False


def _describe(record: Found) -> str:
    return record.describe() if isinstance(record, Malformed) else printable(record.holder) or "unknown holder"


class _Refused(Exception):
    """A conditional write whose condition did not hold (the object exists, or is another version)."""


def _conditional_put(path: UPath, data: bytes, timeout: float | None = None, **condition: str) -> Any:
    try:
        return path.fs.pipe_file(path.path, data, chunksize=HUGE_PUT, timeout=timeout, **condition)
    except FileExistsError:
        raise _Refused from None
    except OSError as exc:  # s3fs: HTTP 412 on If-Match is EINVAL (FileExistsError only for If-None-Match)
        if exc.errno == errno.EINVAL or isinstance(exc, FileNotFoundError):
            raise _Refused from None
        raise


def _record(ttl: float, token: str) -> bytes:
    now = time.time()
    return json.dumps({
        "holder": f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "host": socket.gethostname(), "pid": os.getpid(), "renewed": now, "expires": now + ttl, "token": token,
    }).encode()


def _write(lock: UPath, ttl: float, token: str, timeout: float | None = None, **condition: str) -> str:
    answer = _conditional_put(lock, _record(ttl, token), timeout=timeout, **condition)
    etag = answer.get("ETag") if isinstance(answer, dict) else None
    if not etag:
        raise LeaseError(f"{lock.protocol}:// cannot hold a run folder's lease (no conditional writes through fsspec); "
                         "use a local folder or S3")
    return etag


def holder(lock: UPath) -> str | None:
    """Who holds the lease now (None if nobody, or only an expired lease is left), printable."""
    record, _ = _read(lock)
    if record is None or _expired(record):
        return None
    return _describe(record)


def take(lock: UPath, ttl: float | None = None, token: str = "") -> str:
    """Take the lease, returning the ETag written; LeaseBusy when a live holder has it."""
    ttl = ttl or lease_seconds()
    for _ in range(3):  # the lease may vanish or change between reading and writing it
        try:
            return _write(lock, ttl, token, mode="create")
        except _Refused:
            pass
        record, etag = _read(lock)
        if record is None:
            continue
        if not _expired(record):
            raise LeaseBusy(_describe(record))
        try:
            return _write(lock, ttl, token, IfMatch=etag)
        except _Refused:
            continue  # another taker won, or the holder released it: look again
    raise LeaseBusy(holder(lock) or "another run taking it at the same time")


class Guard:
    """This process's claim on a folder, by its own clock: valid until `ttl - ttl / 4` after the last
    renewal it sent that succeeded. Checked before every write into the folder (`put`)."""

    def __init__(self, lock: UPath, ttl: float) -> None:
        self.lock, self.ttl = lock, ttl
        self.token = uuid.uuid4().hex
        self.valid_until = 0.0
        self.lost: str | None = None

    def renewed(self, sent: float) -> None:
        self.valid_until = sent + self.ttl - self.ttl / 4

    def check(self) -> None:
        if self.lost is None and time.monotonic() >= self.valid_until:
            self.lost = f"no renewal succeeded for {self.ttl * 3 / 4:g} s, so the lease may have expired"
        if self.lost is not None:
            raise LeaseLost(f"lost the lease on {self.lock.parent} ({self.lost}); this run writes nothing more "
                            "into the folder: another run may hold it now")


_guards: dict[str, Guard] = {}
_guards_lock = threading.Lock()


def _guard_for(path: UPath) -> Guard | None:
    with _guards_lock:
        return next((g for folder, g in _guards.items() if path.path.startswith(folder)), None)


def put(path: UPath, data: bytes) -> str | None:
    """Write a file into a folder: one PUT, whole or absent. In a folder this process holds a lease
    on, fenced: only while the lease holds by this process's clock, and conditional, so that a PUT
    held back by the network and delivered after a takeover cannot replace the new holder's file."""
    guard = _guard_for(path)
    if guard is None:
        answer = path.fs.pipe_file(path.path, data)
        return answer.get("ETag") if isinstance(answer, dict) else None
    guard.check()
    try:
        answer = _conditional_put(path, data, mode="create")
    except _Refused:  # a file rewritten (run.json, results.parquet): overwrite the version seen now
        etag = path.fs.info(path.path, refresh=True).get("ETag")
        guard.check()  # the version seen was seen while the lease held: a taker's write changes it
        try:
            answer = _conditional_put(path, data, IfMatch=etag)
        except _Refused:
            guard.lost = f"{path} was changed by another writer"
            guard.check()
    return answer.get("ETag") if isinstance(answer, dict) else None


@contextmanager
def hold(lock: UPath, ttl: float | None = None, on_lost: Callable[[], None] | None = None) -> Iterator[Guard]:
    """Hold the lease while the block runs, renewing it in a background thread; writes through `put`
    into the folder are fenced by the guard it yields. `on_lost` is called once the lease is lost."""
    ttl = ttl or lease_seconds()
    guard = Guard(lock, ttl)
    sent = time.monotonic()
    etag = take(lock, ttl, guard.token)
    guard.renewed(sent)
    done = threading.Event()
    folder = lock.parent.path.rstrip("/") + "/"

    def lost(why: str) -> None:
        guard.lost = guard.lost or why
        log.error("lost the lease on %s (%s); this run writes nothing more into the folder and stops",
                  lock.parent, guard.lost)
        if on_lost is not None:
            on_lost()

    def renew() -> None:
        nonlocal etag
        beat = ttl / 4
        while not done.wait(beat):
            if guard.lost is not None:
                return lost(guard.lost)  # a write found a file changed by another writer
            sent = time.monotonic()
            try:
                try:
                    etag = _write(lock, ttl, guard.token, timeout=beat, IfMatch=etag)
                    guard.renewed(sent)
                except _Refused:
                    record, current = _read(lock, timeout=beat)
                    if not (isinstance(record, LeaseRecord) and record.token == guard.token):
                        return lost(f"taken over by {_describe(record) if record else 'nobody'}")
                    etag = current  # an earlier renewal of ours arrived late: still ours, renewed next beat
            except Exception as exc:  # noqa: BLE001 - a network fault or a deadline: try again at the next beat
                log.warning("could not renew the lease on %s: %s: %s; %.1f s left before this run stops writing",
                            lock.parent, type(exc).__name__, str(exc) or "no answer in time",
                            max(0.0, guard.valid_until - time.monotonic()))
            if time.monotonic() >= guard.valid_until:
                return lost(f"no renewal succeeded for {ttl * 3 / 4:g} s, so the lease may have expired")

    with _guards_lock:
        _guards[folder] = guard
    beat = threading.Thread(target=renew, name="catalogen-lease", daemon=True)
    beat.start()
    try:
        yield guard
    finally:
        done.set()
        with _guards_lock:
            _guards.pop(folder, None)
        beat.join(ttl / 4 + 1)
        _release(lock, etag, ttl / 4)


def _release(lock: UPath, etag: str | None, timeout: float) -> None:
    """Delete the lease if it is still the version this holder wrote (not after a takeover)."""
    try:
        _, current = _read(lock, timeout=timeout)
        if current == etag:
            lock.fs.rm_file(lock.path)
    except Exception as exc:  # noqa: BLE001 - left behind, the lease expires by itself
        log.warning("could not release the lease on %s: %s: %s; it expires by itself", lock.parent,
                    type(exc).__name__, str(exc) or "no answer in time")



def inspect(lock: UPath) -> tuple[str, str] | None:
    """What `catalogen unlock` shows of a lease before removing it, and the ETag of that version;
    None when there is no lease."""
    record, etag = _read(lock)
    if record is None or etag is None:
        return None
    if isinstance(record, Malformed):
        return f"{lock} cannot be read as a lease: {printable(record.reason)}", etag
    left = record.expires - time.time()
    state = "expired" if _expired(record) else f"expires in {left:.0f} s unless renewed"
    return f"{lock} is held by {printable(record.holder)} ({state})", etag


def remove(lock: UPath, etag: str) -> bool:
    """Delete the lease if it is still the version shown (`inspect`); False when it changed since."""
    _, current = _read(lock)
    if current != etag:
        return False
    lock.fs.rm_file(lock.path)
    return True
