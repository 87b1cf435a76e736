"""Stable hashes: the same inputs give the same value on every machine, Python and run.

Python's `hash()` is salted per process, so seeds and idempotency keys go through SHA-256 of a
canonical encoding instead. Per-row hashes of whole columns (`column_keys`, `derive_seeds`) build
their text with Arrow and hash it in one pass: a million rows take about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_SEED = 2**63 - 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(*parts: Any) -> str:
    """Hex SHA-256 of the parts' canonical JSON."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()


def derive_seed(run_seed: int, row_id: str, variant: int) -> int:
    """The seed of a row that brings none: a function of (run seed, id, variant) only.

    SHA-256 of the JSON `["seed", run_seed, id, variant]`, first 8 bytes, top bit cleared.
    """
    digest = hashlib.sha256(canonical_json(["seed", run_seed, row_id, variant]).encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


CHUNK_ROWS = 1 << 16  # rows hashed per pass: bounds the Python objects alive at once


def _digests(texts: pa.Array) -> list[bytes]:
    """SHA-256 of each row's UTF-8 text."""
    sha = hashlib.sha256
    return [sha(text.encode()).digest() for text in texts.to_pylist()]


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK_ROWS):
        yield slice(start, min(n, start + CHUNK_ROWS))


def _json_strings(values: pa.Array) -> pa.Array:
    """Each text as its canonical JSON string literal (`json.dumps(..., ensure_ascii=False)`).

    Most ids need no escaping and are only quoted, by Arrow; the few with quotes, backslashes or
    control characters go through the JSON encoder.
    """
    needs_escape = pc.fill_null(pc.match_substring_regex(values, r'["\\\x00-\x1f\x7f]'), False)
    quoted = pc.binary_join_element_wise('"', values, '"', "")
    if not pc.any(needs_escape).as_py():
        return quoted
    escaped = [json.dumps(v, ensure_ascii=False) for v in values.filter(needs_escape).to_pylist()]
    positions = np.flatnonzero(needs_escape.to_numpy(zero_copy_only=False))
    merged = np.array(quoted.to_pylist(), dtype=object)
    merged[positions] = escaped
    return pa.array(merged, pa.string())


def derive_seeds(run_seed: int, row_ids: pa.Array, variants: pa.Array) -> np.ndarray:
    """`derive_seed` for many rows at once (the same values), as an int64 array."""
    seeds = np.empty(len(row_ids), dtype=np.int64)
    head = f'["seed",{int(run_seed)},'
    for part in _chunks(len(row_ids)):
        ids = _json_strings(pc.cast(row_ids[part], pa.string()))
        texts = pc.binary_join_element_wise(head, ids, ",", pc.cast(variants[part], pa.string()), "]", "")
        first8 = np.frombuffer(b"".join(d[:8] for d in _digests(texts)), dtype=">u8")
        seeds[part] = (first8 & np.uint64(MAX_SEED)).astype(np.int64)
    return seeds


def _encoded(values: pa.Array) -> pa.Array | pa.Scalar:
    """Each value as `<length>:<text>` (null as `-`), so joined values can never run together.

    A column holding one value throughout (a run default, typically) is encoded once, as a scalar:
    the same text, at the cost of one row.
    """
    text = pc.cast(values, pa.string())
    if len(text) > 1 and text.null_count == 0 and pc.count_distinct(text).as_py() == 1:
        return pa.scalar(_encoded(text[:1])[0].as_py(), pa.string())
    length = pc.cast(pc.binary_length(text), pa.string())
    return pc.fill_null(pc.binary_join_element_wise(length, text, ":"), "-")


def _hex_array(digests: list[bytes]) -> pa.Array:
    """64-character hex strings of the digests, built as one buffer (no Python string per row)."""
    hexed = b"".join(digests).hex().encode("ascii")
    offsets = np.arange(0, 64 * (len(digests) + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(hexed))


def column_keys(fixed: Any, columns: Sequence[pa.Array]) -> pa.Array:
    """Hex SHA-256 per row of (`fixed`, the row's values in `columns`): idempotency keys.

    `fixed` holds what every row shares (stage, version, models, settings); the columns hold what
    varies by row. Values are encoded by Arrow's text cast, which is the same on every machine.
    Rows are encoded and hashed a chunk at a time, so memory stays flat however long the catalog.
    """
    if not columns:
        raise ValueError("column_keys needs at least one column of per-row values")
    prefix = stable_hash(fixed) + "|"
    pieces = []
    for part in _chunks(len(columns[0])):
        encoded = [_encoded(c[part]) for c in columns]
        if all(isinstance(e, pa.Scalar) for e in encoded):  # a join needs one array to size it
            encoded[0] = pa.array([encoded[0].as_py()] * (part.stop - part.start), pa.string())
        joined = pc.binary_join_element_wise(*encoded, "|")
        texts = pc.binary_join_element_wise(prefix, joined, "")
        pieces.append(_hex_array(_digests(texts)))
    return pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())


def text_digest(columns: Sequence[pa.Array]) -> str:
    """Hex SHA-256 of text columns (no nulls): their values in order, read from Arrow's buffers.

    Each column contributes its value offsets (so values cannot run together) and its bytes.
    """
    h = hashlib.sha256()
    for column in columns:
        text = pc.cast(column, pa.string())
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        if text.null_count:
            raise ValueError("text_digest needs columns without nulls")
        _, offsets_buffer, data = text.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=len(text) + 1, offset=text.offset * 4)
        h.update((offsets - offsets[0]).astype("<i8").tobytes())
        h.update(memoryview(data)[offsets[0]:offsets[-1]] if data is not None else b"")
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with (Path(path) if isinstance(path, str) else path).open("rb") as fh:  # a Path, or a UPath in a bucket
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> tuple[int, ...]:
    """What changes whenever a file's content may have: device, inode, size, mtime and ctime (ns).

    Size and mtime alone miss an in-place edit of the same length whose mtime is set back
    (`os.utime`, `touch -r`, `rsync -t`); ctime cannot be set back, and every write or utime moves it.
    """
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@lru_cache(maxsize=4096)
def _remembered_sha256(path: str, fingerprint: tuple[int, ...]) -> str:
    return sha256_file(Path(path))


def sha256_file_remembered(path: str | Path) -> str:
    """`sha256_file`, hashed once per process while the file's `file_fingerprint` stays the same:
    a multi-GB model file is read once, not at every run's planning, and an edit is never missed."""
    return _remembered_sha256(str(path), file_fingerprint(path))
