"""Training-set export: a run folder's ok rows as shards that training code loads without glue.

A run folder (`results.parquet` + images, see catalogen/storage/store.py) goes in; one of these comes out:

```
hf           data/<split>-00000-of-00002.parquet   `image` (decoded by `datasets`), `text`, `key`, provenance
webdataset   <split>/00000.tar                     <key>.png, <key>.txt, <key>.json per sample
             <split>/00000.parquet                 the shard's metadata: key, text, provenance
imagefolder  <split>/00000/<key>.png + <key>.txt   images with caption sidecars (LoRA trainers)
             <split>/00000/metadata.jsonl          file_name, text, key and complete provenance columns
             <split>/00000.parquet                 the shard's metadata: key, text, every provenance column
manifest.json                                      written last: rows per split, sha256 and rows per file
```

Which rows: summary `status` ok, every `--where` filter true, an image at the chosen stage and a
non-blank text that its stage did not mark `degenerate` (a caption flagged as useless is no training
label; `include_degenerate` keeps it) and, with `dedupe`, not a near-duplicate of an earlier exported
row (pHash of the final image within the run's `duplicates.max_distance`; see `first_of_each`). The image is the final one, a stage's own (`generate`), or
another image a stage wrote (`remove_bg.canvas`, the marketplace main image; see
`results.recorded_images`). Which split: a stable hash of the id (`split_fraction`), so a row keeps its split
across exports and when rows are added, and every variant of an id shares it. The sample key
(`sample_key`) is unique per (id, variant) and holds no dot (WebDataset splits names on the first).

Provenance is every results column except those that make no sense outside the run folder: file
paths (`image`, `*_path`, `*source_image`) and binary columns (catalog image bytes). A results column
named like an export column (`key`, `text`, `image`, `file_name`) is renamed `results_<name>`.

Each shard's files (an imagefolder shard: its whole folder) are written under a temporary name in
`<out>/.tmp/` and renamed into place, so what exists is complete. `export.pending.json` (written
first) lists what the export will own, and `manifest.json` (written last) marks it done.
Re-running the same export on an interrupted folder resumes it (finished shards are kept); any
other non-empty folder is refused unless `overwrite`, which removes only what an earlier export
listed as its own. While it writes, an export holds `<out>/.export.lock`, so a second export
into the folder at the same time is refused; a finished export removes it.

The writers share one interface, as img2dataset's do (see shards.py): `Writer(layout, shard)`,
`write(sample)`, `close()`, and the static `files(shard)` and `folder(shard)`; one module per format
(hf.py, webdataset.py, imagefolder.py). `WRITERS` names them; `dummy` writes nothing (benchmarks
only: the command line offers `FORMATS`).

The export folder is checked before anything is created in it: never the filesystem root, the run
folder or a folder inside it, a file, a path under a file, or a bucket URL (`export_folder`).

    >>> manifest = export_run("outputs/demo", "exports/demo-hf", ExportOptions(format="hf", split="train=0.9,val=0.1"))
    >>> datasets.load_dataset("parquet", data_files={"train": "exports/demo-hf/data/train-*.parquet"})
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

import catalogen
from catalogen.media.duplicates import first_of_each, recorded_max_distance
from catalogen.storage.hashing import sha256_bytes, sha256_file, stable_hash
from catalogen.storage.locations import Location, LocationError, absolute, is_remote, location, read_table
from catalogen.run.results import image_prefix, recorded_images
from catalogen.review.rules import RuleError, parse_rule, rule_mask
from catalogen.publish.export.hf import HFParquetWriter, hf_features
from catalogen.publish.export.imagefolder import ImageFolderWriter
from catalogen.publish.export.shards import TMP, DummyWriter, ExportError, Layout, Sample, Shard
from catalogen.publish.export.webdataset import WebDatasetWriter
from catalogen.storage.store import (
    RunFolderBusy,
    RunStore,
    hold_folder,
    id_hash,
    lock_holder,
    safe_name,
    write_atomic,
)

EXPORT_VERSION = 2  # part of the fingerprint: bump when the same options would write other files
MANIFEST = "manifest.json"
PENDING = "export.pending.json"
LOCK = ".export.lock"  # held while an export writes; a second export into the folder is refused
DEFAULT_TEXT_COLUMNS = ("caption_caption", "enhance_prompt", "generate_prompt", "prompt")
RESERVED = ("key", "text", "image", "file_name")  # export columns a results column must not shadow
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class ExportOptions:
    """What to export (every field is a `catalogen export` option of the same name)."""

    format: str = "hf"  # a key of WRITERS
    image_stage: str | None = None  # None: the final image (summary `image_path`); `remove_bg.canvas`: that image
    text: str | None = None  # None: the first of DEFAULT_TEXT_COLUMNS in the results
    include_degenerate: bool = False  # keep rows whose text its stage marked degenerate
    dedupe: bool = False  # leave out near-duplicates of an earlier exported row (catalogen/media/duplicates.py)
    where: tuple[str, ...] = ()  # "COLUMN>=VALUE" filters, all must hold
    review: str | None = None  # "approved" or "selected": only those rows, as decided now (catalogen/review/state.py)
    split: str = "train=1"  # "train=0.9,val=0.1"
    shard_size: int = 1000  # rows per shard
    overwrite: bool = False


@dataclass
class Selection:
    """The rows to export, in results order, and why the others were left out."""

    table: pa.Table  # key, text, provenance columns (as in Layout.schema)
    images: list[str]  # image path relative to the run folder, per row
    sha256: list[str | None]  # recorded sha256 of that image, per row
    splits: list[str]  # split name per row
    text_column: str  # the results column that became `text`
    image_column: str  # the results column of the image paths
    excluded: dict[str, int] = field(default_factory=dict)


# --- options ---------------------------------------------------------------------------------


def parse_split(spec: str) -> dict[str, float]:
    """`train=0.9,val=0.1` -> {"train": 0.9, "val": 0.1}: named fractions that add up to 1."""
    fractions: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not SPLIT_NAME.match(name):
            raise ExportError(f"--split {spec!r}: {part.strip()!r} is not NAME=FRACTION "
                              "(names: letters, digits and _), e.g. train=0.9,val=0.1")
        if name in fractions:
            raise ExportError(f"--split {spec!r}: split {name!r} is named twice")
        try:
            fraction = float(value)
        except ValueError:
            raise ExportError(f"--split {spec!r}: {value.strip()!r} (split {name}) is not a number") from None
        if not 0 < fraction <= 1:
            raise ExportError(f"--split {spec!r}: split {name} has fraction {fraction}; each must be in (0, 1]")
        fractions[name] = fraction
    total = sum(fractions.values())
    if abs(total - 1) > 1e-6:
        raise ExportError(f"--split {spec!r}: the fractions add up to {total:g}, not 1")
    return fractions


def split_fraction(row_id: str) -> float:
    """A number in [0, 1) fixed by the id's text alone: the first 8 bytes of its SHA-256."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") / 2**64


