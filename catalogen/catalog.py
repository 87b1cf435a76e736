"""Catalogs: reading, validation before any model loads, and expansion into output rows.

A bad catalog is refused whole, with every fault listed by column and row id, so a user fixes
it in one pass instead of discovering problems hours into a run. The checks are vectorised
(Arrow and NumPy), so a million-row catalog validates in about a second.

Text formats are read as text: a CSV or JSON Lines cell `0012` stays `0012` (ids, SKUs and EANs
keep their leading zeros), and a blank cell means "not given", i.e. the run's setting.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from catalogen import stopping
from catalogen.storage.hashing import MAX_SEED, derive_seeds, stable_hash
from catalogen.storage.locations import Location, LocationError, is_remote, location

SHOWN_ROWS = 5  # row ids listed per fault before "and N more"
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
_TEXT_FORMATS = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".ndjson": "JSON Lines"}
# Reading a catalog by URL has a total deadline: a server that accepts and never answers (or trickles)
# must not hold `validate` or `run` silently for good. Seconds, from this variable (default 300).
URL_TIMEOUT_ENV = "CATALOGEN_CATALOG_TIMEOUT_S"
URL_TIMEOUT_S = 300.0


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
        if len(faults) == 1 and not faults[0].column and not faults[0].rows:  # the file itself: one line
            super().__init__(f"{source}: {faults[0]}")
            return
        lines = "\n".join(f"  - {f}" for f in faults)
        super().__init__(f"{source}: {len(faults)} problem(s) in the catalog:\n{lines}")


# --- reading --------------------------------------------------------------------------------------


def catalog_format(path: str | Location) -> str:
    """"CSV", "TSV", "JSON Lines" or "Parquet", from the file name (a compression suffix is skipped)."""
    name = location(path).name.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return _TEXT_FORMATS.get(Path(name).suffix, "Parquet")


def _stream(source: Path | pa.Buffer, name: str) -> pa.NativeFile:
    """The file's bytes, decompressed as its name says: from a disk, or a URL's bytes read whole."""
    if isinstance(source, Path):
        return pa.input_stream(str(source), compression="detect")
    codec = next((codec for suffix, codec in _COMPRESSION.items() if name.lower().endswith(suffix)), None)
    return pa.input_stream(source, compression=codec)


def _read_delimited(source: Path | pa.Buffer, name: str, delimiter: str) -> pa.Table:
    """Every column as text (no type guessing), blank cells as null."""
    parse = pa_csv.ParseOptions(delimiter=delimiter)
    with _stream(source, name) as stream:
        names = pa_csv.open_csv(stream, parse_options=parse).schema.names
    convert = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in names},
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )
    with _stream(source, name) as stream:
        return pa_csv.read_csv(stream, parse_options=parse, convert_options=convert)


def url_timeout() -> float:
    """The deadline of reading a catalog by URL, in seconds (URL_TIMEOUT_ENV, else URL_TIMEOUT_S)."""
    text = os.environ.get(URL_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else URL_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise CatalogError(f"{URL_TIMEOUT_ENV}={text}", [Fault("is not a positive number of seconds")])
    return seconds


def _fetch(url: Location) -> pa.Buffer:
    """A catalog's bytes by URL, read whole in one GET (`open()` would ask for the size first) within
    `url_timeout()` seconds in all. Only the download runs in the deadline's thread: a thread still
    inside Arrow when the process ends would abort it."""
    seconds = url_timeout()
    deadline = time.monotonic() + seconds
    try:
        return stopping.bounded(lambda _cancelled: pa.py_buffer(url.fs.cat_file(url.path)), seconds, str(url))
    except TimeoutError:
        if time.monotonic() < deadline:
            raise  # the backend's own timeout: an OSError like any other failed read
        raise CatalogError(str(url), [Fault(f"no complete answer within {seconds:g} s (give a slow server longer "
                                            f"with {URL_TIMEOUT_ENV}=SECONDS)")]) from None


def _read(source: Path | pa.Buffer, name: str, kind: str) -> pa.Table:
    if kind in ("CSV", "TSV"):
        return _read_delimited(source, name, "\t" if kind == "TSV" else ",")
    if kind == "JSON Lines":
        with _stream(source, name) as stream:
            return pa_json.read_json(stream)
    return pq.read_table(str(source) if isinstance(source, Path) else pa.BufferReader(source))


def read_catalog(path: str | Location) -> pa.Table:
    """Read Parquet, or CSV / TSV / JSON Lines (optionally .gz, .bz2, .zst) by file name, from a path or a URL
    (within `url_timeout()` in all, however slowly its server answers)."""
    try:
        path = location(path)
    except LocationError as exc:
        raise CatalogError("catalog", [Fault(str(exc))]) from None
    kind = catalog_format(path)
    try:
        return _read(_fetch(path) if is_remote(path) else path, path.name, kind)
    except FileNotFoundError:
        raise CatalogError(str(path), [Fault("file not found")]) from None
    except IsADirectoryError:
        raise CatalogError(str(path), [Fault("is a folder, not a catalog file")]) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogError(str(path), [Fault(f"cannot read as {kind}: {exc}")]) from None


# --- validation rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What an optional per-row column must hold; a null means "use the run's setting".

    Numeric rules are checked over whole columns at once. `canonical` maps a text value to its
    canonical spelling (or None if it is not allowed), and is applied to distinct values only.
    """

    kind: Literal["int", "float", "str"]
    lo: float = -math.inf
    hi: float = math.inf
    multiple_of: int | None = None
    limits_note: str = ""  # appended to a range fault, e.g. "for tiny:sd15"
    canonical: Callable[[str], str | None] | None = None
    choices: Sequence[str] = ()
    what: str = "value"


