"""Stable hashes: the same inputs give the same value on every machine, Python and run.

Python's `hash()` is salted per process, so seeds and idempotency keys go through SHA-256 of a
canonical JSON encoding instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MAX_SEED = 2**63 - 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(*parts: Any) -> str:
    """Hex SHA-256 of the parts' canonical JSON."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()


def derive_seed(run_seed: int, row_id: str, variant: int) -> int:
    """The seed of a row that brings none: a function of (run seed, id, variant) only."""
    digest = hashlib.sha256(canonical_json(["seed", run_seed, row_id, variant]).encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
