"""`catalogen reproduce IMAGE`: make an image again from the provenance in its own file, and compare.

The way back from catalogen/recipe.py. `read_provenance` reads the provenance JSON an image file
carries: a PNG's `catalogen` text chunk, a JPEG's or WebP's XMP property `catalogen:Provenance`
(where catalogen/labels.py puts it; AVIF is not read). It walks chunk and segment headers itself,
with hard limits: a chunk over `MAX_PROVENANCE_BYTES` is refused unread, compressed text is
inflated at most that far, JSON nested past `MAX_DEPTH` is refused before parsing, so a hostile
file costs neither memory nor time. A rendition (tasks/renditions.py) carries its source image's
provenance plus `rendition` (its settings): it is made again by re-making the source image, then
rendering and encoding it as the rendition stage does.

`Reproduction` rebuilds, in a folder of its own, a one-row catalog (the recipe's row: its base
prompt, its effective seed as the row's `seed`, its per-row columns; input files copied in after
their sha256 is checked) and a configuration (the recipe's settings and stages, offline, the
enhance answer cache of its own so an LLM really answers again). The CLI runs them through the same
check, plan and flow as `catalogen run` (flows/reproduce.py), with every Hub model pinned to the
commit the image records, checks that every model resolved to its recorded revision (a tiny or
local model's is a content hash), and compares the same stage's image pixel by pixel (`compare`).

Refusals (`Unusable`, exit 2): not an image, no catalogen provenance, provenance without a recipe,
a missing or changed input file, a model revision that is not present.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import unescape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from catalogen.hashing import sha256_bytes, sha256_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK_KEY = "catalogen"
MAX_PROVENANCE_BYTES = 4 * 2**20  # a recipe is a few kB; a larger chunk is skipped, never read
MAX_DEPTH = 64  # nesting a recipe never reaches
MAX_CHUNKS = 100_000
RECORDED_BY = "the image's provenance (recipe)"


class Unusable(Exception):
    """The file cannot be reproduced: not a catalogen image, or something it needs is missing."""


# --- reading the provenance ----------------------------------------------------------------------


def _png_text(handle: Any, key: str) -> str | None:
    """The text of a PNG's tEXt / zTXt / iTXt chunk named `key`, walking chunk headers only.

    Every other chunk (image data included) is skipped by seeking; a text chunk over the limit is
    refused, and compressed text is inflated at most to the limit.
    """
    if handle.read(8) != PNG_SIGNATURE:
        return None
    wanted = key.encode("latin-1") + b"\0"
    for _ in range(MAX_CHUNKS):
        header = handle.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return None
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            start = handle.read(len(wanted))
            if start == wanted:
                if length > MAX_PROVENANCE_BYTES:
                    raise Unusable(f"its {key} provenance chunk holds {length} bytes, over the "
                                   f"{MAX_PROVENANCE_BYTES} a catalogen image carries: refused unread")
                return _chunk_text(kind, handle.read(length - len(wanted)))
            handle.seek(length - len(start) + 4, io.SEEK_CUR)
        else:
            handle.seek(length + 4, io.SEEK_CUR)
    return None


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_PROVENANCE_BYTES)
    except zlib.error as exc:
        raise Unusable(f"its provenance chunk is not valid compressed data ({exc})") from None
    if inflater.unconsumed_tail:
        raise Unusable(f"its provenance chunk inflates past {MAX_PROVENANCE_BYTES} bytes: refused")
    return text


def _chunk_text(kind: bytes, body: bytes) -> str:
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        return _inflate(body[1:]).decode("latin-1")
    compressed, body = body[:1] == b"\x01", body[2:]  # iTXt: flag, method, language\0, translated\0, text
    _, _, body = body.partition(b"\0")
    _, _, body = body.partition(b"\0")
    return (_inflate(body) if compressed else body).decode("utf-8", errors="replace")


def _depth_ok(text: str) -> bool:
    """Whether JSON text nests at most MAX_DEPTH deep (counted outside strings, without parsing)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif char in "]}":
            depth -= 1
    return True


XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_PROVENANCE = re.compile(r"<catalogen:Provenance>(.*?)</catalogen:Provenance>", re.S)


def _jpeg_xmp(handle: Any) -> bytes | None:
    """The XMP packet of a JPEG (an APP1 segment, at most 64 kB), walking segment headers only."""
    if handle.read(2) != b"\xff\xd8":
        return None
    for _ in range(MAX_CHUNKS):
        marker = handle.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] in (0xD8, 0x01) or 0xD0 <= marker[1] <= 0xD7:
            continue
        if marker[1] in (0xDA, 0xD9):  # start of scan, end of image: the metadata came before
            return None
        size = handle.read(2)
        if len(size) < 2:
            return None
        length = struct.unpack(">H", size)[0] - 2
        if marker[1] == 0xE1:
            payload = handle.read(length)
            if payload.startswith(XMP_HEADER):
                return payload[len(XMP_HEADER):]
        else:
            handle.seek(length, io.SEEK_CUR)
    return None


