"""The output folder: layout, atomic writes, and what is already done.

```
<run>/
  run.json                               configuration, model identities, versions, every invocation
  stages/<stage>/part-<shard>.parquet    one per finished shard and stage; present = complete
  stages/<stage>/set-aside/              parts that could not be read (their rows are redone)
  images/<stage>/<hh>/<id>-<idhash>-v<variant>-<key>.png
  results.parquet                        one row per (id, variant): the catalog's columns and every stage's
  work/                                  shard inputs and temporary files of this invocation
```

The folder, not Prefect's database, is the source of truth. Every file is written under a
temporary name in `work/tmp/` and renamed into place, so a file that exists is complete and a
killed invocation leaves its debris in one folder, swept by the next. In a bucket (`s3://…`, see
catalogen/storage/locations.py) each file is one PUT instead, whole or absent, and the folder's lock is a
lease object (catalogen/storage/lease.py) instead of an flock. A stage's part files are
never rewritten: a later result for the same row (a retry, `catalogen verify`) is a new part,
and the newest result per row and key wins.

An image's name holds a hash of the exact row id, its variant and its key: every (id, variant)
owns its files on every filesystem (ids that sanitise alike or differ only in case included), and
a changed setting writes new files beside the old ones instead of overwriting them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from upath import UPath

from catalogen import stopping
from catalogen.storage import lease
from catalogen.storage.hashing import sha256_bytes
from catalogen.storage.locations import Location, arrow_path, is_remote, put, read_table, storage_folder

# A row's outcome in a stage. The first three count as success: `fallback` (an answer that could
# not be used, replaced by the input) and `degenerate` (a caption flagged as useless) still let the
# row continue. All count as done on a plain re-run; `--retry-failed` redoes "failed".
STATUSES = ("ok", "fallback", "degenerate", "failed", "skipped")
SUCCEEDED = ("ok", "fallback", "degenerate")
ROW_KEY = ("id", "variant", "key")  # a result row belongs to its planned row under one key


class RunStateError(RuntimeError):
    """A file of the run folder is unreadable in a way the run cannot repair by itself."""


class RunFolderBusy(RuntimeError):
    """Another invocation is writing to the same run folder."""


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename into it survives a power cut), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_umask_lock = threading.Lock()


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells (`/proc`), else set and restored
    under a lock (`os.umask` is the only other way to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def temp_file(folder: Path, name: str) -> tuple[int, str]:
    """`tempfile.mkstemp` in `folder` for a file that will be renamed to `name`: (fd, temporary path).

    mkstemp creates files 0600 whatever the umask, and a rename keeps the mode: the file gets the
    mode `open()` would have given it (0666 less the umask), so a report or a run folder is as
    readable by others (a web server, a team) as any file the user makes.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name[:80]}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def temp_folder(folder: Path, name: str) -> Path:
    """`tempfile.mkdtemp` in `folder` for a folder that will be renamed to `name`, with the mode
    `mkdir` would give it (mkdtemp's is 0700 whatever the umask; see `temp_file`)."""
    made = Path(tempfile.mkdtemp(prefix=f".{name[:80]}.", dir=folder))
    os.chmod(made, 0o777 & ~_umask())
    return made


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write bytes to a temporary file, flush them to disk, then rename into place.

    `tmp_dir` (on the same filesystem) collects the temporary files, so a crash's debris is
    found in one place instead of beside millions of images.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tmp_dir or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(folder, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet_atomic(table: pa.Table, path: Path, tmp_dir: Path | None = None) -> None:
    write_atomic(path, parquet_bytes(table), tmp_dir)


def safe_name(text: str, limit: int = 40) -> str:
    """A readable file-name fragment from a row id: no separators, no dot-dot, bounded length."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit]
    return cleaned or "row"


def id_hash(row_id: str) -> str:
    """16 hex digits of SHA-256 of the exact id: unique per id for any realistic catalog."""
    return sha256_bytes(row_id.encode())[:16]


# Folders locked by this process, by lock name (flock is per open file, so a second flock would
# block itself; a second lease would be refused as busy).
_held: dict[str, int] = {}
_held_lock = threading.Lock()


@contextmanager
def once_per_process(key: str, take: Callable[[], ContextManager[None]]) -> Iterator[None]:
    """`take()` the first time this process asks for `key`; nested requests only count."""
    with _held_lock:
        reentered = key in _held
        if reentered:
            _held[key] += 1
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    with take():
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(key, None)


@contextmanager
def hold_folder(lock: Path, user: str) -> Iterator[None]:
    """An exclusive `flock` on `lock` (a file in the folder it guards), refused at once when held.

    Re-entrant within a process; the holder's pid, host and start time are written into the file
    for `lock_holder`. The lock dies with its process, however that ends.
    """
    with once_per_process(str(lock.resolve()), lambda: _flock(lock, user)):
        yield


@contextmanager
def _flock(lock: Path, user: str) -> Iterator[None]:
    fd = _locked(lock, user)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock, also when the process dies


def _locked(lock: Path, user: str) -> int:
    """A descriptor of the file at `lock`, flocked. A holder may remove its lock file as it finishes
    (an export does): a lock taken on the file it removed guards nothing, so take the new one."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunStateError(f"cannot use {lock.parent} as a folder: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(f"{lock.parent} is in use by another {user} ({lock_holder(lock) or 'unknown holder'})") \
                from None
        try:
            held, named = os.fstat(fd), os.stat(lock)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def _lease(lock: UPath, user: str) -> Iterator[None]:
    def lost() -> None:  # another run took the folder over: stop writing into it
        stopping.STOPPING.set()
        stopping.ABANDON.set()

    try:
        with lease.hold(lock, on_lost=lost):
            yield
    except lease.LeaseBusy as exc:
        raise RunFolderBusy(f"{lock.parent} is in use by another {user} ({exc})") from None
    except lease.LeaseError as exc:
        raise RunStateError(str(exc)) from None


def lock_holder(lock: Path) -> str | None:
    """Who holds `lock` now (None if nobody)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:  # never taken, or removed by a holder that finished
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lease.printable(os.pread(fd, 200, 0).decode(errors="replace").strip()) or "unknown holder"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def folder_fault(folder: Path) -> str | None:
    """Why a local folder could not be made (or written, when it exists), or None; found without
    creating anything, from its nearest existing parent."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK) or os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is not writable"
    return None


class RunStore:
    """One run's output folder (layout in the module docstring)."""

    def __init__(self, root: str | Path):
        # a Path, or a UPath for a bucket URL (see catalogen/storage/locations.py); http:// and the like refused
        self.root: Location = storage_folder(root, "run folder")
        self.remote = is_remote(self.root)

    # -- layout --
    @property
    def run_json(self) -> Location:
        return self.root / "run.json"

    @property
    def results_path(self) -> Location:
        return self.root / "results.parquet"

    def is_run(self) -> bool:
        """Whether `catalogen run` made this folder (it writes run.json first). A bucket that cannot
        be asked (no network, an endpoint that never answers) is a RunStateError, not a "no"."""
        if not self.remote:
            return self.run_json.is_file()
        try:
            return self.root.fs.info(self.run_json.path).get("type") == "file"
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 - every backend has its own errors
            raise RunStateError(f"{self.root} cannot be read: {type(exc).__name__}: {exc}") from None

    def check_usable(self) -> None:
        """Refuse, before anything is created, an output folder that cannot be one: an existing
        file, a path under a file, or a folder whose nearest existing parent cannot be written."""
        if self.remote:
            self._check_usable_remote()
            return
        if self.root.exists() and not self.root.is_dir():
            raise RunStateError(f"--out {self.root} is a file, not a folder")
        fault = folder_fault(self.root)
        if fault:
            raise RunStateError(f"--out {self.root} cannot be made or written: {fault}")

    def _check_usable_remote(self) -> None:
        """The bucket must exist and answer with these credentials (their values are never shown)."""
        try:
            if self.root.is_file():
                raise RunStateError(f"--out {self.root} is an object, not a folder")
            name = f"{self.root.protocol}://{self.root.path.split('/')[0]}"
            if not UPath(name, **self.root.storage_options).exists():
                raise RunStateError(f"--out {self.root}: the bucket {name} does not exist or cannot be seen")
        except RunStateError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend has its own errors (no credentials, no network)
            raise RunStateError(f"--out {self.root} cannot be used: {type(exc).__name__}: {exc}") from None

    @property
    def tmp_dir(self) -> Path:
        return self.root / "work" / "tmp"

    def stage_dir(self, stage: str) -> Location:
        return self.root / "stages" / stage

    def part_path(self, stage: str, shard: str) -> Location:
        return self.stage_dir(stage) / f"part-{shard}.parquet"

    def shard_input_path(self, stage: str, shard: str) -> Location:
        return self.root / "work" / stage / f"shard-{shard}.parquet"

    def image_path(self, stage: str, row_id: str, variant: int, key: str, ext: str = "png") -> str:
        """Relative to the run folder, so a results table stays valid when the folder moves."""
        digest = id_hash(row_id)
        return f"images/{stage}/{digest[:2]}/{safe_name(row_id)}-{digest}-v{variant}-{key[:12]}.{ext}"

    # -- one writer at a time --
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder for one invocation; a second one at the same time is refused at once.

        Re-entrant within a process (the CLI takes the lock before Prefect starts, and the flow
        it runs takes it again); released when the process ends, however it ends. On object
        storage the lock is a lease (catalogen/storage/lease.py) that a killed holder's successor takes over.
        """
        lock = self.root / ".lock"
        if self.remote:
            with once_per_process(str(lock), lambda: _lease(lock, "run")):
                yield
        else:
            with hold_folder(lock, "run"):
                yield

    def holder(self) -> str | None:
        """Who holds the folder now (None if nobody)."""
        return lease.holder(self.root / ".lock") if self.remote else lock_holder(self.root / ".lock")

    def clear_leftovers(self) -> None:
        """Remove shard inputs and temporary files (what a killed invocation leaves behind).

        Only safe while holding `exclusive()`: then no other invocation can be using them.
        """
        if self.remote:  # objects are written whole, so only shard inputs are left over
            if (self.root / "work").exists():
                self.root.fs.rm((self.root / "work").path, recursive=True)
            return
        shutil.rmtree(self.root / "work", ignore_errors=True)
        for tmp in self.root.glob(".*.tmp"):  # results.parquet and run.json of older versions
            tmp.unlink(missing_ok=True)
        for tmp in (self.root / "stages").glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)

    # -- writing --
    def write_file(self, path: Location, data: bytes) -> None:
        """A file of the folder, complete or absent: renamed into place on a disk, one PUT on a bucket."""
        if self.remote:
            put(path, data)
        else:
            write_atomic(path, data, self.tmp_dir)

    def write_shard_input(self, stage: str, shard: str, rows: pa.Table) -> None:
        self.write_file(self.shard_input_path(stage, shard), parquet_bytes(rows))

    def write_part(self, stage: str, shard: str, table: pa.Table) -> None:
        self.write_file(self.part_path(stage, shard), parquet_bytes(table))

    def write_image(self, relative: str, data: bytes) -> str:
        self.write_file(self.root / relative, data)
        return sha256_bytes(data)

    def read_bytes(self, relative: str) -> bytes:
        """A file of the run folder by its path relative to the folder (as results record them)."""
        return (self.root / relative).read_bytes()

    def exists(self, relative: str) -> bool:
        return (self.root / relative).exists()

    def files_under(self, relative: str) -> list[tuple[str, int]]:
        """Every file below a sub-folder: (path relative to the run folder, bytes), sorted; one
        listing on a bucket, not a request per file."""
        folder = self.root / relative
        if self.remote:
            base = self.root.path.rstrip("/") + "/"
            found = self.root.fs.find(folder.path, detail=True)
            return sorted((name[len(base):], int(info.get("size") or 0)) for name, info in found.items()
                          if info.get("type") != "directory")
        files = (p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else ()
        return sorted((str(p.relative_to(self.root)), p.stat().st_size) for p in files)

    def delete(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def write_json(self, path: Location, value: Any) -> None:
        self.write_file(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_results(self, table: pa.Table) -> None:
        self.write_file(self.results_path, parquet_bytes(table))

    def read_table(self, path: Location, **kwargs: Any) -> pa.Table:
        return read_table(path, **kwargs)

    def read_run_json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise RunStateError(f"{self.run_json} does not exist: is {self.root} a catalogen run folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunStateError(
                f"{self.run_json} is not valid JSON ({exc}); it holds the run's configuration and history. "
                "Restore it, or move it away to start the folder's history anew (finished shards are kept)."
            ) from None
        if not isinstance(value, dict):
            raise RunStateError(f"{self.run_json} does not hold a JSON object")
        return value

    # -- what is done --
    def part_files(self, stage: str) -> list[Location]:
        folder = self.stage_dir(stage)
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def set_aside_unreadable(self, stage: str) -> list[Location]:
        """Move parts whose Parquet footer cannot be read (a truncated or garbled file) aside.

        Their rows then read as not done and are recomputed. Returns the new paths.
        """
        moved = []
        for path in self.part_files(stage):
            where, filesystem = arrow_path(path)
            try:
                pq.read_metadata(where, filesystem=filesystem)
            except (pa.ArrowInvalid, OSError):
                target = self.stage_dir(stage) / "set-aside" / f"{path.name}.{int(time.time())}"
                if self.remote:
                    self.root.fs.mv(path.path, target.path)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                moved.append(target)
        return moved

    def stage_rows(self, stage: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Every row of every finished part of a stage (columns a part lacks read as null)."""
        return self.dataset(self.part_files(stage), schema).to_table(columns=columns)

    def dataset(self, files: list[Location], schema: pa.Schema) -> ds.Dataset:
        """Parquet files of this folder as one pyarrow dataset (read lazily, from a disk or a bucket)."""
        return ds.dataset([arrow_path(f)[0] for f in files], format="parquet", schema=schema,
                          filesystem=self.root.fs if self.remote else None)

def now_utc() -> datetime:
    return datetime.now(timezone.utc)