def assign_splits(ids: list[str], fractions: dict[str, float]) -> list[str]:
    """Each id's split: the split whose share of [0, 1) holds `split_fraction(id)`."""
    names = list(fractions)
    bounds = []
    running = 0.0
    for name in names[:-1]:
        running += fractions[name]
        bounds.append(running)
    return [names[bisect.bisect_right(bounds, split_fraction(row_id))] for row_id in ids]


def sample_key(row_id: str, variant: int) -> str:
    """A file-name-safe key unique per (id, variant), with no dot: `<readable id>-<id hash>-v<variant>`."""
    return f"{safe_name(row_id)}-{id_hash(row_id)}-v{variant}"


def parse_where(clause: str) -> tuple[str, str, str]:
    """`caption_clip_score>=25` -> ("caption_clip_score", ">=", "25"); the syntax alone, no column check
    (catalogen/review/rules.py: the same rules as `select.require` and `review:`)."""
    try:
        return parse_rule(clause)
    except RuleError as exc:
        raise ExportError(str(exc)) from None


def where_mask(table: pa.Table, clause: str, source: str = "results.parquet") -> pa.Array:
    """The rows for which one `COLUMN<op>VALUE` filter holds (a null never does; `== null` asks for one)."""
    try:
        return rule_mask(table, clause, "--where", source)
    except RuleError as exc:
        raise ExportError(str(exc)) from None


# --- rows and columns ------------------------------------------------------------------------


def load_results(run_dir: Location) -> pa.Table:
    path = run_dir / "results.parquet"
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise ExportError(f"{run_dir} has no results.parquet: is it a catalogen run folder (what `catalogen run` "
                          "wrote), and has a run finished there?")
    try:
        return read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ExportError(f"{path} cannot be read ({exc})") from None