def _webp_xmp(handle: Any) -> bytes | None:
    """The `XMP ` chunk of a WebP file, walking chunk headers only."""
    if handle.read(12)[8:12] != b"WEBP":
        return None
    for _ in range(MAX_CHUNKS):
        header = handle.read(8)
        if len(header) < 8:
            return None
        kind, length = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"XMP ":
            if length > MAX_PROVENANCE_BYTES:
                raise Unusable(f"its XMP chunk holds {length} bytes, over the {MAX_PROVENANCE_BYTES} a catalogen "
                               "image carries: refused unread")
            return handle.read(length)
        handle.seek(length + (length & 1), io.SEEK_CUR)
    return None


def _rendition_text(handle: Any, jpeg: bool) -> str | None:
    """A JPEG or WebP rendition's provenance: where catalogen/labels.py puts it, the XMP property
    `catalogen:Provenance` (the same JSON text as a PNG's `catalogen` chunk, XML-escaped)."""
    xmp = _jpeg_xmp(handle) if jpeg else _webp_xmp(handle)
    if xmp is None:
        return None
    match = _XMP_PROVENANCE.search(xmp.decode("utf-8", errors="replace"))
    return unescape(match.group(1)) if match else None


def read_provenance(path: str | Path | bytes) -> dict[str, Any]:
    """The provenance JSON a catalogen image (a file, or its bytes) carries; Unusable (with the
    reason) when it has none."""
    try:
        with (io.BytesIO(path) if isinstance(path, bytes) else open(Path(path), "rb")) as handle:
            head = handle.read(12)
            handle.seek(0)
            if head.startswith(PNG_SIGNATURE):
                text = _png_text(handle, CHUNK_KEY)
            elif head.startswith(b"\xff\xd8\xff") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
                text = _rendition_text(handle, jpeg=head.startswith(b"\xff\xd8"))
            else:
                raise Unusable("not a PNG, JPEG or WebP image")
    except OSError as exc:
        raise Unusable(f"cannot be read: {exc.strerror or exc}") from None
    if text is None:
        raise Unusable("carries no catalogen provenance: not an image catalogen wrote")
    if len(text) > MAX_PROVENANCE_BYTES or not _depth_ok(text):
        raise Unusable("its provenance is too large or too deeply nested to be catalogen's: refused")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Unusable(f"its catalogen provenance is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict) or not isinstance(value.get("stage"), str):
        raise Unusable("its catalogen provenance names no stage: not an image catalogen wrote")
    return value


# --- rebuilding the row --------------------------------------------------------------------------


@dataclass
class Reproduction:
    """A one-row catalog and configuration, in `folder`, that make the image again."""

    source: Path
    provenance: dict[str, Any]
    folder: Path
    catalog: Path
    config: Path
    out: Path

    @property
    def recipe(self) -> dict[str, Any]:
        return self.provenance["recipe"]

    @property
    def stage(self) -> str:
        return self.provenance["stage"]

    @property
    def column(self) -> str:
        """The results column of the image to compare: remove_bg's canvas, or the stage's image."""
        return f"{self.stage}_canvas_path" if "canvas" in self.provenance else f"{self.stage}_image_path"

    def describe(self) -> str:
        row = self.recipe["row"]
        what = f"{self.stage} canvas" if "canvas" in self.provenance else self.stage
        rendition = self.provenance.get("rendition")
        if isinstance(rendition, dict):
            what = f"rendition {rendition.get('name')} of the {what}"
        return f"{what} image of row {row.get('id')!r} v{row.get('variant')} ({' -> '.join(self.recipe['stages'])})"


def _copy_input(label: str, spec: Mapping[str, Any], inputs: Path) -> str:
    """An input file checked against its recorded sha256 and copied in; its path from the catalog's folder."""
    if "url" in spec:
        return str(spec["url"])
    inputs.mkdir(exist_ok=True)
    if "catalog" in spec:  # an image given as bytes inside the catalog
        data = _catalog_bytes(label, spec)
        target = inputs / f"{re.sub(r'[^A-Za-z0-9_]+', '-', label)}-{spec['sha256'][:12]}"
        target.write_bytes(data)
        return str(target.relative_to(inputs.parent))
    source = Path(str(spec.get("path")))
    if not source.is_file():
        raise Unusable(f"needs its {label} {source}, which is missing")
    digest = sha256_file(source)
    if spec.get("sha256") and digest != spec["sha256"]:
        raise Unusable(f"needs its {label} {source}, which changed since the image was made "
                       f"(sha256 {digest[:12]}…, recorded {str(spec['sha256'])[:12]}…)")
    target = inputs / f"{re.sub(r'[^A-Za-z0-9_]+', '-', label)}-{digest[:12]}{source.suffix}"
    shutil.copyfile(source, target)
    return str(target.relative_to(inputs.parent))


def _catalog_bytes(label: str, spec: Mapping[str, Any]) -> bytes:
    from catalogen.catalog import CatalogError, read_catalog

    catalog = Path(str(spec.get("catalog")))
    if not catalog.is_file():
        raise Unusable(f"needs its {label}, given as bytes in the catalog {catalog}, which is missing")
    try:
        table = read_catalog(catalog)
    except CatalogError as exc:
        raise Unusable(f"needs its {label} from the catalog {catalog}, which cannot be read ({exc})") from None
    ids = [str(v) for v in table.column("id").to_pylist()] if "id" in table.column_names else []
    if str(spec.get("id")) not in ids or "image" not in table.column_names:
        raise Unusable(f"needs its {label} from row {spec.get('id')!r} of {catalog}, which no longer has it")
    data = table.column("image")[ids.index(str(spec["id"]))].as_py()
    if not isinstance(data, bytes) or sha256_bytes(data) != spec.get("sha256"):
        raise Unusable(f"needs its {label} from row {spec.get('id')!r} of {catalog}, which changed since the image was made")
    return data


def rebuild(source: str | Path, provenance: dict[str, Any], folder: Path) -> Reproduction:
    """Write the one-row catalog and the configuration that make the image again into `folder`."""
    recipe = provenance.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("row"), dict) or not recipe.get("stages"):
        raise Unusable("carries catalogen provenance without a recipe (it was made outside a run, or by an "
                       "older catalogen): it cannot be made again from the file alone")
    if provenance["stage"] not in recipe["stages"]:
        raise Unusable(f"its recipe does not include the stage that made it ({provenance['stage']})")
    inputs = folder / "inputs"
    given = recipe.get("inputs") or {}
    row = {k: v for k, v in recipe["row"].items() if v is not None and k not in ("variant", "image_bytes_sha256")}
    for name, spec in given.items():  # a row's files (`image`, `style_image` …): copied in, by relative path
        if "." not in name and isinstance(spec, dict):
            row[name] = _copy_input("catalog image" if name == "image" else f"{name} file", spec, inputs)
    row["num_variants"] = 1  # the effective seed as the row's own: variant 0 gets exactly it
    catalog = folder / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist([row]), catalog)

    settings = json.loads(json.dumps(recipe.get("settings") or {}))
    settings["stages"] = list(recipe["stages"])
    settings["offline"] = True  # models by their recorded revision, from this machine only
    settings.setdefault("images", {})["roots"] = [str(inputs)]
    if "enhance" in settings["stages"]:
        settings.setdefault("enhance", {})["answer_cache"] = str(folder / "enhance-answers.sqlite")
    for name, spec in given.items():  # a setting's file (`style.style_image` …): copied in, by absolute path
        stage, _, setting = name.partition(".")
        if setting and isinstance(spec, dict) and isinstance(settings.get(stage), dict):
            settings[stage][setting] = str(folder / _copy_input(name, spec, inputs))
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=True, allow_unicode=True))
    return Reproduction(Path(source), provenance, folder, catalog, config, folder / "out")