_WANTED = {"str": "strings", "int": "integers", "float": "numbers"}
_ARROW_TYPE = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _rows(labels: "RowLabels", mask: np.ndarray) -> tuple[str, ...]:
    return labels.pick(mask)


def _parse_numbers(column: pa.ChunkedArray, name: str, rule: Rule, labels: RowLabels) -> tuple[pa.Array, list[Fault]]:
    """Text cells (CSV, JSON) that hold numbers -> float64; cells that do not are faults.

    "NaN", like a blank cell, means "not given" (it is how some tools write a missing number).
    """
    text = pc.utf8_trim_whitespace(column)
    parsed: dict[str, float | None] = {}
    unparsable: list[str] = []
    for value in pc.unique(text).to_pylist():
        try:
            number = float(value) if value else None
        except ValueError:
            unparsable.append(value)
            number = None
        parsed[value] = None if number is None or math.isnan(number) else number
    keys = pa.array(list(parsed), pa.string())
    numbers = pa.array(list(parsed.values()), pa.float64()).take(pc.index_in(text, keys))
    if not unparsable:
        return numbers, []
    bad = pc.fill_null(pc.is_in(text, pa.array(unparsable, pa.string())), False).to_numpy(zero_copy_only=False)
    examples = ", ".join(repr(v) for v in unparsable[:3])
    return numbers, [Fault(f"must hold {_WANTED[rule.kind]}; some cells are not numbers (e.g. {examples})", name,
                           _rows(labels, bad))]


def _check_numbers(values: pa.Array, name: str, rule: Rule, labels: RowLabels) -> tuple[pa.Array, list[Fault]]:
    """Range, whole-number and multiple-of checks; returns the column as int64 / float64."""
    # Unsafe: an int64 past 2**53 (a seed) rounds to the nearest float, which is all a range check needs.
    as_float = pc.cast(values, pa.float64(), safe=False)
    as_float = pc.if_else(pc.is_nan(as_float), pa.scalar(None, pa.float64()), as_float)  # NaN = not given
    x = pc.fill_null(as_float, 0.0).to_numpy(zero_copy_only=False)
    given = pc.is_valid(as_float).to_numpy(zero_copy_only=False)
    faults: list[Fault] = []
    if rule.kind == "int" and pa.types.is_floating(values.type):
        fractional = given & (np.floor(x) != x)
        if fractional.any():
            faults.append(Fault("must be whole numbers", name, _rows(labels, fractional)))
        inexact = given & ~fractional & (np.abs(x) > 2**53)
        if inexact.any():
            message = "is stored as floating point and too large to be exact; store it as int64"
            faults.append(Fault(message, name, _rows(labels, inexact)))
        given = given & ~fractional & ~inexact
    out_of_range = given & ((x < rule.lo) | (x > rule.hi))
    if out_of_range.any():
        lo, hi = (int(v) if rule.kind == "int" and math.isfinite(v) else v for v in (rule.lo, rule.hi))
        note = f" {rule.limits_note}" if rule.limits_note else ""
        faults.append(Fault(f"must be between {lo} and {hi}{note}", name, _rows(labels, out_of_range)))
    if rule.multiple_of:
        not_multiple = given & ~out_of_range & (np.mod(x, rule.multiple_of) != 0)
        if not_multiple.any():
            faults.append(Fault(f"must be a multiple of {rule.multiple_of}", name, _rows(labels, not_multiple)))
    if rule.kind == "float":
        return as_float, faults
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64()), faults
    return pc.cast(pc.if_else(pa.array(given), as_float, pa.scalar(None, pa.float64())), pa.int64()), faults