def image_columns(table: pa.Table, image: str | None, run_dir: Path) -> tuple[str, str]:
    """The (path, sha256) columns of the chosen image: the summary's, a stage's own (`generate`), or
    another image a stage wrote (`remove_bg.canvas`); `rendition:NAME` is `renditions.NAME` (tasks/renditions.py)."""
    if image is None:
        return "image_path", "image_sha256"
    if image.startswith("rendition:"):
        image = "renditions." + image.removeprefix("rendition:")
    recorded = recorded_images(table)
    if image not in recorded:
        raise ExportError(f"--image-stage {image}: no stage {image!r} made images in {run_dir} "
                          f"(stages with images: {', '.join(recorded) or 'none'})")
    prefix = image_prefix(image)
    return f"{prefix}_path", f"{prefix}_sha256"


def text_status_column(table: pa.Table, text_col: str) -> str | None:
    """The status column of the stage that wrote a text column (`caption_caption` -> `caption_status`)."""
    stages = [c.removesuffix("_status") for c in table.column_names if c.endswith("_status") and c != "status"]
    owners = [s for s in stages if text_col.startswith(f"{s}_")]
    return f"{max(owners, key=len)}_status" if owners else None


def text_column(table: pa.Table, chosen: str | None, run_dir: Path) -> str:
    """The column that becomes `text`: the one asked for, else the first default present."""
    if chosen is None:
        found = [c for c in DEFAULT_TEXT_COLUMNS if c in table.column_names]
        if not found:
            raise ExportError(f"{run_dir}/results.parquet has none of {', '.join(DEFAULT_TEXT_COLUMNS)}; "
                              "choose the text column with --text")
        chosen = found[0]
    if chosen not in table.column_names:
        raise ExportError(f"--text {chosen}: {run_dir}/results.parquet has no such column; its columns: "
                          f"{', '.join(table.column_names)}")
    typ = table.schema.field(chosen).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ExportError(f"--text {chosen}: the column holds {typ}, not text")
    return chosen


def is_local_only(field_: pa.Field) -> bool:
    """A column that means nothing outside the run folder: a file path, or raw input bytes."""
    name = field_.name
    if pa.types.is_binary(field_.type) or pa.types.is_large_binary(field_.type):
        return True
    return name == "image" or name.endswith("_path") or name == "source_image" or name.endswith("_source_image")


def provenance(table: pa.Table) -> pa.Table:
    """The provenance columns, renamed where they would shadow an export column."""
    kept = [f.name for f in table.schema if not is_local_only(f)]
    names = [f"results_{name}" if name in RESERVED else name for name in kept]
    return table.select(kept).rename_columns(names)


def _is_plain(typ: pa.DataType) -> bool:
    return (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)
            or pa.types.is_floating(typ) or pa.types.is_boolean(typ) or pa.types.is_timestamp(typ))


def complete_columns(table: pa.Table) -> tuple[str, ...]:
    """Columns whose every value is a plain, non-null, finite value.

    JSON Lines carry no types: a reader infers them per file, so a column that one file holds only
    nulls (or empty lists) for reads as another type there, and `datasets` refuses metadata files
    whose types differ. metadata.jsonl therefore holds these columns only.
    """
    complete = []
    for name in table.column_names:
        values = table.column(name)
        if not _is_plain(values.type) or values.null_count:
            continue
        if pa.types.is_floating(values.type) and pc.any(pc.is_nan(values)).as_py():
            continue
        complete.append(name)
    return tuple(complete)


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


def dedupe_distance(results: pa.Table, run_dir: Path) -> int:
    """The distance the run judged near-duplicates by (see catalogen/media/duplicates.py), or why --dedupe cannot work."""
    recorded, max_distance = recorded_max_distance(results)
    if "phash" not in results.column_names or not recorded:
        raise ExportError(f"--dedupe: {run_dir}/results.parquet has no pHash column (made by a catalogen without "
                          "near-duplicate detection): run the same `catalogen run` again, which hashes the images "
                          "and recomputes nothing else")
    if max_distance is None:
        raise ExportError(f"--dedupe: near-duplicate detection was off in the run that wrote {run_dir}/results.parquet "
                          "(duplicates.max_distance null); run it again with --set duplicates.max_distance=6")
    return max_distance