def model_faults(recorded: Mapping[str, Mapping[str, Mapping[str, Any]]], resolved: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each recorded model this machine does not have at its recorded revision, named."""
    faults = []
    for stage, roles in recorded.items():
        for role, want in roles.items():
            have = resolved.get(stage, {}).get(role)
            if have is None or have.repo != want.get("repo") or have.revision != want.get("revision"):
                found = f"found {have.revision}" if have is not None else "not resolved"
                faults.append(f"{stage}.{role}: {want.get('repo')} @ {want.get('revision')} is not present ({found})")
    return faults


def missing_named(recorded: Mapping[str, Mapping[str, Mapping[str, Any]]], missing: list[str]) -> list[str]:
    """The recorded models behind a MissingModelsError's entries, by their recorded revisions."""
    named, matched = [], set()
    for stage, roles in recorded.items():
        for role, want in roles.items():
            for entry in missing:
                if str(entry).split("@")[0] == want.get("repo"):
                    named.append(f"{stage}.{role}: {want.get('repo')} @ {want.get('revision')} is not present")
                    matched.add(entry)
                    break
    return named + [str(m) for m in missing if m not in matched]


# --- comparing -----------------------------------------------------------------------------------


@dataclass
class Verdict:
    identical: bool
    line: str


def _pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        alpha = "A" in image.getbands() or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.int16)


def compare(original: bytes | Path, remade: bytes | Path) -> Verdict:
    """`identical`, or the largest difference of any channel, where it is, and how many pixels differ."""
    a, b = _pixels(original), _pixels(remade)
    if a.shape[2] != b.shape[2]:  # one has alpha, the other not: compare both with alpha
        a = a if a.shape[2] == 4 else np.dstack([a, np.full(a.shape[:2], 255, np.int16)])
        b = b if b.shape[2] == 4 else np.dstack([b, np.full(b.shape[:2], 255, np.int16)])
    if a.shape != b.shape:
        return Verdict(False, f"different: the image is {a.shape[1]}x{a.shape[0]}, made again it is {b.shape[1]}x{b.shape[0]}")
    diff = np.abs(a - b).max(axis=2)
    largest = int(diff.max()) if diff.size else 0
    if largest == 0:
        return Verdict(True, "identical")
    y, x = np.unravel_index(int(diff.argmax()), diff.shape)
    return Verdict(False, f"max pixel difference {largest} at ({x}, {y}), {int((diff > 0).sum())} pixels differ")
