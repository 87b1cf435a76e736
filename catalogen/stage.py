"""What every stage receives: the run's settings and the resources its shard may use.

A stage is `process(table, ctx) -> table`: rows in, the same rows out with new columns. It knows
nothing of Prefect, shards or files beyond `ctx.store`, so tests and benchmarks call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import pyarrow as pa
import torch

from catalogen.config import RunConfig
from catalogen.devices import Device
from catalogen.models import ModelIdentity
from catalogen.store import RunStore


def _ignore(done: int) -> None:
    return None


@dataclass
class StageContext:
    config: RunConfig
    store: RunStore
    identity: ModelIdentity
    device: Device
    dtype: torch.dtype
    progress: Callable[[int], None] = _ignore  # rows finished so far in this table


class Stage(Protocol):
    """The shape of a stage module (see tasks/generate.py)."""

    NAME: str
    VERSION: int
    SHARD_ORDER: tuple[str, ...]  # planned columns whose equal values should share a shard
    PLAN_SCHEMA: pa.Schema
    OUTPUT_SCHEMA: pa.Schema

    def plan(self, rows: pa.Table, cfg: RunConfig, identity: ModelIdentity) -> pa.Table: ...

    def process(self, planned: pa.Table, ctx: StageContext) -> pa.Table: ...
