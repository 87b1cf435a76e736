"""Renditions: the finished files for each channel (a marketplace's main image, a shop's square, a
thumbnail), made from a chosen stage's image, in PNG, JPEG, WebP or AVIF, labelled and with sRGB.

Reads: per rendition, its `source`: `final` (default: the image of the last image stage before
this one, else the catalog's `image`), or a named earlier stage's own image (`generate`,
`remove_bg` (the cut-out), `remove_bg.canvas` (its marketplace canvas), `style`, `upscale`).
Writes: one file per rendition and row, beside the stage images (`images/renditions/…<name>.<ext>`):
resized to `size` (the long side) or to an exact `box` (`fit`: contain, cover or pad), or with
`fill` the product (the opaque part of a cut-out; a whole image without alpha) centred on the box
spanning that share of its limiting side (catalogen.media.placement.place); transparency flattened onto
`background` (or kept, with `background: transparent`, by formats that have it); encoded at
`quality` with an embedded sRGB ICC profile (`icc`). Every file carries the source's label and
provenance, and the rendition's settings (catalogen.media.labels: XMP with the IPTC digital source type,
the A1111 parameters in the EXIF UserComment or PNG text, the provenance JSON).
Per row it records `renditions`, a list of (name, format, source, path, sha256, bytes, width,
height); results.parquet shows each as columns `renditions_<name>_path`, `_sha256`, `_bytes`,
`_width`, `_height` (catalogen.run.results), so `verify`, `clean`, the report and
`export --image rendition:NAME` treat them as images.

Settings: the `renditions:` section, a list (or `{only: approved, items: [...]}`: renditions only for
approved rows, see catalogen/review and flows/run.py); an item is a preset's name (`PRESETS`) or a mapping of
the fields of `Rendition` (with `preset:` as its defaults). Why one stage with a list, not one
stage per rendition: a row's sources are read and decoded once for all its renditions, and every
rendition of a row shares the row's status.

Key: `VERSION` and every rendition's settings, and the catalog image's identity (for `final` without
an image stage); the pipeline adds the keys of every image stage it reads from (see `READS`), so a
change of rendition settings redoes renditions only, and a new upstream image redoes its renditions.
No model and no device: `needs_device` is False.

    >>> planned = plan(rows, cfg, {})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {}, device, torch.float32))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import Field, PrivateAttr, RootModel, field_validator, model_serializer, model_validator

from catalogen.catalog import Rule
from catalogen.config import ModelSpec, RunConfig, Strict
from catalogen.media.credentials import sign_stage_image
from catalogen.storage.hashing import column_keys, sha256_bytes
from catalogen.media.images import ImageLoadError, catalog_sources, read_planned
from catalogen.media.labels import EXTENSIONS, Label, encode, read_label
from catalogen.models.loading import ModelIdentity, WorkTimer
from catalogen.media.placement import color_hex, parse_color, place
from catalogen.stage import StageContext, output_schema

NAME = "renditions"
POSITION = 70  # after every built-in stage (catalogen.registry): it makes the run's finished files
VERSION = 1

# `final`: the nearest earlier image; `image@<stage>`: that stage's own images, when it runs earlier.
READS = ("image", "image@generate", "image@remove_bg", "image@style", "image@upscale")
PROVIDES: tuple[str, ...] = ()
# source -> the planned column holding its path (relative to the run folder), and where it comes from
SOURCES: dict[str, tuple[str, tuple[str, str]]] = {
    "final": ("source_image", ("image", "image_path")),
    "generate": ("from_generate", ("image@generate", "image_path")),
    "remove_bg": ("from_remove_bg", ("image@remove_bg", "image_path")),
    "remove_bg.canvas": ("from_remove_bg_canvas", ("image@remove_bg", "canvas_path")),
    "style": ("from_style", ("image@style", "image_path")),
    "upscale": ("from_upscale", ("image@upscale", "image_path")),
}
FROM_UPSTREAM = {column: upstream for column, upstream in SOURCES.values()}
MAKES_IMAGES = False  # its files are renditions of the images, not the row's next image

MAX_SIDE = 8192
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
# The common channels. marketplace-main: the cut-out on white (255 wherever the product is not), the
# product's long side 85% of a 2000 px square, JPEG q90; shop-square: the final image in a 2048 px
# square, WebP; thumb: 400 px on the long side, WebP.
PRESETS: dict[str, dict[str, Any]] = {
    "marketplace-main": {"source": "remove_bg", "format": "jpeg", "box": "2000x2000", "fill": 0.85,
                         "background": "#FFFFFF", "quality": 90},
    "shop-square": {"source": "final", "format": "webp", "box": "2048x2048", "fit": "pad",
                    "background": "#FFFFFF", "quality": 90},
    "thumb": {"source": "final", "format": "webp", "size": 400, "quality": 80},
}
TRANSPARENT = "transparent"


def parse_box(text: str) -> tuple[int, int]:
    """`2048x2048` -> (2048, 2048); each side 16 to MAX_SIDE."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"box {text!r} is not WIDTHxHEIGHT, e.g. 2048x2048")
    width, height = int(match.group(1)), int(match.group(2))
    if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
        raise ValueError(f"box {text!r}: each side must be 16 to {MAX_SIDE} pixels")
    return width, height


