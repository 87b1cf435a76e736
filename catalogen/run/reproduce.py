"""`catalogen reproduce IMAGE`: make an image again from the provenance in its own file, and compare.

The way back from catalogen/run/recipe.py. `read_provenance` reads the provenance JSON an image file
carries: a PNG's `catalogen` text chunk, a JPEG's or WebP's XMP property `catalogen:Provenance`
(where catalogen/media/labels.py puts it; AVIF is not read). It walks chunk and segment headers itself,
with hard limits: a chunk over `MAX_PROVENANCE_BYTES` is refused unread, compressed text is
inflated at most that far, JSON nested past `MAX_DEPTH` is refused before parsing, so a hostile
file costs neither memory nor time. A rendition (tasks/renditions.py) carries its source image's
provenance plus `rendition` (its settings): it is made again by re-making the source image, then
rendering and encoding it as the rendition stage does.

An image file is untrusted input: anyone can write a recipe into one. `rebuild` writes, in a
folder of its own, a one-row catalog (the recipe's row: its base prompt, or enhance's recorded
answer in its place, its effective seed as the row's `seed`, its per-row columns) and a
configuration made of what in the recipe decides pixels (the profile, the dtype, the sections of
the stages re-run, without throughput settings), every value validated as any configuration is,
under this machine's own settings (`Local`: caches, device, caps, offline). Nothing else the
recipe says is obeyed: enhance is not run again (no LLM, no server, no system prompt file), no URL
is fetched, nothing is written outside the folder. Input files are read only from where the user
allows (`--input NAME=PATH`, or the recorded path inside the local images.roots), capped in size,
refused unless regular, and used only when they match their recorded sha256 (a mismatch reveals
nothing about the file). The CLI runs the row through the same check, plan and flow as `catalogen
run` (flows/reproduce.py), with every Hub model pinned to the commit the image records, checks
that every model resolved to its recorded revision (a tiny or local model's is a content hash),
and compares the same stage's image pixel by pixel (`compare`).

Refusals (`Unusable`, exit 2, one line): not an image, no catalogen provenance, provenance without
a recipe or with a malformed one, settings or rendition settings a configuration refuses, an input
not allowed, missing, without a recorded sha256 or not matching it, a model revision not present.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import unescape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from catalogen import registry
from catalogen.storage.hashing import sha256_bytes
from catalogen.run.recipe import ENHANCED, without_throughput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK_KEY = "catalogen"
MAX_PROVENANCE_BYTES = 4 * 2**20  # a recipe is a few kB; a larger chunk is skipped, never read
MAX_DEPTH = 64  # nesting a recipe never reaches
MAX_CHUNKS = 100_000
RECORDED_BY = "the image's recipe"


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
    """A JPEG or WebP rendition's provenance: where catalogen/media/labels.py puts it, the XMP property
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
class Local:
    """What a reproduction takes from this machine, never from the file it reads.

    `config`: the local configuration (`reproduce --config`, else the defaults), of which only its
    images.roots (where a recorded input path may be read), its caps, cache_dir, device and model
    memory count. `given`: the files the user names by input name (`--input NAME=PATH`).
    """

    config: Any  # catalogen.config.RunConfig
    given: Mapping[str, Path] = field(default_factory=dict)
    origin: str = "defaults"  # where `config` came from, for messages

    def overrides(self, inputs: Path) -> tuple[dict[str, Any], dict[str, str]]:
        """The re-run's settings that are this machine's (dotted), and where each came from."""
        cfg, ours = self.config, "catalogen reproduce"
        values = {"cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None, "device": cfg.device,
                  "model_memory_gb": cfg.model_memory_gb, "lease_timeout_s": cfg.lease_timeout_s,
                  "images.max_pixels": cfg.images.max_pixels, "images.max_fetch_bytes": cfg.images.max_fetch_bytes}
        origins = {key: self.origin for key in values}
        # Only the checked copies are read; nothing is fetched; offline; a stop ends the re-run at once.
        values.update({"images.roots": [str(inputs)], "images.url_schemes": [], "offline": True, "stop_grace_s": 0})
        origins.update({key: ours for key in ("images.roots", "images.url_schemes", "offline", "stop_grace_s")})
        return values, origins


