"""The contract every stage keeps, and what it receives at run time.

A stage is a module (see tasks/generate.py), registered as a `catalogen.stages` entry point (see
catalogen/registry.py), with a `plan` and a `process`:

- `plan(rows, cfg, models) -> table` fixes each row's effective parameters and its own key,
  without loading a model. `rows` has `id`, `variant`, `seed` and every catalog column the run's
  rules know (null where not given), `prompt` and `negative_prompt` being the base prompt (the
  catalog's, or the template's). The returned table is aligned with `rows`.
- `process(planned, ctx) -> table` does the work: rows in, one result row out per row, never
  raising for a bad row (its `status` is `failed`, with the reason in `error`).

Chaining is the pipeline's job, not the stage's (see catalogen/run/plan.py): a stage declares
what it `READS` ("prompt", "image"; or "image@remove_bg": that stage's, when it runs earlier) and
`PROVIDES`, and `FROM_UPSTREAM` maps its planned columns to the provider's output columns. The pipeline extends each key with the keys of the rows it
reads from upstream, fills those columns from the upstream results before `process`, and marks
a row `skipped` when its upstream did not succeed.

Optional: `POSITION` (its place in pipeline order, see catalogen/registry.py; default last),
`PATH_COLUMNS` (catalog columns of file paths, checked and made absolute like catalog images),
`PATH_SETTINGS` (its settings that name a file, e.g. style's `style_image`), `SETTINGS_FROM` (other
sections it reads, e.g. `generate` for its model), `needs_device(cfg)` (False: the stage's shards
take no device lease, e.g. a server) and `disk_bound(cfg)` (a rough bound of the bytes one row's
files take, for `run --dry-run` before any run measured them; default: the planned width x height
as PNG). `PATH_COLUMNS`, `PATH_SETTINGS` and `SETTINGS_FROM` also decide what each image's recipe
holds (catalogen/run/recipe.py); a stage that makes images puts `**ctx.recipe_entry(row)` in their
provenance, so `catalogen reproduce` can make them again.

Every stage's `OUTPUT_SCHEMA` starts with `SHARED_COLUMNS`; a stage that makes images adds
`IMAGE_COLUMNS` (use `output_schema`). The results and resume read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import pyarrow as pa
from pydantic import BaseModel

from catalogen.catalog import Rule
from catalogen.config import ModelSpec, RunConfig
from catalogen.models.loading import ModelIdentity
from catalogen.storage.store import RunStore

if TYPE_CHECKING:
    import torch

SHARED_COLUMNS = [
    pa.field("id", pa.string()),
    pa.field("variant", pa.int32()),
    pa.field("key", pa.string()),
    pa.field("status", pa.string()),  # see store.STATUSES
    pa.field("error", pa.string()),  # the reason, for failed, skipped and fallback rows
    pa.field("seconds", pa.float64()),
    pa.field("device", pa.string()),
    # The row's share of the time its shard held the device lease (catalogen/run/costs.py), and that
    # time's price; filled by the runner, not the stage (a stage leaves them null).
    pa.field("device_seconds", pa.float64()),
    pa.field("cost", pa.float64()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
]
# An optional planned column: why a row will not run in this stage (null: it runs). The runner
# records such rows as `skipped` with the reason, without calling `process`.
SKIP_COLUMN = "skip_reason"
IMAGE_COLUMNS = [
    pa.field("image_path", pa.string()),  # relative to the run folder
    pa.field("image_sha256", pa.string()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
]


@dataclass(frozen=True)
class Device:
    """A device a stage runs on (leased through catalogen/run/devices.py)."""

    name: str  # what torch calls it in this process: "cpu", "cuda:0", …
    physical_id: str  # stable across processes, whatever CUDA_VISIBLE_DEVICES says
    model: str = ""  # what the hardware is called ("NVIDIA H100 80GB HBM3"), a key of `costs:`; "" for the CPU

    @property
    def kind(self) -> str:
        """`cpu` or `cuda`: the other key of `costs:`."""
        return self.name.split(":", 1)[0]

    def __str__(self) -> str:
        return self.name



def output_schema(own: Sequence[pa.Field], images: bool) -> pa.Schema:
    """Shared columns, then the stage's own, then (for image stages) the image columns."""
    head, tail = SHARED_COLUMNS[:3], SHARED_COLUMNS[3:]
    return pa.schema([*head, *own, *tail, *(IMAGE_COLUMNS if images else [])])


def _ignore(done: int) -> None:
    return None


@dataclass
class StageContext:
    config: RunConfig
    store: RunStore
    models: dict[str, ModelIdentity]  # by role, as the stage's `models(cfg)` named them
    device: Device
    dtype: "torch.dtype"
    progress: Callable[[int], None] = _ignore  # rows finished so far in this table
    recipes: Any = None  # catalogen.run.recipe.Recipes of these rows, inside a run (None when called directly)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def recipe_entry(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """`{"recipe": …}` for an image's provenance: what `catalogen reproduce` makes it again from
        (catalogen/run/recipe.py); empty outside a run."""
        return self.recipes.entry(row) if self.recipes is not None else {}


class Stage(Protocol):
    """The shape of a stage module (see tasks/generate.py)."""

    NAME: str
    VERSION: int  # part of every key: bump it when the same inputs would give a different output
    Settings: type[BaseModel]  # the configuration section named NAME
    READS: tuple[str, ...]  # roles it takes from an earlier stage, else from the catalog
    PROVIDES: tuple[str, ...]  # roles later stages can take from it
    FROM_UPSTREAM: Mapping[str, tuple[str, str]]  # planned column -> (role, provider's output column)
    SHARD_ORDER: tuple[str, ...]  # planned columns whose equal values should share a shard
    PLAN_SCHEMA: pa.Schema
    OUTPUT_SCHEMA: pa.Schema
    MAKES_IMAGES: bool

    def models(self, cfg: RunConfig) -> dict[str, ModelSpec]: ...

    def rules(self, cfg: RunConfig) -> dict[str, Rule]: ...

    def config_faults(self, cfg: RunConfig) -> list[str]: ...

    def plan(self, rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table: ...

    def process(self, planned: pa.Table, ctx: StageContext) -> pa.Table: ...