REVIEW_CHOICES = ("approved", "selected")


def _reviewed(results: pa.Table, kept: pa.Array, wanted: str, excluded: dict[str, int]) -> pa.Array:
    """Narrow `kept` to the approved (or selected) rows; count the others by review state and reason."""
    if wanted not in REVIEW_CHOICES:
        raise ExportError(f"review {wanted!r} is not one of {', '.join(REVIEW_CHOICES)}")
    chosen = results.column("selected") if wanted == "selected" else pc.equal(results.column("review_state"), "approved")
    narrower = pc.and_(kept, pc.fill_null(chosen, False))
    left = results.filter(pc.and_(kept, pc.invert(narrower))).select(["review_state", "review_reason"])
    for row in left.group_by(["review_state", "review_reason"]).aggregate([([], "count_all")]).to_pylist():
        reason = f"{row['review_state']}: {row['review_reason']}" if row["review_reason"] else row["review_state"]
        excluded[f"not {wanted}: {reason}"] = row["count_all"]
    return narrower


def decided_results(results: pa.Table, run_dir: Location) -> tuple[pa.Table, str]:
    """The results with every review column as of now (reviewers' decisions applied), and a digest of
    the decisions (an export of approved rows is another export once a decision is added)."""
    from catalogen.review.decisions import DecisionError, latest, read
    from catalogen.review.state import apply_decisions, with_defaults

    try:
        decisions = read(RunStore(run_dir))
    except DecisionError as exc:
        raise ExportError(f"{run_dir}: {exc}") from None
    return apply_decisions(with_defaults(results), latest(decisions)), stable_hash(sorted(d.name for d in decisions))


def select_rows(results: pa.Table, options: ExportOptions, run_dir: Path) -> Selection:
    """Apply status, filters, image and text presence; attach key and split. Checks options first."""
    # 1. Check every option against the results before dropping any row.
    fractions = parse_split(options.split)
    path_col, sha_col = image_columns(results, options.image_stage, run_dir)
    text_col = text_column(results, options.text, run_dir)
    source = f"{run_dir}/results.parquet"
    masks = [where_mask(results, clause, source) for clause in options.where]
    distance = dedupe_distance(results, run_dir) if options.dedupe else None

    # 2. Keep ok rows, then those every filter keeps, then those with an image and a text.
    kept = pc.fill_null(pc.equal(results.column("status"), "ok"), False)
    excluded = {"not_ok": results.num_rows - _count(kept)}
    if options.review is not None:
        kept = _reviewed(results, kept, options.review, excluded)
    for clause, mask in zip(options.where, masks):
        narrower = pc.and_(kept, mask)
        excluded[f"where {clause}"] = _count(kept) - _count(narrower)
        kept = narrower
    table = results.filter(kept)
    has_image = pc.invert(pc.is_null(table.column(path_col)))
    excluded["no_image"] = table.num_rows - _count(has_image)
    table = table.filter(has_image)
    stripped = pc.utf8_trim_whitespace(table.column(text_col))
    has_text = pc.fill_null(pc.greater(pc.utf8_length(stripped), 0), False)
    excluded["no_text"] = table.num_rows - _count(has_text)
    table = table.filter(has_text)
    status_col = text_status_column(table, text_col)
    excluded["degenerate_text"] = 0
    if status_col is not None and not options.include_degenerate:
        usable = pc.fill_null(pc.not_equal(table.column(status_col), "degenerate"), True)
        excluded["degenerate_text"] = table.num_rows - _count(usable)
        table = table.filter(usable)
    if distance is not None:  # last: judged among the rows every other rule kept
        keep = first_of_each(table, distance)
        excluded["near_duplicate"] = table.num_rows - int(keep.sum())
        table = table.filter(pa.array(keep))

    # 3. Key, text and provenance; the split of each row from its id.
    ids = pc.cast(table.column("id"), pa.string()).to_pylist()
    keys = [sample_key(row_id, variant) for row_id, variant in zip(ids, table.column("variant").to_pylist())]
    head = pa.table({"key": pa.array(keys, pa.string()), "text": pc.cast(table.column(text_col), pa.string())})
    prov = provenance(table)
    for name in prov.column_names:
        head = head.append_column(prov.field(name), prov.column(name))
    recorded = table.column(sha_col).to_pylist() if sha_col in table.column_names else [None] * table.num_rows
    return Selection(table=head, images=table.column(path_col).to_pylist(), sha256=recorded,
                     splits=assign_splits(ids, fractions), text_column=text_col, image_column=path_col,
                     excluded=excluded)