@dataclass
class Reproduction:
    """A one-row catalog and configuration, in `folder`, that make the image again.

    The configuration is `settings` (what the recipe says decides pixels) under `overrides` (this
    machine's: see `Local`); `load()` validates it, each error naming where its value came from.
    """

    source: Path
    provenance: dict[str, Any]
    folder: Path
    catalog: Path
    config: Path
    out: Path
    settings: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)  # recorded, per stage and role, of the stages re-run
    rendition: Any = None  # tasks.renditions.Rendition, for a rendition

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
        if self.rendition is not None:
            what = f"rendition {self.rendition.name} of the {what}"
        return f"{what} image of row {row.get('id')!r} v{row.get('variant')} ({' -> '.join(self.recipe['stages'])})"

    def load(self) -> Any:
        """The re-run's RunConfig, validated as any configuration is (ConfigError names the setting
        and whether it came from the image's recipe or from this machine)."""
        from catalogen.config import load_config

        return load_config(None, self.overrides, self.origins, base=(self.settings, RECORDED_BY))

    def write(self, cfg: Any) -> None:
        """The validated configuration as the flow reads it."""
        self.config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True, allow_unicode=True))


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Unusable(f"its recipe's {what} is a {type(value).__name__}, not a mapping: not a recipe catalogen wrote")
    return dict(value)


def _recipe(provenance: dict[str, Any]) -> dict[str, Any]:
    """The recipe, its shape checked (each part where catalogen writes it, of the type it writes)."""
    recipe = provenance.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("row"), dict) or not recipe.get("stages"):
        raise Unusable("carries catalogen provenance without a recipe (it was made outside a run, or by an "
                       "older catalogen): it cannot be made again from the file alone")
    stages = recipe["stages"]
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise Unusable("its recipe's stages are not a list of stage names: not a recipe catalogen wrote")
    for part in ("inputs", "settings", "models", ENHANCED):
        _mapping(recipe.get(part), part)
    for stage, roles in _mapping(recipe.get("models"), "models").items():
        for role, model in _mapping(roles, f"models.{stage}").items():
            _mapping(model, f"models.{stage}.{role}")
    if provenance["stage"] not in stages or provenance["stage"] == "enhance":
        raise Unusable(f"its recipe does not include the stage that made it ({provenance['stage']})")
    return recipe


