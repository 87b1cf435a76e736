"""Catalogs: reading, validation before any model loads, and expansion into output rows.

A bad catalog is refused whole, with every fault listed by column and row id, so a user fixes
it in one pass instead of discovering problems hours into a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from catalogen.config import SCHEDULERS, GenerateConfig, RunConfig, field_bounds
from catalogen.hashing import MAX_SEED, derive_seed

# Columns the results add at the top level; a catalog may not bring its own.
RESERVED_COLUMNS = ("variant", "status", "error", "image_path", "image_sha256", "image_width", "image_height")
STAGE_PREFIXES = ("generate_",)

SHOWN_ROWS = 5  # row ids listed per fault before "and N more"


@dataclass(frozen=True)
class Fault:
    message: str
    column: str | None = None
    rows: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        where = f"column '{self.column}': " if self.column else ""
        text = f"{where}{self.message}"
        if self.rows:
            shown = ", ".join(self.rows[:SHOWN_ROWS])
            more = len(self.rows) - SHOWN_ROWS
            text += f" (rows: {shown}{f' and {more} more' if more > 0 else ''})"
        return text


class CatalogError(ValueError):
    """The catalog cannot be used; `faults` lists every problem found."""

    def __init__(self, source: str, faults: list[Fault]):
        self.source = source
        self.faults = faults
        lines = "\n".join(f"  - {f}" for f in faults)
        super().__init__(f"{source}: {len(faults)} problem(s) in the catalog:\n{lines}")


def read_catalog(path: str | Path) -> pa.Table:
    """Read Parquet (or CSV / JSON Lines, by extension) into an Arrow table."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            opts = pa_csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return pa_csv.read_csv(path, parse_options=opts)
        if suffix in (".jsonl", ".ndjson"):
            return pa_json.read_json(path)
        return pq.read_table(path)
    except FileNotFoundError:
        raise CatalogError(str(path), [Fault("file not found")]) from None
    except (pa.ArrowInvalid, OSError) as exc:
        kind = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".ndjson": "JSON Lines"}.get(suffix, "Parquet")
        raise CatalogError(str(path), [Fault(f"cannot read as {kind}: {exc}")]) from None


# --- validation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    kind: str  # "int", "float" or "str"
    check: Callable[[Any], str | None] | None = None  # returns a fault message for a bad value


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


def _scheduler(v: Any) -> str | None:
    return None if v in SCHEDULERS else f"unknown scheduler (choose from {', '.join(SCHEDULERS)})"


def _rules(cfg: RunConfig) -> dict[str, _Rule]:
    model = cfg.model_for("generate")

    def size(v: int) -> str | None:
        if v % 8:
            return "must be a multiple of 8"
        if not model.min_size <= v <= model.max_size:
            return f"must be between {model.min_size} and {model.max_size} for {model.repo}"
        return None

    return {
        "prompt": _Rule("str"),
        "negative_prompt": _Rule("str"),
        "seed": _Rule("int", _range(*field_bounds(RunConfig, "seed"))),
        "width": _Rule("int", size),
        "height": _Rule("int", size),
        "steps": _Rule("int", _range(*field_bounds(GenerateConfig, "steps"))),
        "guidance_scale": _Rule("float", _range(*field_bounds(GenerateConfig, "guidance_scale"))),
        "num_variants": _Rule("int", _range(*field_bounds(GenerateConfig, "num_variants"))),
        "scheduler": _Rule("str", _scheduler),
    }


def _type_fault(name: str, rule: _Rule, typ: pa.DataType) -> Fault | None:
    if pa.types.is_null(typ):
        return None
    ok = {
        "str": pa.types.is_string(typ) or pa.types.is_large_string(typ),
        "int": pa.types.is_integer(typ) or pa.types.is_floating(typ),
        "float": pa.types.is_integer(typ) or pa.types.is_floating(typ),
    }[rule.kind]
    wanted = {"str": "strings", "int": "integers", "float": "numbers"}[rule.kind]
    return None if ok else Fault(f"must hold {wanted}, found {typ}", name)


def _value_faults(name: str, rule: _Rule, values: list, ids: list[str]) -> list[Fault]:
    by_message: dict[str, list[str]] = {}
    for value, rid in zip(values, ids):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # null: use the run's default
        message = None
        if rule.kind == "int" and isinstance(value, float):
            if not value.is_integer():
                message = "must be whole numbers"
            elif abs(value) > 2**53:
                message = "is stored as floating point and too large to be exact; store it as int64"
            else:
                value = int(value)
        if message is None and rule.check is not None:
            message = rule.check(value)
        if message:
            by_message.setdefault(message, []).append(rid)
    return [Fault(msg, name, tuple(rows)) for msg, rows in by_message.items()]