def plan_shards(splits: list[str], order: list[str], shard_size: int) -> tuple[list[Shard], dict[str, list[int]]]:
    """Shards per split (in the order the splits were named), and each split's row indices."""
    members: dict[str, list[int]] = {name: [] for name in order}
    for index, name in enumerate(splits):
        members[name].append(index)
    shards = []
    for name in order:
        count = math.ceil(len(members[name]) / shard_size)
        for index in range(count):
            start = index * shard_size
            shards.append(Shard(name, index, count, start, min(shard_size, len(members[name]) - start)))
    return shards, members


# --- the writers (one module per format, see shards.py) ---------------------------------------


FORMATS = ("hf", "webdataset", "imagefolder")  # what users choose from; `dummy` is for benchmarks
WRITERS: dict[str, Any] = {
    "hf": HFParquetWriter,
    "webdataset": WebDatasetWriter,
    "imagefolder": ImageFolderWriter,
    "dummy": DummyWriter,
}


def writer_for(fmt: str) -> Any:
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return WRITERS[fmt]


# --- the output folder -----------------------------------------------------------------------


def owned_paths(writer: Any, shards: list[Shard]) -> dict[str, list[str]]:
    """The files and folders (relative to the output folder) an export with these shards writes."""
    files: list[str] = []
    folders: list[str] = []
    for shard in shards:
        files.extend(writer.files(shard))
        folder = writer.folder(shard)
        if folder:
            folders.append(folder)
    return {"files": files, "folders": folders}


def _read_record(path: Path) -> dict[str, Any] | None:
    """manifest.json or export.pending.json, or None when absent or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("owned"), dict) else None


def _all_files(out: Path) -> Iterator[str]:
    for folder, _, names in os.walk(out):
        for name in names:
            yield Path(folder, name).relative_to(out).as_posix()


def _is_owned(relative: str, files: set[str], folders: set[str]) -> bool:
    if relative in files:
        return True
    parents = {p.as_posix() for p in Path(relative).parents}
    return not parents.isdisjoint(folders)


def _remove_empty_folders(out: Path) -> None:
    for folder, _, _ in sorted(os.walk(out), key=_depth, reverse=True):
        if Path(folder) != out and not any(Path(folder).iterdir()):
            Path(folder).rmdir()


def _depth(entry: tuple[str, list[str], list[str]]) -> int:
    return len(Path(entry[0]).parts)


def _owned_by(records: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """The files and folders that earlier exports (their manifest or pending record) wrote."""
    files = {MANIFEST, PENDING}
    folders = {TMP}
    for record in records:
        files.update(record["owned"].get("files", []))
        folders.update(record["owned"].get("folders", []))
    return files, folders


def clear_previous(out: Path, records: list[dict[str, Any]]) -> None:
    """Remove what earlier exports listed as their own (`check_folder` refused anything else)."""
    files, folders = _owned_by(records)
    for folder in folders:
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in files:
        (out / name).unlink(missing_ok=True)
    _remove_empty_folders(out)


def export_folder(out: str | os.PathLike[str]) -> Path:
    """`--out` as a local folder: a path, or a URL of this machine's disk (`file:///x`). A bucket is
    refused before any work: an export renames each shard into place and locks its folder, which an
    object store cannot do."""
    try:
        where = location(out)
    except LocationError as exc:
        raise ExportError(f"--out {exc}") from None
    if is_remote(where):
        raise ExportError(f"--out {out}: an export is written to a local folder (each shard is renamed into "
                          f"place, which a bucket cannot do); export to a path, then copy that folder to {out}")
    return where


def check_out(out: Path, run_dir: Location) -> None:
    """Refuse a path that cannot be an export folder before anything is created there: the
    filesystem root, the run folder or a folder inside it (its files would mix with the run's), a
    file, or a path under a file."""
    target = out.resolve()
    if target == Path(target.anchor):
        raise ExportError(f"--out {out} is the filesystem root; name a folder for the export")
    run = None if is_remote(run_dir) else run_dir.resolve()  # a bucket's run folder cannot hold a local path
    if run is not None and (target == run or run in target.parents):
        raise ExportError(f"--out {out} is inside the run folder {run_dir}; choose a folder outside it")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is under {existing}, a file"
        raise ExportError(f"--out {out} {where}, not a folder")


def check_folder(out: Path, fingerprint: str, overwrite: bool) -> tuple[bool, list[dict[str, Any]]]:
    """Whether `out` can take this export, changing nothing: (True when it resumes an interrupted
    run of the same export, the records of earlier exports that `overwrite` replaces)."""
    if not out.exists() or not [p for p in out.iterdir() if p.name not in (TMP, LOCK)]:
        return False, []  # absent, empty, or only the debris of an export killed before it began
    manifest = _read_record(out / MANIFEST)
    pending = _read_record(out / PENDING)
    if manifest is None and pending is not None and pending.get("fingerprint") == fingerprint and not overwrite:
        return True, []
    if not overwrite:
        if manifest is not None:
            what = f"a finished {manifest.get('format')} export (manifest.json)"
        elif pending is not None:
            what = "an interrupted export of other rows or options (export.pending.json)"
        else:
            what = "files that no catalogen export wrote"
        raise ExportError(f"--out {out} is not empty: it holds {what}. Choose an empty folder, or pass --overwrite "
                          "to replace what an earlier export wrote there")
    records = [r for r in (manifest, pending) if r is not None]
    files, folders = _owned_by(records)
    foreign = [f for f in _all_files(out) if f != LOCK and not _is_owned(f, files, folders)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"--overwrite: {out} holds {len(foreign)} file(s) that no earlier export wrote ({shown}); "
                          "remove them yourself or choose an empty folder")
    return False, records


def _refuse_if_busy(out: Path) -> None:
    holder = lock_holder(out / LOCK) if out.is_dir() else None
    if holder:
        raise RunFolderBusy(f"{out} is in use by another export ({holder})")


def _create(out: Path) -> None:
    """The export folder and its lock file, or one line saying why they cannot be made (/proc/x)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOCK).touch()
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None