def _rendition_settings(provenance: dict[str, Any]) -> Any:
    """A rendition's settings, validated before anything runs (None for a stage's image)."""
    made = provenance.get("rendition")
    if made is None:
        return None
    from pydantic import ValidationError

    Rendition = registry.stages()["renditions"].Rendition  # the stage's own model, found as run finds it
    if not isinstance(made, dict):
        raise Unusable("its rendition settings are not a mapping: not a rendition catalogen wrote")
    try:
        return Rendition.model_validate({k: v for k, v in made.items() if k not in ("source_path", "source_sha256")})
    except ValidationError as exc:
        faults = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rendition'}: {e['msg'].removeprefix('Value error, ')}"
                           for e in exc.errors())
        raise Unusable(f"its rendition settings are not valid ({RECORDED_BY}): {faults}") from None


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """A regular file's bytes, at most `cap`: a FIFO or device is refused unopened for reading, a
    /proc file (whose size reads 0 but whose content never ends) at its first read past its size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise Unusable(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unusable(f"{what} {path} is not a regular file: refused unread")
        if info.st_size > cap:
            raise Unusable(f"{what} {path} holds {info.st_size} bytes, over images.max_fetch_bytes ({cap}): refused unread")
        chunks, total = [], 0
        while block := os.read(fd, 1 << 20):
            total += len(block)
            if total > info.st_size:
                raise Unusable(f"{what} {path} reads past its size (a /proc or device file, not an image): refused")
            chunks.append(block)
        return b"".join(chunks)
    except OSError as exc:
        raise Unusable(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


class _Inputs:
    """The recipe's input files, each read only from where the user allows (`--input NAME=PATH`, or
    its recorded path inside the local images.roots), with a size cap, and copied into the
    reproduction's folder once its recorded sha256 matches. A mismatch says only that it differs:
    no hash of the file read is shown, so a recipe cannot make reproduce an oracle for any file."""

    def __init__(self, recorded: Mapping[str, Any], local: Local, folder: Path) -> None:
        self.recorded, self.local, self.folder = recorded, local, folder
        self.cap = local.config.images.max_fetch_bytes
        unknown = sorted(set(local.given) - set(recorded))
        if unknown:
            raise Unusable(f"--input {unknown[0]}: the image's recipe has no input of that name "
                           f"(its inputs: {', '.join(sorted(recorded)) or 'none'})")

    def copy(self, name: str) -> Path:
        """The checked copy of input `name` (an absolute path inside the reproduction's folder)."""
        spec = self.recorded.get(name)
        if not isinstance(spec, Mapping):
            raise Unusable(f"its recipe reads a {name} file but records no input {name} for it: refused")
        digest = spec.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            kind = f" (the URL {spec['url']}: reproduce fetches nothing)" if "url" in spec else ""
            raise Unusable(f"input {name} has no recorded sha256{kind}: refused, as no file could be checked against it")
        data = self._read(name, spec)
        if sha256_bytes(data) != digest:
            raise Unusable(f"input {name} does not match the recorded sha256")
        self.folder.mkdir(exist_ok=True)
        suffix = Path(str(spec.get("path", ""))).suffix
        suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
        target = self.folder / f"{re.sub(r'[^A-Za-z0-9_]+', '-', name)}-{digest[:12]}{suffix}"
        target.write_bytes(data)
        return target

    def _read(self, name: str, spec: Mapping[str, Any]) -> bytes:
        if name in self.local.given:
            return read_capped(self.local.given[name], self.cap, f"input {name}")
        if "catalog" in spec:  # an image given as bytes inside the catalog
            return self._catalog_bytes(name, spec)
        return read_capped(self._allowed(name, spec.get("path")), self.cap, f"input {name}")

    def _allowed(self, name: str, recorded: Any) -> Path:
        """A recorded path, when it lies inside the local images.roots (links resolved)."""
        from catalogen.media.images import file_in_roots

        value = str(recorded)
        fault = "is not an absolute path" if not os.path.isabs(value) else None
        found, fault = (None, fault) if fault else file_in_roots(value, self.local.config.images)
        if found is None:
            where = f"images.roots of {self.local.origin}" if self.local.config.images.roots else "no images.roots (none given)"
            raise Unusable(f"input {name} is recorded at {value}, which {fault} ({where}): name the file with "
                           f"--input {name}=PATH, or give --config with images.roots that hold it")
        return Path(found)

    def _catalog_bytes(self, name: str, spec: Mapping[str, Any]) -> bytes:
        from catalogen.catalog import CatalogError, read_catalog

        source = self._allowed(f"{name} (its catalog)", spec.get("catalog"))
        copy = self.folder / f"source-catalog{source.suffix}"
        self.folder.mkdir(exist_ok=True)
        copy.write_bytes(read_capped(source, self.cap, f"input {name}'s catalog"))
        try:
            table = read_catalog(copy)
        except CatalogError as exc:
            raise Unusable(f"input {name}'s catalog {source} cannot be read ({exc})") from None
        finally:
            copy.unlink()
        ids = [str(v) for v in table.column("id").to_pylist()] if "id" in table.column_names else []
        if str(spec.get("id")) not in ids or "image" not in table.column_names:
            raise Unusable(f"input {name}: row {spec.get('id')!r} of {source} no longer has it")
        data = table.column("image")[ids.index(str(spec["id"]))].as_py()
        if not isinstance(data, bytes):
            raise Unusable(f"input {name}: row {spec.get('id')!r} of {source} holds no image bytes")
        return data


def _path_columns(stages: list[str]) -> list[str]:
    known = registry.stages()
    return ["image", *(c for name in stages for c in getattr(known.get(name), "PATH_COLUMNS", ()))]


def _row(recipe: dict[str, Any], stages: list[str], inputs: _Inputs) -> dict[str, Any]:
    """The one catalog row: the recipe's, enhance's recorded answer in place of the base prompt,
    each file column pointing at its checked copy, and one variant (its effective seed as `seed`)."""
    row = {k: v for k, v in recipe["row"].items()
           if v is not None and k not in ("variant", "image_bytes_sha256", "num_variants")}
    if "enhance" in recipe["stages"]:
        answer = _mapping(recipe.get(ENHANCED), ENHANCED)
        for key in ("prompt", "negative_prompt"):
            if answer.get(key) is not None:
                if not isinstance(answer[key], str):
                    raise Unusable(f"its recipe's enhanced {key} is not text: not a recipe catalogen wrote")
                row[key] = answer[key]
    for column in _path_columns(stages):
        if row.get(column) is not None or column in inputs.recorded:
            row[column] = str(inputs.copy(column).relative_to(inputs.folder.parent))
    row["num_variants"] = 1
    return row


def _pixel_settings(recipe: dict[str, Any], stages: list[str], inputs: _Inputs) -> dict[str, Any]:
    """What of the recipe's settings decides pixels: the profile, the dtype and the sections of the
    stages re-run (and those they read), without throughput settings; a file setting points at
    its checked copy. Nothing else of the recipe is used (cache paths, runner, images, enhance …)."""
    given = _mapping(recipe.get("settings"), "settings")
    known = registry.stages()
    settings: dict[str, Any] = {k: given[k] for k in ("profile", "dtype") if k in given}
    for name in stages:
        for section in (name, *getattr(known.get(name), "SETTINGS_FROM", ())):
            if section in given:
                settings[section] = without_throughput(json.loads(json.dumps(given[section])))
        own = settings.get(name)
        for setting in getattr(known.get(name), "PATH_SETTINGS", ()):
            dotted = f"{name}.{setting}"
            if isinstance(own, dict) and (own.get(setting) or dotted in inputs.recorded):
                own[setting] = str(inputs.copy(dotted))
    settings["stages"] = stages
    return settings


def rebuild(source: str | Path, provenance: dict[str, Any], folder: Path, local: Local | None = None) -> Reproduction:
    """Write the one-row catalog and the configuration that make the image again into `folder`.

    From the recipe only what decides pixels is taken, validated as any configuration is before
    anything runs; `enhance` is not run again (its recorded answer is the row's prompt). Raises
    Unusable (one line) for anything that cannot be made again here.
    """
    if local is None:
        from catalogen.config import config_model

        local = Local(config_model()())
    recipe = _recipe(provenance)
    rendition = _rendition_settings(provenance)
    stages = [s for s in recipe["stages"] if s != "enhance"]
    inputs = _Inputs(_mapping(recipe.get("inputs"), "inputs"), local, folder / "inputs")
    models = {stage: roles for stage, roles in _mapping(recipe.get("models"), "models").items() if stage in stages}
    overrides, origins = local.overrides(inputs.folder)
    job = Reproduction(Path(source), provenance, folder, folder / "catalog.parquet", folder / "config.yaml",
                       folder / "out", _pixel_settings(recipe, stages, inputs), overrides, origins, models, rendition)
    row = _row(recipe, stages, inputs)
    from catalogen.config import ConfigError

    try:
        job.write(job.load())
    except ConfigError as exc:
        raise Unusable(f"its recipe cannot be run here: {' '.join(str(exc).split())}") from None
    try:
        pq.write_table(pa.Table.from_pylist([row]), job.catalog)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise Unusable(f"its recipe's row cannot be made a catalog row ({RECORDED_BY}): {exc}") from None
    return job


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
