"""Stable hashes: the same inputs give the same value on every machine, Python and run.

Python's `hash()` is salted per process, so seeds and idempotency keys go through SHA-256 of a
canonical encoding instead. Per-row hashes of whole columns (`column_keys`, `derive_seeds`) build
their text with Arrow and hash it in one pass: a million rows take about a second.
"""

from __future__ import annotations

import hashlib
import json
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


def _digests(texts: pa.Array) -> Iterator[list[bytes]]:
    """SHA-256 of each row's UTF-8 text, a chunk of rows at a time."""
    sha = hashlib.sha256
    for start in range(0, len(texts), CHUNK_ROWS):
        chunk = texts.slice(start, CHUNK_ROWS).to_pylist()
        yield [sha(text.encode()).digest() for text in chunk]


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
    ids = _json_strings(pc.cast(row_ids, pa.string()))
    texts = pc.binary_join_element_wise(f'["seed",{int(run_seed)},', ids, ",",
                                        pc.cast(variants, pa.string()), "]", "")
    seeds = np.empty(len(texts), dtype=np.int64)
    mask = np.uint64(MAX_SEED)
    position = 0
    for chunk in _digests(texts):
        head = np.frombuffer(b"".join(d[:8] for d in chunk), dtype=">u8")
        seeds[position:position + len(chunk)] = (head & mask).astype(np.int64)
        position += len(chunk)
    return seeds


def _encoded(values: pa.Array) -> pa.Array:
    """Each value as `<length>:<text>` (null as `-`), so joined values can never run together."""
    text = pc.cast(values, pa.string())
    length = pc.cast(pc.binary_length(text), pa.string())
    return pc.fill_null(pc.binary_join_element_wise(length, text, ":"), "-")


def column_keys(fixed: Any, columns: Sequence[pa.Array]) -> pa.Array:
    """Hex SHA-256 per row of (`fixed`, the row's values in `columns`): idempotency keys.

    `fixed` holds what every row shares (stage, version, models, settings); the columns hold what
    varies by row. Values are encoded by Arrow's text cast, which is the same on every machine.
    """
    if not columns:
        raise ValueError("column_keys needs at least one column of per-row values")
    prefix = pa.scalar(stable_hash(fixed) + "|", pa.string())
    joined = pc.binary_join_element_wise(*(_encoded(c) for c in columns), "|")
    texts = pc.binary_join_element_wise(prefix, joined, "")
    return pa.concat_arrays([pa.array([d.hex() for d in chunk], pa.string()) for chunk in _digests(texts)]
                            or [pa.array([], pa.string())])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