def not_given(text: pa.Array) -> pa.BooleanArray:
    """Which text cells hold no value: null, blank, or `NaN` / `nan` (what `astype(str)` and some
    exports make of a missing value)."""
    trimmed = pc.utf8_lower(pc.utf8_trim_whitespace(text))
    return pc.fill_null(pc.or_(pc.equal(trimmed, ""), pc.equal(trimmed, "nan")), True)


def _check_text(values: pa.Array, name: str, rule: Rule, labels: RowLabels) -> tuple[pa.Array, list[Fault]]:
    """Missing text (`not_given`) becomes null; a `canonical` rule rewrites each value to its canonical spelling."""
    values = pc.if_else(not_given(values), pa.scalar(None, pa.string()), values)
    if rule.canonical is None:
        return values, []
    distinct = [v for v in pc.unique(values).to_pylist() if v is not None]
    mapping = {v: rule.canonical(v) for v in distinct}
    unknown = [v for v, c in mapping.items() if c is None]
    faults = []
    if unknown:
        bad = pc.fill_null(pc.is_in(values, pa.array(unknown, pa.string())), False).to_numpy(zero_copy_only=False)
        faults.append(Fault(f"unknown {rule.what} (choose from {', '.join(rule.choices)})", name, _rows(labels, bad)))
    keys = pa.array(list(mapping), pa.string())
    canonical = pa.array([mapping[k] for k in mapping], pa.string())
    return canonical.take(pc.index_in(values, keys)), faults