# --- the export ------------------------------------------------------------------------------


def read_image(run_dir: Location, relative: str, expected: str | None) -> bytes:
    """An image of the run, checked against the sha256 the run recorded for it."""
    path = run_dir / relative
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: run `catalogen verify {run_dir}`, then re-run with "
                          "--retry-failed to make it again") from None
    except OSError as exc:
        raise ExportError(f"{path} cannot be read ({exc})") from None
    if expected is not None and sha256_bytes(data) != expected:
        raise ExportError(f"{path} changed since the run recorded it (sha256 differs): run "
                          f"`catalogen verify {run_dir}`, then re-run with --retry-failed")
    return data


def _extension(relative: str) -> str:
    ext = Path(relative).suffix.lstrip(".").lower()
    if not ext:
        raise ExportError(f"image {relative} has no file extension, so its format is unknown")
    return ext


def fingerprint_of(options: ExportOptions, results_sha256: str) -> str:
    """What decides the files an export writes: the same fingerprint may resume the same folder."""
    return stable_hash("export", EXPORT_VERSION, options.format, results_sha256, options.image_stage, options.text,
                       list(options.where), parse_split(options.split), options.shard_size, options.include_degenerate,
                       *(("dedupe",) if options.dedupe else ()),  # absent when off: earlier fingerprints stay valid
                       *(("review", options.review) if options.review else ()))


def _file_entry(out: Path, relative: str, rows: int) -> dict[str, Any]:
    path = out / relative
    return {"path": relative, "rows": rows, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _is_done(out: Path, writer: Any, shard: Shard) -> bool:
    files = writer.files(shard)
    return bool(files) and all((out / f).is_file() for f in files)


def _write_json(path: Path, value: dict[str, Any], tmp_dir: Path) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str).encode(), tmp_dir)