def _row_labels(table: pa.Table) -> list[str]:
    """Row ids for fault messages; rows without a usable id are named by position."""
    if "id" not in table.column_names:
        return [f"#{i}" for i in range(table.num_rows)]
    return [
        str(v) if v is not None and str(v).strip() else f"#{i}"
        for i, v in enumerate(table.column("id").to_pylist())
    ]


def _id_faults(table: pa.Table, labels: list[str]) -> list[Fault]:
    if "id" not in table.column_names:
        return [Fault("required column is missing", "id")]
    typ = table.schema.field("id").type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)):
        return [Fault(f"must hold strings (or integers), found {typ}", "id")]
    faults = []
    values = table.column("id").to_pylist()
    blank = [labels[i] for i, v in enumerate(values) if v is None or not str(v).strip()]
    if blank:
        faults.append(Fault("is null or blank", "id", tuple(blank)))
    seen: dict[str, int] = {}
    for v in values:
        if v is not None and str(v).strip():
            seen[str(v)] = seen.get(str(v), 0) + 1
    dups = [k for k, n in seen.items() if n > 1]
    if dups:
        faults.append(Fault("values must be unique; repeated", "id", tuple(dups)))
    return faults


def validate_catalog(table: pa.Table, cfg: RunConfig, source: str = "catalog") -> pa.Table:
    """Check the catalog against the run's configuration; return it with `id` as strings.

    Raises CatalogError with every fault found. Columns the pipeline does not know are kept as
    they are and pass through to the results.
    """
    faults: list[Fault] = []
    if table.num_rows == 0:
        raise CatalogError(source, [Fault("the catalog has no rows")])
    labels = _row_labels(table)
    faults += _id_faults(table, labels)
    for name in table.column_names:
        if name in RESERVED_COLUMNS or name.startswith(STAGE_PREFIXES):
            faults.append(Fault("is a name the results use; rename it", name))
    if "prompt" not in table.column_names:
        faults.append(Fault("required column is missing (each row needs a prompt)", "prompt"))
    else:
        prompts = table.column("prompt").to_pylist()
        missing = [labels[i] for i, p in enumerate(prompts) if p is None or not str(p).strip()]
        if missing:
            faults.append(Fault("is null or blank", "prompt", tuple(missing)))
    for name, rule in _rules(cfg).items():
        if name not in table.column_names:
            continue
        type_fault = _type_fault(name, rule, table.schema.field(name).type)
        if type_fault:
            faults.append(type_fault)
        else:
            faults += _value_faults(name, rule, table.column(name).to_pylist(), labels)
    if faults:
        raise CatalogError(source, faults)
    ids = pc.cast(table.column("id"), pa.string())
    return table.set_column(table.schema.get_field_index("id"), "id", ids)


def load_catalog(path: str | Path, cfg: RunConfig) -> pa.Table:
    return validate_catalog(read_catalog(path), cfg, source=str(path))


# --- expansion into output rows -------------------------------------------------------------------


def _column_or_nulls(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def expand_rows(catalog: pa.Table, cfg: RunConfig) -> pa.Table:
    """One row per (id, variant) with its seed; the unit every stage works on.

    A row's own `seed` gives variant v the seed `seed + v` (as A1111 numbers a batch); otherwise
    the seed derives from (run seed, id, variant) alone, so it never depends on a row's position.
    """
    ids = catalog.column("id").to_pylist()
    counts = [
        int(n) if n is not None else cfg.generate.num_variants
        for n in _column_or_nulls(catalog, "num_variants")
    ]
    row_seeds = _column_or_nulls(catalog, "seed")
    index, variants, seeds = [], [], []
    for i, (rid, n, own) in enumerate(zip(ids, counts, row_seeds)):
        for v in range(n):
            index.append(i)
            variants.append(v)
            seeds.append((int(own) + v) % (MAX_SEED + 1) if own is not None else derive_seed(cfg.seed, rid, v))
    rows = catalog.take(pa.array(index, pa.int64()))
    rows = rows.append_column("variant", pa.array(variants, pa.int32()))
    return rows.append_column("row_seed", pa.array(seeds, pa.int64()))


def shard(rows: pa.Table, rows_per_shard: int) -> Iterable[pa.Table]:
    for start in range(0, rows.num_rows, rows_per_shard):
        yield rows.slice(start, rows_per_shard)
