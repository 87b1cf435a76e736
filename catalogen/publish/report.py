"""report.html: a static page to look at a run, written from the run folder alone.

```
<run>/
  report.html                  summary, error reasons, and the gallery's page code (CSS and JS inline)
  report-data/index.js         what the filters need for every row (statuses, error reasons), one char or int per row
  report-data/rows-NNNNN.js    the rows themselves, CHUNK_ROWS per file, loaded only when a page shows them
  thumbs/<sha256>.webp         one thumbnail per distinct image, named by the image's sha256
```

The page reads its data through `<script src>` (not fetch(), which browsers refuse under
file://), so it opens from a local folder or object storage alike, with relative paths only and
no network. The rows are never inlined into the HTML: a page of PAGE_ROWS rows is drawn on
demand from the chunk files it needs, so a run of 100,000 rows opens as fast as one of ten.
Thumbnails are named by content, so writing the report again makes only those of new images.

    >>> from catalogen.publish.report import write_report
    >>> write_report("outputs/demo")  # doctest: +SKIP
    PosixPath('outputs/demo/report.html')
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

import catalogen
from catalogen.storage.locations import Location, absolute, is_remote, location, put
from catalogen.media.duplicates import duplicate_groups, recorded_max_distance
from catalogen.media.placement import alpha_box
from catalogen.media.pngmeta import A1111_SAMPLERS, format_parameters
from catalogen.run.results import NOTED, error_reason, image_prefix, recorded_images, row_notes, rows_with
from catalogen.review import state as review_state
from catalogen.storage.store import STATUSES, RunStateError, RunStore, temp_file
from catalogen.models.tiny.profile import profile_note
from catalogen.publish.spending import spending
from catalogen.run.costs import money

REPORT_FILE = "report.html"
DATA_DIR = "report-data"
THUMB_DIR = "thumbs"
THUMB_SIZE = 192
THUMB_FORMAT = "webp"
CHUNK_ROWS = 1000
PAGE_ROWS = 100
REASONS_SHOWN = 50
ASSETS = Path(__file__).with_name("report_assets")

# One character per status in index.js, so the filters scan 100,000 rows without parsing objects.
STATUS_CODES = {"ok": "o", "fallback": "b", "degenerate": "d", "failed": "f", "skipped": "s"}
REVIEW_CODES = {"approved": "a", "rejected": "r", "needs_review": "n", "alternate": "l"}  # review_state, the same way
NO_STATUS = "-"
# The prompt a row started from (before an enhance stage rewrote it) and the one the image was made from.
BEFORE_COLUMNS = ("enhance_source_prompt", "generate_source_prompt")
AFTER_COLUMNS = ("generate_prompt", "enhance_prompt")
CAPTION_COLUMN = "caption_caption"
PARAMETER_COLUMNS = ("prompt", "negative_prompt", "steps", "scheduler", "guidance_scale", "seed", "width", "height",
                     "model", "model_revision")
_SHA256 = re.compile(r"[0-9a-f]{64}")  # a thumbnail's file name: nothing else reaches the file system


@dataclass(frozen=True)
class ThumbJob:
    sha256: str
    source: Path


# --- reading the run folder -----------------------------------------------------------------------


def read_run(run_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """results.parquet, with each row's review state as of now (reviewers' decisions applied), and
    run.json (empty when absent: a results file alone still makes a report)."""
    results_path = run_dir / "results.parquet"
    if not results_path.exists():
        raise RunStateError(f"{results_path} does not exist: run `catalogen run` into {run_dir} first")
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return review_state.current(RunStore(run_dir)), info


def run_stages(results: pa.Table, info: dict[str, Any]) -> list[str]:
    """The run's stages in pipeline order: run.json's list, else every `<stage>_status` with a key."""
    names = set(results.column_names)
    configured = info.get("config", {}).get("stages")
    if configured:
        return [s for s in configured if f"{s}_status" in names]
    found = [c.removesuffix("_status") for c in results.column_names if c.endswith("_status") and c != "status"]
    return [s for s in found if f"{s}_key" in names]


def image_stages(results: pa.Table, stages: list[str]) -> list[str]:
    """The images the gallery shows (see `results.recorded_images`): each stage's own, and others a
    stage wrote, such as remove_bg's marketplace canvas (`remove_bg.canvas`)."""
    return [name for name in recorded_images(results) if name.split(".")[0] in stages]