def export_run(run_dir: str | Path, out: str | Path, options: ExportOptions,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Export the ok rows of a run folder as training shards; returns the manifest.

    Args:
        run_dir: what `catalogen run` wrote (results.parquet + images).
        out: the export folder, a local path: absent or empty, an interrupted run of this same export (resumed),
            or, with `options.overwrite`, a folder of an earlier export (replaced).
        options: format, image stage, text column, filters, split, shard size.
        progress: called as `progress(rows_done, rows_total)` after each row.

    Raises `ExportError` naming the run folder, column or option at fault, before writing anything
    when the options do not fit the run.
    """
    run_dir, out = location(run_dir), export_folder(out)
    # 1. Check the options against the run, and choose the rows and their splits.
    writer = writer_for(options.format)
    if options.shard_size < 1:
        raise ExportError(f"--shard-size {options.shard_size}: a shard holds at least one row")
    results = load_results(run_dir)
    decided = ""
    if options.review is not None:
        results, decided = decided_results(results, run_dir)
    selection = select_rows(results, options, run_dir)
    fractions = parse_split(options.split)
    shards, members = plan_shards(selection.splits, list(fractions), options.shard_size)
    layout = Layout(out, selection.table.schema, complete_columns(selection.table.drop_columns(["key", "text"])))
    if options.format == "hf":
        hf_features(layout.schema)  # the extra is installed and every column has a `datasets` type
    results_sha256 = sha256_file(run_dir / "results.parquet")
    fingerprint = fingerprint_of(options, results_sha256 + decided)

    # 2. Claim the output folder, refused before anything is created; say what this export will own
    # before writing any of it.
    check_out(out, run_dir)
    _refuse_if_busy(out)
    check_folder(out, fingerprint, options.overwrite)
    _create(out)
    with hold_folder(out / LOCK, "export"):
        resume, records = check_folder(out, fingerprint, options.overwrite)  # again: it may have changed meanwhile
        if records:
            clear_previous(out, records)
        owned = owned_paths(writer, shards)
        shutil.rmtree(layout.tmp_dir, ignore_errors=True)  # debris of an interrupted export
        _write_json(out / PENDING, {"fingerprint": fingerprint, "format": options.format, "owned": owned}, layout.tmp_dir)

        # 3. Write every shard not already done (a shard's files are renamed into place when complete).
        total = selection.table.num_rows
        done = 0
        entries = []
        for shard in shards:
            rows = members[shard.split][shard.start:shard.start + shard.rows]
            if resume and _is_done(out, writer, shard):
                if progress is not None:
                    progress(done + shard.rows, total)
            else:
                _write_shard(writer(layout, shard), run_dir, selection, rows, done, total, progress)
            done += shard.rows
            files = [_file_entry(out, f, shard.rows) for f in writer.files(shard)]
            entries.append({"split": shard.split, "index": shard.index, "rows": shard.rows, "files": files})

        # 4. The manifest, last: its presence says the export is complete.
        manifest = {
            "catalogen": catalogen.__version__, "export_version": EXPORT_VERSION, "format": options.format,
            "created_at": datetime.now(timezone.utc).isoformat(), "run": absolute(run_dir),
            "results_sha256": results_sha256, "fingerprint": fingerprint,
            "options": {"image_stage": options.image_stage, "text": options.text, "where": list(options.where),
                        "include_degenerate": options.include_degenerate, "dedupe": options.dedupe,
                        "review": options.review, "split": fractions, "shard_size": options.shard_size},
            "text_column": selection.text_column, "image_column": selection.image_column,
            "rows": total, "splits": _split_counts(fractions, members, shards), "excluded": selection.excluded,
            "shards": entries, "owned": owned,
        }
        _write_json(out / MANIFEST, manifest, layout.tmp_dir)
        (out / PENDING).unlink(missing_ok=True)
        shutil.rmtree(layout.tmp_dir, ignore_errors=True)
        (out / LOCK).unlink()  # last, still held: a finished export leaves only what it wrote
    return manifest


def _write_shard(writer: Any, run_dir: Location, selection: Selection, rows: list[int], done: int, total: int,
                 progress: Callable[[int, int], None] | None) -> None:
    """Feed one shard's rows to its writer, then close it."""
    metadata = selection.table.take(pa.array(rows, pa.int64())).to_pylist()
    for offset, (index, row) in enumerate(zip(rows, metadata)):
        relative = selection.images[index]
        image = read_image(run_dir, relative, selection.sha256[index])
        writer.write(Sample(row["key"], image, _extension(relative), row["text"], row))
        if progress is not None:
            progress(done + offset + 1, total)
    writer.close()


def _split_counts(fractions: dict[str, float], members: dict[str, list[int]], shards: list[Shard]) -> dict[str, Any]:
    counts = {}
    for name, fraction in fractions.items():
        in_split = [s for s in shards if s.split == name]
        counts[name] = {"fraction": fraction, "rows": len(members[name]), "shards": len(in_split)}
    return counts