class Rendition(Strict):
    """One finished file per row; a preset's values are the defaults of the fields not given."""

    name: str = Field(description="names the file and its result columns: lower-case letters, digits, - and _")
    preset: str | None = Field(None, description=f"start from a preset: {', '.join(PRESETS)}")
    source: str = Field("final", description="final (the last image), or an earlier stage's image: "
                        f"{', '.join(s for s in SOURCES if s != 'final')}")
    format: Literal["png", "jpeg", "webp", "avif"] = "png"
    size: int | None = Field(None, ge=16, le=MAX_SIDE, description="the long side in pixels (or give box)")
    box: str | None = Field(None, description="an exact WIDTHxHEIGHT, e.g. 2048x2048 (or give size)")
    fit: Literal["contain", "cover", "pad"] = Field(
        "pad", description="into a box: contain (the image within it, no bars), cover (filled, cropped), "
        "pad (within it, bars of background)")
    fill: float | None = Field(None, gt=0, le=1, description="with box: the product spans this share of the "
                               "box's limiting side, centred on background (cut-outs: the opaque part)")
    background: str = Field("#FFFFFF", description="what transparency becomes: a CSS colour, or transparent "
                            "(png, webp, avif keep the alpha)")
    quality: int = Field(90, ge=1, le=100, description="jpeg, webp and avif quality; png is lossless")
    icc: bool = Field(True, description="embed an sRGB ICC profile")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """A bare name is that preset; a preset's values fill the fields an item leaves out."""
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = data["preset"]
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
            data = {"name": preset, **PRESETS[preset], **data}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value) or value == "image":  # `image` would read as the stage's own image
            raise ValueError(f"name {value!r}: use 1-40 lower-case letters, digits, - and _, starting with a "
                             "letter or digit")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"unknown source {value!r}; choose from {', '.join(SOURCES)}")
        return value

    @field_validator("box")
    @classmethod
    def _box(cls, value: str | None) -> str | None:
        if value is None:
            return None
        width, height = parse_box(value)
        return f"{width}x{height}"

    @field_validator("background")
    @classmethod
    def _background(cls, value: str) -> str:
        if value.strip().lower() == TRANSPARENT:
            return TRANSPARENT
        return color_hex(value)

    @model_validator(mode="after")
    def _consistent(self) -> "Rendition":
        if self.size is not None and self.box is not None:
            raise ValueError("give size (the long side) or box (WIDTHxHEIGHT), not both")
        if self.fill is not None and self.box is None:
            raise ValueError("fill places the product in a box: give box (WIDTHxHEIGHT)")
        if self.format == "jpeg" and self.background == TRANSPARENT:
            raise ValueError("background: jpeg has no transparency; give a colour")
        return self

    def color(self) -> tuple[int, int, int] | None:
        return None if self.background == TRANSPARENT else parse_color(self.background)


ONLY = ("all", "approved")


class Settings(RootModel[list[Rendition]]):
    """The renditions each row gets, in order: the `renditions:` section is a list, or a mapping of
    `items` (that list) and `only`: `approved` makes them for approved rows only (catalogen/review;
    a row approved later gets them on the next run). `only` is not part of the key."""

    root: list[Rendition] = []
    _only: str = PrivateAttr("all")

    @property
    def items(self) -> list[Rendition]:
        return self.root

    @property
    def only(self) -> str:
        return self._only

    @model_validator(mode="wrap")
    @classmethod
    def _section(cls, value: Any, handler: Any) -> "Settings":
        """The mapping form; a plain list's errors keep their places (`renditions.0.size`)."""
        if not isinstance(value, Mapping):
            return handler(value)
        unknown = sorted(set(value) - {"only", "items"})
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}: the section is a list, or {{only, items}}")
        only = value.get("only", "all")
        if only not in ONLY:
            raise ValueError(f"only: {only!r} is not one of {', '.join(ONLY)}")
        made = handler(value.get("items", []))
        made._only = only
        return made

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        items = handler(self)
        return items if self._only == "all" else {"only": self._only, "items": items}

    @model_validator(mode="after")
    def _unique(self) -> "Settings":
        names = [r.name for r in self.items]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rendition name(s) {', '.join(repeated)} used twice; give each its own `name`")
        return self


UNSIZED_SIDE = 1024  # what the disk bound takes a rendition without size or box (the source's size) to be