# --- the product, final against photo -------------------------------------------------------------

PRODUCT_DIR = f"{DATA_DIR}/products"


def _crop_png(image: Image.Image, folder: Path) -> tuple[str, str, int, int]:
    """Write a crop once, named by its content: (relative path, sha256, width, height)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    path = folder / PRODUCT_DIR / f"{sha}.png"
    if not path.exists():
        replace_file(path, buffer.getvalue())
    return f"{PRODUCT_DIR}/{sha}.png", sha, image.width, image.height


def _product_crops(root: Path, final: str, box: list[int], source: str) -> list[tuple[str, str, int, int]]:
    """The product's crop of the final image, and the same product in its photo (the cut-out's own
    pixels at their own resolution, cropped at the product's box there)."""
    with (root / final).open("rb") as fh, Image.open(fh) as image:
        final_crop = image.convert("RGB").crop(tuple(box))
    with (Path(source) if os.path.isabs(source) else root / source).open("rb") as fh, Image.open(fh) as cutout:
        cutout = cutout.convert("RGBA")
    photo_box = alpha_box(np.asarray(cutout.getchannel("A")))
    return [_crop_png(final_crop, root), _crop_png(cutout.convert("RGB").crop(photo_box), root)]


def with_product_crops(results: pa.Table, root: Path, stages: list[str]) -> tuple[pa.Table, list[str]]:
    """Per row, the product crop of the final image beside the same crop of the original photo, as
    two more images (`<stage>.product`, `<stage>.photo`) of the last stage that records a product's
    box and source; the results are unchanged when none does or a row's files cannot be read."""
    found = [s for s in stages if {f"{s}_product_bbox", f"{s}_product_source", f"{s}_image_path"} <= set(results.column_names)]
    if not found:
        return results, []
    stage = found[-1]
    rows = zip(*(results.column(f"{stage}_{c}").to_pylist() for c in ("image_path", "product_bbox", "product_source")))
    columns: dict[str, list] = {f"{stage}_{n}_{c}": [] for n in ("product", "photo") for c in ("path", "sha256", "width", "height")}
    for final, box, source in rows:
        try:
            crops = _product_crops(root, final, box, source) if final and box and source else [(None,) * 4] * 2
        except (OSError, UnidentifiedImageError, ValueError, TypeError):
            crops = [(None,) * 4] * 2
        for name, crop in zip(("product", "photo"), crops):
            for column, value in zip(("path", "sha256", "width", "height"), crop):
                columns[f"{stage}_{name}_{column}"].append(value)
    for name, values in columns.items():
        results = results.append_column(name, pa.array(values, pa.int32() if name.endswith(("width", "height")) else pa.string()))
    return results, [f"{stage}.product", f"{stage}.photo"]


# --- summary --------------------------------------------------------------------------------------


def _counts(values: pa.ChunkedArray) -> dict[str, int]:
    return {c["values"]: c["counts"] for c in pc.value_counts(values).to_pylist() if c["values"] is not None}


def _distinct(results: pa.Table, column: str) -> list[str]:
    if column not in results.column_names:
        return []
    return sorted(str(v) for v in pc.unique(results.column(column).drop_null()).to_pylist())


def stage_summary(results: pa.Table, stage: str) -> dict[str, Any]:
    """One stage's counts per status, seconds spent (sum of `<stage>_seconds`) and devices used."""
    counts = _counts(results.column(f"{stage}_status"))
    seconds_column = f"{stage}_seconds"
    seconds = pc.sum(results.column(seconds_column)).as_py() if seconds_column in results.column_names else None
    return {
        "name": stage,
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "pending": results.num_rows - sum(counts.values()),
        "seconds": seconds or 0.0,
        "devices": _distinct(results, f"{stage}_device"),
    }


