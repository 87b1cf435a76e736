"""Stable hashes: the same inputs give the same value on every machine, Python and run.

Python's `hash()` is salted per process, so seeds and idempotency keys go through SHA-256 of a
canonical encoding instead. Per-row hashes of whole columns (`column_keys`, `derive_seeds`) build
their text with Arrow and hash it in one pass: a million rows take about a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

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


def derive_seeds(run_seed: int, row_ids: Sequence[str], variants: Sequence[int]) -> list[int]:
    """`derive_seed` for many rows (the same values, built without a JSON encoder per row)."""
    head = f'["seed",{int(run_seed)},'
    sha, dumps = hashlib.sha256, json.dumps
    return [
        int.from_bytes(sha(f"{head}{dumps(rid, ensure_ascii=False)},{int(v)}]".encode()).digest()[:8], "big") & MAX_SEED
        for rid, v in zip(row_ids, variants)
    ]


def _encoded(values: pa.Array) -> pa.Array:
    """Each value as `<length>:<text>` (null as `-`), so joined values can never run together."""
    text = pc.cast(values, pa.string())
    length = pc.cast(pc.binary_length(text), pa.string())
    return pc.fill_null(pc.binary_join_element_wise(length, text, ":"), "-")


def column_keys(fixed: Any, columns: Sequence[pa.Array]) -> list[str]:
    """Hex SHA-256 per row of (`fixed`, the row's values in `columns`): idempotency keys.

    `fixed` holds what every row shares (stage, version, models, settings); the columns hold what
    varies by row. Values are encoded by Arrow's text cast, which is the same on every machine.
    """
    if not columns:
        raise ValueError("column_keys needs at least one column of per-row values")
    prefix = stable_hash(fixed)
    joined = pc.binary_join_element_wise(*(_encoded(c) for c in columns), "|")
    sha = hashlib.sha256
    return [sha(f"{prefix}|{row}".encode()).hexdigest() for row in joined.to_pylist()]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