def disk_bound(cfg: RunConfig) -> float | None:
    """A rough bound of the bytes one row's renditions take, for a dry run before any run measured
    them: each file's pixels (its box; its long side squared) x its format's bytes per pixel."""
    from catalogen.run.dryrun import BYTES_PER_PIXEL

    items = cfg.renditions.root
    if not items:
        return None
    total = 0.0
    for item in items:
        side = item.size or UNSIZED_SIDE
        width, height = parse_box(item.box) if item.box else (side, side)
        total += width * height * BYTES_PER_PIXEL[item.format]
    return total


PLAN_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("variant", pa.int32()),
    pa.field("key", pa.string()),
    pa.field("source_image", pa.string()),  # final: an upstream image (relative), a catalog file or a URL
    pa.field("source_bytes", pa.large_binary()),  # the catalog's bytes
    pa.field("source_identity", pa.string()),  # what the key holds of a catalog image (images.image_identity)
    *(pa.field(column, pa.string()) for column, _ in list(SOURCES.values())[1:]),  # named stages' images
])
RENDITION = pa.struct([
    pa.field("name", pa.string()),
    pa.field("format", pa.string()),
    pa.field("source", pa.string()),  # the setting (final, remove_bg, …)
    pa.field("source_path", pa.string()),  # the image it was made from
    pa.field("path", pa.string()),  # relative to the run folder
    pa.field("sha256", pa.string()),
    pa.field("bytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])
OUTPUT_SCHEMA = output_schema([pa.field("renditions", pa.list_(RENDITION))], images=False)
SHARD_ORDER: tuple[str, ...] = ()


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    return {}


def rules(cfg: RunConfig) -> dict[str, Rule]:
    return {}


def needs_device(cfg: RunConfig) -> bool:
    return False


def config_faults(cfg: RunConfig) -> list[str]:
    """No rendition at all, or a source stage that does not run before this one."""
    if NAME not in cfg.stages:
        return []
    renditions = cfg.renditions.items
    origin = cfg.origin(NAME)
    if not renditions:
        return [f"renditions: the stage runs but no rendition is configured; list some, e.g. "
                f"`renditions: [{', '.join(PRESETS)}]` (from {origin})"]
    before = cfg.stages[: cfg.stages.index(NAME)]
    problems = []
    for index, rendition in enumerate(renditions):
        stage = rendition.source.split(".")[0]
        if rendition.source != "final" and stage not in before:
            problems.append(f"renditions.{index}.source={rendition.source} ({rendition.name}): {stage} does not run "
                            f"before renditions in stages {list(cfg.stages)}; use final or an earlier stage "
                            f"(from {origin})")
        elif rendition.source == "remove_bg.canvas" and not cfg.remove_bg.canvas.enabled:
            problems.append(f"renditions.{index}.source=remove_bg.canvas ({rendition.name}): remove_bg.canvas.enabled "
                            f"is false, so there is no canvas (from {origin})")
    return problems


# --- plan -----------------------------------------------------------------------------------------


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's key: every rendition's settings, and the catalog image's identity; the sources
    from upstream are filled in by the pipeline (nulls here)."""
    sources = catalog_sources(rows)
    settings = [r.model_dump() for r in cfg.renditions.items]
    keys = pa.array(column_keys([NAME, VERSION, settings], [sources["source_identity"]]), pa.string())
    named = {column: pa.nulls(rows.num_rows, pa.string()) for column, _ in list(SOURCES.values())[1:]}
    return pa.Table.from_pydict(
        {"id": rows.column("id"), "variant": rows.column("variant"), "key": keys, **sources, **named},
        schema=PLAN_SCHEMA,
    )


# --- process --------------------------------------------------------------------------------------


def _centred(image: Image.Image, size: tuple[int, int], color: tuple[int, int, int] | None) -> Image.Image:
    """`image` in the middle of a `size` canvas of `color`, its transparency blended onto it (RGB); on
    a transparent canvas when `color` is None (RGBA)."""
    position = ((size[0] - image.width) // 2, (size[1] - image.height) // 2)
    if color is None:
        canvas = Image.new("RGBA", size, (0, 0, 0, 0))
        canvas.paste(image.convert("RGBA"), position)  # onto nothing: a copy, alpha and all
        return canvas
    canvas = Image.new("RGB", size, color)
    canvas.paste(image, position, image if image.mode == "RGBA" else None)
    return canvas


def _flatten(image: Image.Image, color: tuple[int, int, int] | None) -> Image.Image:
    """Transparency onto the background colour (kept as RGBA when the colour is None)."""
    if image.mode != "RGBA" or color is None:
        return image
    background = Image.new("RGBA", image.size, (*color, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def render(image: Image.Image, rendition: Rendition) -> Image.Image:
    """The rendition's pixels from a source image (RGB, or RGBA with transparency); Lanczos throughout."""
    color = rendition.color()
    lanczos = Image.Resampling.LANCZOS
    if rendition.fill is not None:
        placed, _ = place(image.convert("RGBA"), parse_box(rendition.box), rendition.fill, color)
        return placed
    if rendition.box is not None:
        box = parse_box(rendition.box)
        if rendition.fit == "cover":
            resized = ImageOps.fit(image, box, lanczos)
        else:
            resized = ImageOps.contain(image, box, lanczos)
        if rendition.fit == "pad":
            resized = _centred(resized, box, color)
    elif rendition.size is not None:
        resized = ImageOps.contain(image, (rendition.size, rendition.size), lanczos)
    else:
        resized = image
    return _flatten(resized, color)


@dataclass(frozen=True)
class _Source:
    """A rendition's source image, read and decoded once per row for all its renditions."""

    path: str | None  # relative to the run folder (an upstream image), a catalog file or URL; None: bytes
    data: bytes
    image: Image.Image
    label: Label  # what the source says about itself (catalogen.media.labels); Label(None) for a plain photo
    sha256: str


def _source_label(data: bytes) -> Label:
    try:
        return read_label(data)
    except Exception:  # noqa: BLE001 - a catalog image with broken metadata is labelled as nothing
        return Label(None)


def _label(source: _Source, rendition: Rendition) -> Label:
    """The source's label and provenance, with what made the rendition added."""
    found = source.label
    made = {**rendition.model_dump(), "source_path": source.path, "source_sha256": source.sha256}
    return Label(found.source_type, found.parameters, {**found.provenance, "rendition": made})


def _read(row: dict[str, Any], rendition: Rendition, ctx: StageContext) -> _Source:
    """The rendition's source: read, decoded (within images.max_pixels) and its label read."""
    column = SOURCES[rendition.source][0]
    if rendition.source == "final":
        path = row["source_image"]
        data, image = read_planned(path, row["source_identity"], row["source_bytes"], ctx.store.root, ctx.config.images)
    elif row[column] is None:
        raise ImageLoadError(f"{rendition.source} made no image for this row")
    else:
        path = row[column]
        data, image = read_planned(path, None, None, ctx.store.root, ctx.config.images)
    return _Source(path, data, image, _source_label(data), sha256_bytes(data))


def _make(row: dict[str, Any], rendition: Rendition, sources: dict, ctx: StageContext) -> dict[str, Any]:
    """One rendition of one row, written; its record (see `RENDITION`)."""
    if rendition.source not in sources:
        sources[rendition.source] = _read(row, rendition, ctx)
    source = sources[rendition.source]
    source_path, data = source.path, source.data
    pixels = render(source.image, rendition)
    encoded = encode(pixels, rendition.format, _label(source, rendition), rendition.quality, rendition.icc)
    relative = ctx.store.image_path(NAME, row["id"], row["variant"], row["key"],
                                    ext=f"{rendition.name}.{EXTENSIONS[rendition.format]}")
    # C2PA content credentials, when outputs.credentials is set; a product photo's source is the ingredient
    encoded = sign_stage_image(encoded, relative, ctx, ingredient=data if row["source_identity"] is not None else None,
                               ingredient_title=source_path.rsplit("/", 1)[-1] if source_path else "catalog photo")
    return {"name": rendition.name, "format": rendition.format, "source": rendition.source,
            "source_path": source_path, "path": relative, "sha256": ctx.store.write_image(relative, encoded),
            "bytes": len(encoded), "width": pixels.width, "height": pixels.height}


def _process_row(row: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Every rendition of one row; the first that cannot be made fails the row, with its name."""
    made, sources = [], {}
    for rendition in ctx.config.renditions.items:
        try:
            made.append(_make(row, rendition, sources, ctx))
        except ImageLoadError as exc:
            return {"status": "failed", "error": f"rendition {rendition.name}: {exc}"}
        except (OSError, ValueError) as exc:  # an encoder's or the folder's error fails this row alone
            return {"status": "failed", "error": f"rendition {rendition.name}: {type(exc).__name__}: {exc}"}
    return {"status": "ok", "renditions": made}


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Make every configured rendition of each planned row; failures are recorded per row, never raised.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, sources filled from upstream).
        ctx (`StageContext`): the run's settings (`renditions`), the output folder.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    results = []
    for done, row in enumerate(planned.select(PLAN_SCHEMA.names).to_pylist(), start=1):
        timer = WorkTimer()
        record = _process_row(row, ctx)
        results.append({"id": row["id"], "variant": row["variant"], "key": row["key"], "device": "cpu", **record,
                        "seconds": timer.elapsed(), "finished_at": datetime.now(timezone.utc)})
        ctx.progress(done)
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)