def _scalars(section: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A configuration section as `key: value` lines, nested settings dotted, empty ones left out."""
    lines: dict[str, str] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.update(_scalars(value, f"{name}."))
        elif isinstance(value, list) and value:
            lines[name] = ", ".join(str(v) for v in value)
        elif value is not None and value != "" and not isinstance(value, list):
            lines[name] = str(value)
    return lines


def config_highlights(info: dict[str, Any], stages: list[str]) -> dict[str, dict[str, str]]:
    """The run-level settings, then each stage's own section (what someone reading the images asks)."""
    config = dict(info.get("config", {}))
    run_level = {k: v for k, v in config.items() if not isinstance(v, dict) and k not in stages}
    highlights = {"run": _scalars(run_level)}
    for stage in stages:
        if isinstance(config.get(stage), dict):
            highlights[stage] = _scalars(config[stage])
        elif isinstance(config.get(stage), list):  # a section that is a list (renditions): an item a line
            highlights[stage] = _list_section(config[stage])
    return highlights


def _list_section(items: list[Any]) -> dict[str, str]:
    """Each item of a list section by its `name`, its other settings on one line."""
    lines = {}
    for index, item in enumerate(items):
        settings = _scalars(item) if isinstance(item, dict) else {"": str(item)}
        name = settings.pop("name", str(index))
        lines[name] = ", ".join(f"{key} {value}" for key, value in settings.items())
    return lines


def error_reasons(errors: Iterable[str | None]) -> tuple[list[tuple[str, int]], list[int]]:
    """Reasons counted over the run, most frequent first, and each row's index into them (-1: none)."""
    per_row = [error_reason(e) if e else None for e in errors]
    counted = Counter(r for r in per_row if r is not None).most_common()
    position = {reason: i for i, (reason, _) in enumerate(counted)}
    return counted, [position[r] if r is not None else -1 for r in per_row]


def _when(info: dict[str, Any]) -> dict[str, str | None]:
    invocations = info.get("invocations") or [{}]
    return {
        "created": info.get("created_at"),
        "updated": info.get("updated_at"),
        "last_started": invocations[-1].get("started_at"),
        "invocations": str(len(info.get("invocations", []))),
        "report": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summary(results: pa.Table, info: dict[str, Any], stages: list[str]) -> dict[str, Any]:
    """Everything the report's top part shows."""
    overall = _counts(results.column("status"))
    models = [
        {"stage": stage, "role": role, "repo": identity.get("repo"), "revision": identity.get("revision")}
        for stage, roles in info.get("models", {}).items()
        for role, identity in roles.items()
    ]
    return {
        "rows": results.num_rows,
        "counts": {s: overall.get(s, 0) for s in ("ok", "failed", "skipped")},
        "noted": {s: int(rows_with(results, stages, s).sum()) for s in NOTED},  # ok rows among them too
        "stages": [stage_summary(results, s) for s in stages],
        "models": models,
        "catalog": info.get("catalog", {}),
        "trial": info.get("trial"),
        "config": config_highlights(info, stages),
        "when": _when(info),
        "versions": info.get("versions", {}),
    }


DUPLICATE_GROUPS_SHOWN = 24
DUPLICATE_MEMBERS_SHOWN = 8


def near_duplicates(results: pa.Table, thumbs: set[str]) -> dict[str, Any] | None:
    """The near-duplicate groups (catalogen/media/duplicates.py) for the summary: each chain of
    `near_duplicate_of` followed to the row it ends at (the one `export --dedupe` keeps), largest
    groups first; None when the results hold no such column."""
    if "near_duplicate_of" not in results.column_names:
        return None
    _, max_distance = recorded_max_distance(results)
    groups = duplicate_groups(results)
    shown = groups[:DUPLICATE_GROUPS_SHOWN]
    wanted = sorted({i for g in shown for i in g[:DUPLICATE_MEMBERS_SHOWN]})
    columns = ["id", "variant", "image_path", "image_sha256", "near_duplicate_distance"]
    rows = dict(zip(wanted, results.select(columns).take(pa.array(wanted, pa.int64())).to_pylist()))
    drawn = []
    for members in shown:
        figures = []
        for i in members[:DUPLICATE_MEMBERS_SHOWN]:
            row = rows[i]
            figures.append({"id": str(row["id"]), "variant": row["variant"], "src": row["image_path"],
                            "thumb": thumb_name(row["image_sha256"]) if row["image_sha256"] in thumbs else None,
                            "distance": row["near_duplicate_distance"]})
        drawn.append({"rows": len(members), "members": figures, "more": len(members) - len(figures)})
    return {"max_distance": max_distance, "rows": sum(len(g) - 1 for g in groups), "groups": len(groups),
            "shown": drawn, "more_groups": len(groups) - len(drawn)}


def replace_file(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see half a file. No fsync: every
    file of the report is made again from the run folder if a crash loses it. In a bucket: one PUT."""
    if is_remote(path):
        put(path, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- thumbnails -----------------------------------------------------------------------------------


def thumb_name(sha256: str) -> str:
    return f"{THUMB_DIR}/{sha256}.{THUMB_FORMAT}"


def thumb_jobs(results: pa.Table, run_dir: Path, images: list[str]) -> list[ThumbJob]:
    """One job per distinct image sha256 over the shown images' columns (see `image_stages`)."""
    jobs: dict[str, ThumbJob] = {}
    for name in images:
        prefix = image_prefix(name)
        paths = results.column(f"{prefix}_path").to_pylist()
        for path, sha in zip(paths, results.column(f"{prefix}_sha256").to_pylist()):
            if path and sha and sha not in jobs and _SHA256.fullmatch(sha):
                jobs[sha] = ThumbJob(sha, run_dir / path)
    return list(jobs.values())


def make_thumbnail(source: Path, target: Path, size: int = THUMB_SIZE) -> bool:
    """Write a `size`-px WebP thumbnail of `source` (kept if already there); False if it cannot be read."""
    if target.exists():
        return True
    try:
        with source.open("rb") as fh, Image.open(fh) as image:
            image.draft("RGB", (size, size))  # JPEG decodes at a reduced scale: much faster
            image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    buffer = io.BytesIO()
    image.save(buffer, format=THUMB_FORMAT, quality=80, method=4)
    replace_file(target, buffer.getvalue())
    return True


def _thumbnail_job(job: ThumbJob, folder: Path, size: int) -> tuple[str, bool]:
    return job.sha256, make_thumbnail(job.source, folder / f"{job.sha256}.{THUMB_FORMAT}", size)


def make_thumbnails(jobs: list[ThumbJob], run_dir: Path, size: int = THUMB_SIZE, workers: int | None = None) -> set[str]:
    """Thumbnails of every job's image in parallel (Pillow decodes and resizes outside the GIL);
    returns the sha256s that have one. Missing or unreadable images are left out, not raised."""
    folder = run_dir / THUMB_DIR
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        outcomes = pool.map(_thumbnail_job, jobs, [folder] * len(jobs), [size] * len(jobs))
        return {sha for sha, made in outcomes if made}


# --- rows -----------------------------------------------------------------------------------------


def parameters_line(row: dict[str, Any], prefix: str = "generate_") -> str | None:
    """The A1111 `parameters` text the generate stage wrote into this row's PNG (see
    tasks/generate.py `_save`), rebuilt from the row's columns; None when a value is missing.
    Its `Version` is this catalogen's: an image made by an older one names that in its own PNG."""
    values = {name: row.get(f"{prefix}{name}") for name in PARAMETER_COLUMNS}
    required = [name for name in PARAMETER_COLUMNS if name != "negative_prompt"]
    if any(values[name] is None for name in required) or values["scheduler"] not in A1111_SAMPLERS:
        return None
    return format_parameters(
        values["prompt"], values["negative_prompt"] or "",
        steps=values["steps"], scheduler=values["scheduler"], guidance_scale=values["guidance_scale"],
        seed=values["seed"], width=values["width"], height=values["height"],
        model=values["model"], model_hash=values["model_revision"].removeprefix("sha256:")[:10],
        extra={"Version": f"catalogen {catalogen.__version__}"},
    )


def _first(row: dict[str, Any], columns: Iterable[str]) -> Any:
    for column in columns:
        if row.get(column) is not None:
            return row[column]
    return None


def _seed(row: dict[str, Any], stages: list[str]) -> str | None:
    """As text: seeds go up to 2**63, and JavaScript's numbers keep 53 bits."""
    seed = _first(row, [*(f"{s}_seed" for s in stages), "seed"])
    return None if seed is None else str(seed)


def _image(row: dict[str, Any], name: str, thumbs: set[str]) -> dict[str, Any] | None:
    prefix = image_prefix(name)
    path = row.get(f"{prefix}_path")
    if not path:
        return None
    sha = row.get(f"{prefix}_sha256")
    return {
        "src": path,
        "thumb": thumb_name(sha) if sha in thumbs else None,
        "w": row.get(f"{prefix}_width"),
        "h": row.get(f"{prefix}_height"),
    }


def _near_duplicate_of(row: dict[str, Any]) -> str | None:
    """`b v0, 3 bits apart`: the earlier row this one's final image repeats (catalogen/media/duplicates.py)."""
    if row.get("near_duplicate_of") is None:
        return None
    return (f"{row['near_duplicate_of']} v{row.get('near_duplicate_of_variant')}, "
            f"{row.get('near_duplicate_distance')} bits apart (pHash)")


def row_record(row: dict[str, Any], stages: list[str], shown_images: list[str], thumbs: set[str]) -> dict[str, Any]:
    """What the gallery shows for one row (short keys: 100,000 of these are written)."""
    after = _first(row, AFTER_COLUMNS) or row.get("prompt")
    before = _first(row, BEFORE_COLUMNS) or row.get("prompt")
    stage_errors = {s: row[f"{s}_error"] for s in stages if row.get(f"{s}_error")}
    record = {
        "id": row["id"],
        "v": row.get("variant"),
        "s": row["status"],
        "at": row.get("stage"),
        "e": row.get("error"),
        "seed": _seed(row, stages),
        "before": before if before != after else None,
        "after": after,
        "neg": row.get("generate_negative_prompt") or None,
        "cap": row.get(CAPTION_COLUMN),
        "rv": row.get("review_state"),
        "rr": row.get("review_reason"),
        "rb": row.get("review_by"),
        "dup": _near_duplicate_of(row),
        "par": parameters_line(row),
        "ss": [row.get(f"{s}_status") for s in stages],
        "se": stage_errors or None,
        "img": [_image(row, s, thumbs) for s in shown_images],
    }
    return {key: value for key, value in record.items() if value is not None}  # absent reads as null in the page


def _row_columns(results: pa.Table, stages: list[str], shown_images: list[str]) -> list[str]:
    wanted = ["id", "variant", "status", "stage", "error", "prompt", "seed", *BEFORE_COLUMNS, *AFTER_COLUMNS,
              CAPTION_COLUMN, "near_duplicate_of", "near_duplicate_of_variant", "near_duplicate_distance",
              "review_state", "review_reason", "review_by"]
    wanted += [f"generate_{name}" for name in PARAMETER_COLUMNS]
    for stage in stages:
        wanted += [f"{stage}_{c}" for c in ("status", "error", "seed")]
    for name in shown_images:
        wanted += [f"{image_prefix(name)}_{c}" for c in ("path", "sha256", "width", "height")]
    present = set(results.column_names)
    return list(dict.fromkeys(c for c in wanted if c in present))


def row_chunks(results: pa.Table, stages: list[str], shown_images: list[str], thumbs: set[str],
               chunk_rows: int = CHUNK_ROWS) -> Iterator[list[dict[str, Any]]]:
    """The gallery's rows, `chunk_rows` at a time (one Arrow slice in memory as Python objects)."""
    table = results.select(_row_columns(results, stages, shown_images))
    for start in range(0, table.num_rows, chunk_rows):
        rows = table.slice(start, chunk_rows).to_pylist()
        yield [row_record(row, stages, shown_images, thumbs) for row in rows]


def status_string(values: pa.ChunkedArray, codes: dict[str, str] = STATUS_CODES) -> str:
    """One character per row (`codes`, NO_STATUS for none): what the status and review filters scan."""
    return "".join(codes.get(v, NO_STATUS) for v in values.to_pylist())


# --- writing --------------------------------------------------------------------------------------


def _js(name: str, value: Any) -> bytes:
    """A script that assigns `value` as JSON to a global (U+2028/9 escaped: JSON allows them raw)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"{name} = {text};\n".encode()


def chunk_file(index: int) -> str:
    return f"{DATA_DIR}/rows-{index:05d}.js"


def _write_chunks(run_dir: Path, chunks: Iterator[list[dict[str, Any]]]) -> int:
    written = 0
    for index, records in enumerate(chunks):
        data = b"window.catalogenChunks = window.catalogenChunks || {};\n" + _js(f"window.catalogenChunks[{index}]", records)
        replace_file(run_dir / chunk_file(index), data)
        written += 1
    for stale in (run_dir / DATA_DIR).glob("rows-*.js"):  # from an earlier report of more rows
        if int(stale.stem.removeprefix("rows-")) >= written:
            stale.unlink()
    return written


def _index(results: pa.Table, stages: list[str], shown_images: list[str], reasons: list[tuple[str, int]],
           reason_of: list[int], chunks: int) -> dict[str, Any]:
    return {
        "format": 1,
        "rows": results.num_rows,
        "chunkRows": CHUNK_ROWS,
        "chunks": chunks,
        "pageRows": PAGE_ROWS,
        "stages": stages,
        "imageStages": shown_images,
        "codes": {code: status for status, code in STATUS_CODES.items()},
        "status": status_string(results.column("status")),
        "stageStatus": {s: status_string(results.column(f"{s}_status")) for s in stages},
        "reviewCodes": {code: state for state, code in REVIEW_CODES.items()},
        "review": status_string(results.column("review_state"), REVIEW_CODES),
        "reasons": [{"reason": reason, "rows": count} for reason, count in reasons],
        "reasonOf": reason_of,
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(context: dict[str, Any]) -> str:
    """report.html from its template, with the CSS and the page code inline."""
    assets = {"css": (ASSETS / "report.css").read_text(), "js": (ASSETS / "report.js").read_text()}
    return _environment().get_template("report.html.j2").render(**context, **assets)


def write_report(run_dir: str | Location, *, workers: int | None = None) -> Location:
    """Write report.html, its data files and the missing thumbnails into a run folder; returns the
    path of report.html. Reads only the folder (results.parquet, run.json, images).

    `workers`: threads making thumbnails (default: the CPU count, at most 8).
    """
    root = location(run_dir)
    results, info = read_run(root)
    for folder in (root / THUMB_DIR, root / DATA_DIR):
        for debris in folder.glob(".*.tmp"):  # left by a report that was killed
            debris.unlink(missing_ok=True)
    stages = run_stages(results, info)
    shown_images = image_stages(results, stages)
    results, crops = with_product_crops(results, root, stages)
    shown_images += crops

    # 1. Thumbnails of images that have none yet.
    thumbs = make_thumbnails(thumb_jobs(results, root, shown_images), root, THUMB_SIZE, workers)

    # 2. The rows, in chunk files the page loads as it needs them.
    chunks = _write_chunks(root, row_chunks(results, stages, shown_images, thumbs))

    # 3. The filters' index: per-row status codes and reasons (errors, and fallback or degenerate notes).
    reasons, reason_of = error_reasons(row_notes(results, stages))
    index = _index(results, stages, shown_images, reasons, reason_of, chunks)
    replace_file(root / DATA_DIR / "index.js", _js("window.catalogenReport", index))

    # 4. The page itself: summary rendered here, the gallery drawn by its script.
    context = {
        "summary": summary(results, info, stages),
        "reasons": reasons[:REASONS_SHOWN],
        "more_reasons": max(0, len(reasons) - REASONS_SHOWN),
        "rows_with_reason": sum(count for _, count in reasons),
        "duplicates": near_duplicates(results, thumbs),
        "statuses": STATUSES,
        "review_states": review_state.STATES,
        "data_dir": DATA_DIR,
        "folder": absolute(root),
        "profile_note": profile_note(str(info.get("config", {}).get("profile", ""))),
        "catalogen_version": catalogen.__version__,
        "spending": spending(results, stages),
        "money": money,
    }
    path = root / REPORT_FILE
    replace_file(path, render_html(context).encode())
    return path
