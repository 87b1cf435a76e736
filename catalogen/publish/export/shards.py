"""What every export writer shares: the shard, the sample, files written atomically, each shard's
metadata Parquet, and the interface, shown by the writer that writes nothing (`DummyWriter`).

A writer is `Writer(layout, shard)` with `write(sample)`, `close()`, and the static `files(shard)`
(the files it writes, done when all exist) and `folder(shard)` (a folder it owns whole, or None),
as img2dataset's writers share one constructor, `write` and `close`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from catalogen.storage.store import fsync_path, temp_file, write_parquet_atomic

TMP = ".tmp"
EXTRA_HINT = "pip install 'catalogen[export]'"


class ExportError(ValueError):
    """The run folder, an option or the output folder cannot give an export; the message names which."""


@dataclass(frozen=True)
class Shard:
    """One output shard: rows [start, start + rows) of its split's rows."""

    split: str
    index: int
    count: int  # shards in this split
    start: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class Sample:
    """One exported row, as a writer receives it."""

    key: str
    image: bytes
    ext: str  # of the image file, without the dot ("png")
    text: str
    metadata: dict[str, Any]  # key, text and provenance, in `Layout.schema` order

    @property
    def file_name(self) -> str:
        return f"{self.key}.{self.ext}"


@dataclass(frozen=True)
class Layout:
    """What every shard of one export shares."""

    out: Path
    schema: pa.Schema  # of Sample.metadata: key, text, provenance
    complete: tuple[str, ...]  # provenance columns with a plain value in every exported row

    @property
    def tmp_dir(self) -> Path:
        return self.out / TMP


class AtomicFile:
    """A file written under a temporary name in `tmp_dir` and renamed into place by `commit()`.

    For shards too large to hold in memory (`store.write_atomic` takes the bytes at once).
    """

    def __init__(self, path: Path, tmp_dir: Path) -> None:
        self.path = path
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = temp_file(tmp_dir, path.name)
        self.handle: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)


def _jsonable(value: Any) -> Any:
    """A value JSON can hold: times as ISO text, NaN and infinities as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def json_line(value: dict[str, Any]) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, default=str)


def _need(module: str, fmt: str) -> Any:
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ExportError(f"--format {fmt} needs the `{module}` package: {EXTRA_HINT}") from None


def _metadata_parquet(layout: Layout, rows: list[dict[str, Any]], path: Path) -> None:
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=layout.schema), path, layout.tmp_dir)


class DummyWriter:
    """Does not write: the cost of reading and checking the run's images alone (benchmarks)."""

    def __init__(self, layout: Layout, shard: Shard) -> None:
        self.bytes = 0

    @staticmethod
    def files(shard: Shard) -> list[str]:
        return []

    @staticmethod
    def folder(shard: Shard) -> str | None:
        return None

    def write(self, sample: Sample) -> None:
        self.bytes += len(sample.image)

    def close(self) -> None:
        return None