def check_column(values: pa.ChunkedArray, name: str, rule: Rule, labels: RowLabels) -> tuple[pa.Array, list[Fault]]:
    """One optional column against its rule; returns it normalised (typed, blanks and NaN as null)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    typ = values.type
    if pa.types.is_null(typ):
        return pa.nulls(len(values), _ARROW_TYPE[rule.kind]), []
    if rule.kind == "str":
        if not _is_text(typ):
            return values, [Fault(f"must hold strings, found {typ}", name)]
        return _check_text(pc.cast(values, pa.string()), name, rule, labels)
    faults: list[Fault] = []
    if _is_text(typ):
        values, faults = _parse_numbers(values, name, rule, labels)
    elif not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        return values, [Fault(f"must hold {_WANTED[rule.kind]}, found {typ}", name)]
    checked, more = _check_numbers(values, name, rule, labels)
    return checked, faults + more


# --- the catalog as a whole -----------------------------------------------------------------------


class RowLabels:
    """How fault messages name rows: by id, or by position where a row has no usable id.

    Labels are made only for the rows a fault lists, never for the whole catalog.
    """

    def __init__(self, table: pa.Table):
        self.ids: pa.Array | None = None
        if "id" in table.column_names:
            ids = table.column("id").combine_chunks()
            if _is_text(ids.type) or pa.types.is_integer(ids.type):
                self.ids = pc.cast(ids, pa.string())

    def pick(self, mask: np.ndarray) -> tuple[str, ...]:
        positions = np.flatnonzero(mask)
        if self.ids is None:
            return tuple(f"#{i}" for i in positions)
        values = self.ids.take(pa.array(positions)).to_pylist()
        return tuple(v if v is not None and v.strip() else f"#{i}" for v, i in zip(values, positions))


def _id_faults(table: pa.Table, labels: RowLabels) -> list[Fault]:
    if "id" not in table.column_names:
        return [Fault("required column is missing", "id")]
    ids = table.column("id").combine_chunks()
    if not (_is_text(ids.type) or pa.types.is_integer(ids.type)):
        return [Fault(f"must hold strings (or integers), found {ids.type}", "id")]
    text = pc.cast(ids, pa.string())
    faults = []
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True).to_numpy(zero_copy_only=False)
    if blank.any():
        faults.append(Fault("is null or blank", "id", _rows(labels, blank)))
    counts = pc.value_counts(text.filter(pa.array(~blank)))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        faults.append(Fault("values must be unique; repeated", "id", tuple(repeated.to_pylist())))
    return faults


def validate_catalog(
    table: pa.Table,
    rules: Mapping[str, Rule],
    required: Mapping[str, str] | None = None,
    reserved: Iterable[str] = (),
    source: str = "catalog",
    exempt: Mapping[str, np.ndarray] | None = None,
) -> pa.Table:
    """Check the catalog; return it with every ruled column normalised.

    `rules` are the optional per-row columns the run understands, `required` the text columns
    each row must fill (with a hint for when the column is missing), `reserved` the names the
    results use; `exempt` marks, per required column, the rows that need not fill it. Raises
    CatalogError with every fault.
    Other columns are kept as they are and pass through to the results, `id` in its own type.
    """
    if table.num_rows == 0:
        raise CatalogError(source, [Fault("the catalog has no rows")])
    labels = RowLabels(table)
    faults = _id_faults(table, labels)
    reserved = set(reserved)
    for name in table.column_names:
        if name in reserved:
            faults.append(Fault("is a name the results use; rename it", name))
    required = dict(required or {})
    for name, hint in required.items():
        excused = (exempt or {}).get(name, np.zeros(table.num_rows, dtype=bool))
        if name not in table.column_names:
            if not excused.all():
                faults.append(Fault(f"required column is missing{f' ({hint})' if hint else ''}", name))
            continue
        column = table.column(name).combine_chunks()
        if not _is_text(column.type):
            faults.append(Fault(f"must hold strings, found {column.type}", name))
            continue
        blank = not_given(column).to_numpy(zero_copy_only=False) & ~excused
        if blank.any():
            faults.append(Fault("is null, blank or NaN", name, _rows(labels, blank)))
    for name, rule in rules.items():
        if name in table.column_names and name not in required:
            values, found = check_column(table.column(name), name, rule, labels)
            faults += found
            if not found:
                table = table.set_column(table.schema.get_field_index(name), name, values)
    if faults:
        raise CatalogError(source, faults)
    return table


def string_ids(catalog: pa.Table) -> pa.Array:
    """The ids as text: what keys, seeds and file names are made from."""
    return pc.cast(catalog.column("id").combine_chunks(), pa.string())


def select_rows(catalog: pa.Table, limit: int | None = None, sample: int | None = None, seed: int = 0) -> pa.Table:
    """A trial subset: the first `limit` rows, or `sample` rows picked by a seeded hash of their id.

    A sample depends only on (seed, ids), so the same command always picks the same rows, and a
    larger sample contains a smaller one.
    """
    if sample is not None and sample < catalog.num_rows:
        ids = string_ids(catalog).to_pylist()
        ranks = np.array([stable_hash("sample", seed, rid) for rid in ids])
        keep = np.sort(np.argsort(ranks, kind="stable")[:sample])
        catalog = catalog.take(pa.array(keep))
    if limit is not None:
        catalog = catalog.slice(0, limit)
    return catalog


def column_or_nulls(table: pa.Table, name: str, typ: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return pc.cast(table.column(name).combine_chunks(), typ)
    return pa.nulls(table.num_rows, typ)


def expand_rows(catalog: pa.Table, default_variants: int, run_seed: int, extra: np.ndarray | None = None) -> pa.Table:
    """One row per (id, variant): `id` (text), `variant`, `seed` and `index` (the catalog row).

    A row's own `seed` gives variant v the seed `seed + v` (as A1111 numbers a batch); otherwise
    the seed derives from (run seed, id, variant) alone, so it never depends on a row's position.
    These names live in their own table, so they can never clash with a catalog column. `extra`:
    per catalog row, variants added after its own (a reviewer's regenerations), numbered on.
    """
    n = catalog.num_rows
    counts = pc.fill_null(column_or_nulls(catalog, "num_variants", pa.int64()), default_variants).to_numpy()
    if extra is not None:
        counts = counts + extra
    index = np.repeat(np.arange(n, dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    variant = pa.array((np.arange(len(index), dtype=np.int64) - starts).astype(np.int32))
    ids = expand(string_ids(catalog), index)
    own = expand(column_or_nulls(catalog, "seed", pa.int64()), index)
    has_own = pc.is_valid(own).to_numpy(zero_copy_only=False)
    seeds = np.zeros(len(index), dtype=np.int64)
    if has_own.any():
        base = pc.fill_null(own, 0).to_numpy().astype(np.uint64) + variant.to_numpy().astype(np.uint64)
        seeds[has_own] = (base % np.uint64(MAX_SEED + 1)).astype(np.int64)[has_own]
    if not has_own.all():
        missing = pa.array(np.flatnonzero(~has_own))
        seeds[~has_own] = derive_seeds(run_seed, ids.take(missing), variant.take(missing))
    return pa.table({"id": ids, "variant": variant, "seed": pa.array(seeds), "index": pa.array(index)})


def expand(values: pa.Array, index: np.ndarray) -> pa.Array:
    """A catalog column repeated for each row's variants (no copy when every row has one)."""
    if len(index) == len(values) and (len(index) == 0 or index[-1] == len(index) - 1):
        return values  # index is 0..n-1: one variant per row
    return values.take(pa.array(index))


def shard(rows: pa.Table, rows_per_shard: int) -> Iterable[pa.Table]:
    for start in range(0, rows.num_rows, rows_per_shard):
        yield rows.slice(start, rows_per_shard)
