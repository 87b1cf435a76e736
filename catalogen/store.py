"""The output folder: layout, atomic writes, and what is already done.

The folder, not Prefect's database, is the source of truth. A stage's part file is written under
a temporary name and renamed into place, so a part that exists is complete; a crash loses only
the shards in flight. Images are named by their row and idempotency key, so a changed setting
writes new files beside the old ones instead of overwriting them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from catalogen.hashing import sha256_bytes

# A row's status in a stage; all count as done on a plain re-run, `--retry-failed` redoes "failed".
STATUSES = ("ok", "failed", "skipped")
ROW_KEY = ("id", "variant", "key")  # a result row belongs to its planned row under one key


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary sibling, flush them to disk, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_atomic(path, sink.getvalue().to_pybytes())


def _tuples(table: pa.Table, *columns: str) -> Iterator[tuple]:
    return zip(*(table.column(c).to_pylist() for c in columns))


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name fragment from a row id: no separators, no dot-dot, bounded length."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit]
    return cleaned or "row"


class RunFolderBusy(RuntimeError):
    """Another invocation is writing to the same run folder."""


class RunStore:
    """One run's output folder (see DESIGN §3 for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- layout --
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def results_path(self) -> Path:
        return self.root / "results.parquet"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def part_path(self, stage: str, shard: str) -> Path:
        return self.stage_dir(stage) / f"part-{shard}.parquet"

    def shard_input_path(self, stage: str, shard: str) -> Path:
        return self.root / "work" / stage / f"shard-{shard}.parquet"

    def image_path(self, stage: str, row_id: str, variant: int, key: str, ext: str = "png") -> str:
        """Relative to the run folder, so a results table stays valid when the folder moves."""
        return f"images/{stage}/{key[:2]}/{safe_name(row_id)}-v{variant}-{key[:12]}.{ext}"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder for one invocation; a second one at the same time is refused at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                raise RunFolderBusy(f"{self.root} is in use by another run ({holder or 'unknown holder'})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock, also when the process dies

    def clear_leftovers(self) -> None:
        """Remove shard inputs and half-written parts (what a killed invocation leaves behind).

        Only safe while holding `exclusive()`: then no other invocation can be using them.
        """
        shutil.rmtree(self.root / "work", ignore_errors=True)
        for tmp in (self.root / "stages").glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)

    # -- writing --
    def write_shard_input(self, stage: str, shard: str, rows: pa.Table) -> None:
        write_parquet_atomic(rows, self.shard_input_path(stage, shard))

    def write_image(self, relative: str, data: bytes) -> str:
        write_atomic(self.root / relative, data)
        return sha256_bytes(data)

    def write_json(self, path: Path, value: Any) -> None:
        write_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_run_json(self) -> dict[str, Any]:
        return json.loads(self.run_json.read_text())

    # -- what is done --
    def stage_rows(self, stage: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Every row of every finished part of a stage (temporary files are ignored)."""
        folder = self.stage_dir(stage)
        files = sorted(str(p) for p in folder.glob("part-*.parquet")) if folder.is_dir() else []
        return ds.dataset(files, format="parquet", schema=schema).to_table(columns=columns)

    def pending(self, stage: str, planned: pa.Table, schema: pa.Schema, retry_failed: bool = False) -> pa.Table:
        """The planned rows whose (id, variant, key) has no finished result yet."""
        done_statuses = [s for s in STATUSES if not (retry_failed and s == "failed")]
        done = self.stage_rows(stage, schema, ["id", "variant", "key", "status"])
        finished = {(i, v, k) for i, v, k, s in _tuples(done, *ROW_KEY, "status") if s in done_statuses}
        mask = [key not in finished for key in _tuples(planned, *ROW_KEY)]
        return planned.filter(pa.array(mask, pa.bool_()))

    def latest_results(self, stage: str, planned: pa.Table, schema: pa.Schema) -> pa.Table:
        """For each planned row, its newest result under the current key (nulls where none)."""
        rows = self.stage_rows(stage, schema)
        newest: dict[tuple, tuple[Any, int]] = {}
        for index, (*key, finished) in enumerate(_tuples(rows, *ROW_KEY, "finished_at")):
            best = newest.get(tuple(key))
            if best is None or finished >= best[0]:
                newest[tuple(key)] = (finished, index)
        take = [newest.get(key, (None, None))[1] for key in _tuples(planned, *ROW_KEY)]
        return rows.take(pa.array(take, pa.int64()))

    def write_results(self, table: pa.Table) -> None:
        write_parquet_atomic(table, self.results_path)

