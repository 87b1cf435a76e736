"""Background removal with rembg: a product cut out as an RGBA PNG, optionally placed on a canvas.

Reads: the image (an earlier stage's, such as generate, else the catalog's `image`: a file, a
URL or bytes; see catalogen.media.images). Writes: the cut-out (`image_path`, RGBA, the source's size)
and, with `remove_bg.canvas.enabled`, a marketplace main image beside it (`canvas_path`): the
product centred on a solid colour, filling the configured share of the frame (catalogen.media.placement).
Per row it records the mask's coverage (the share of pixels more than half opaque) and bounding
box, what was read (`source_image`, its real `source_sha256`), and the onnxruntime provider that
ran (`provider`; `requested_provider` says what the device lease asked for, so a GPU run that fell
back to the CPU shows it). A mask that covers almost nothing or almost everything fails the row.
Both files carry the XMP label (catalogen.media.labels: compositeWithTrainedAlgorithmicMedia for a
catalog photo's cut-out, trainedAlgorithmicMedia for a generated one) and the source's A1111
`parameters`, when it has them.

Key: the model (name and file SHA-256), every setting that changes the output or the outcome
(alpha matting, coverage limits, canvas), `VERSION`, and the catalog image's identity (see
`catalogen.media.images.image_identity`); the pipeline adds the key of the upstream row whose image it reads.

Each image is segmented alone (rembg has no batch call), so a row's output depends on its own
row only.

    >>> planned = plan(rows, cfg, {"segmenter": identity})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"segmenter": identity}, device, torch.float32))
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator, model_validator

import catalogen
from catalogen.catalog import Rule
from catalogen.config import ModelSpec, RunConfig, Strict
from catalogen.media.credentials import sign_stage_image
from catalogen.storage.hashing import column_keys, sha256_bytes
from catalogen.media.images import ImageLoadError, catalog_sources, read_planned
from catalogen.media.labels import read_label, source_type
from catalogen.models.loading import TINY_PREFIX, ModelIdentity, WorkTimer, cached
from catalogen.media.placement import (
    alpha_box,
    canvas_size,
    color_hex,
    coverage,
    fill_ratio,
    parse_aspect,
    parse_color,
    place,
)
from catalogen.media.pngmeta import encode_png
from catalogen.models.rembg import KIND, REMBG_MODELS, home_of, u2net_home
from catalogen.stage import StageContext, output_schema

log = logging.getLogger("catalogen.remove_bg")

NAME = "remove_bg"
POSITION = 30  # in pipeline order (catalogen.registry)
# Bump when a change here alters the cut-outs made from the same inputs (it is part of every key).
VERSION = 1

READS = ("image",)
PROVIDES = ("image",)
FROM_UPSTREAM = {"source_image": ("image", "image_path")}
MAKES_IMAGES = True

TINY_MODEL = "tiny:rembg"
PROFILES: dict[str, ModelSpec] = {
    "tiny": ModelSpec(repo=TINY_MODEL, kind=KIND),
    "tiny-sdxl": ModelSpec(repo=TINY_MODEL, kind=KIND),
    "sd15": ModelSpec(repo="isnet-general-use", kind=KIND),
    "sdxl": ModelSpec(repo="isnet-general-use", kind=KIND),
}

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class AlphaMatting(Strict):
    """rembg's alpha matting (pymatting): finer edges (hair, fur) from a trimap of the mask; slow."""

    enabled: bool = False
    foreground_threshold: int = Field(240, ge=0, le=255, description="mask values above it are surely product")
    background_threshold: int = Field(10, ge=0, le=255, description="mask values below it are surely background")
    erode_size: int = Field(10, ge=0, le=100, description="how far the sure regions shrink from the mask's edge")

    @model_validator(mode="after")
    def _ordered(self) -> "AlphaMatting":
        if self.background_threshold >= self.foreground_threshold:
            raise ValueError("alpha_matting.background_threshold must be below foreground_threshold")
        return self


class Canvas(Strict):
    """A marketplace main image: the product centred on a solid colour (see catalogen.media.placement)."""

    enabled: bool = False
    size: int = Field(1024, ge=16, le=8192, description="the canvas's longer side, in pixels")
    aspect: str = Field("1:1", description="width:height, e.g. 1:1 or 4:5")
    color: str = Field("#FFFFFF", description="a CSS colour: #RRGGBB, a name, rgb(...)")
    fill: float = Field(0.85, gt=0, le=1, description="share of the frame the product's limiting side spans")

    @field_validator("aspect")
    @classmethod
    def _aspect(cls, value: str) -> str:
        width, height = parse_aspect(value)
        return f"{width}:{height}"

    @field_validator("color")
    @classmethod
    def _color(cls, value: str) -> str:
        return color_hex(value)


class Settings(Strict):
    """How products are cut out; every field is part of the key."""

    model: str | None = Field(
        None, description=f"a rembg model ({', '.join(REMBG_MODELS)}) or {TINY_MODEL}; default: the profile's",
    )
    alpha_matting: AlphaMatting = AlphaMatting()
    min_coverage: float = Field(0.01, ge=0, le=1, description="a mask covering less of the image fails the row")
    max_coverage: float = Field(0.98, ge=0, le=1, description="a mask covering more of the image fails the row")
    canvas: Canvas = Canvas()

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is not None and value not in (*REMBG_MODELS, TINY_MODEL):
            raise ValueError(f"unknown rembg model {value!r}; choose from {', '.join(REMBG_MODELS)} or {TINY_MODEL}")
        return value

    @model_validator(mode="after")
    def _coverage_ordered(self) -> "Settings":
        if self.min_coverage >= self.max_coverage:
            raise ValueError("min_coverage must be below max_coverage")
        return self


PLAN_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("variant", pa.int32()),
    pa.field("key", pa.string()),
    pa.field("source_image", pa.string()),  # relative: an upstream image; absolute: a catalog file; or a URL
    pa.field("source_bytes", pa.large_binary()),  # the catalog's bytes
    pa.field("source_identity", pa.string()),  # what the key holds of a catalog image (images.image_identity)
])
OUTPUT_SCHEMA = output_schema(
    [
        pa.field("source_image", pa.string()),
        pa.field("source_sha256", pa.string()),  # of the bytes actually read
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("provider", pa.string()),  # the onnxruntime provider that ran the model
        pa.field("requested_provider", pa.string()),  # what the device lease asked for
        pa.field("alpha_matting", pa.bool_()),
        pa.field("coverage", pa.float64()),  # share of pixels with alpha over one half
        pa.field("bbox_x0", pa.int32()),  # the product's box in the cut-out; x1, y1 exclusive
        pa.field("bbox_y0", pa.int32()),
        pa.field("bbox_x1", pa.int32()),
        pa.field("bbox_y1", pa.int32()),
        pa.field("canvas_path", pa.string()),  # the main image on a solid colour, beside the cut-out
        pa.field("canvas_sha256", pa.string()),
        pa.field("canvas_width", pa.int32()),
        pa.field("canvas_height", pa.int32()),
        pa.field("canvas_fill", pa.float64()),  # the share of the frame the product reached
    ],
    images=True,
)
SHARD_ORDER: tuple[str, ...] = ()


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    model = cfg.remove_bg.model
    return {"segmenter": PROFILES[cfg.profile] if model is None else ModelSpec(repo=model, kind=KIND)}


def rules(cfg: RunConfig) -> dict[str, Rule]:
    return {}


def config_faults(cfg: RunConfig) -> list[str]:
    return []  # every setting is checked where it is declared


# --- plan -----------------------------------------------------------------------------------------


def output_settings(settings: Settings) -> dict[str, Any]:
    """The settings that change a row's files or its outcome, as the key holds them."""
    return {
        "alpha_matting": settings.alpha_matting.model_dump() if settings.alpha_matting.enabled else False,
        "coverage": [settings.min_coverage, settings.max_coverage],
        "canvas": settings.canvas.model_dump() if settings.canvas.enabled else False,
    }


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's image (the catalog's, until the pipeline fills in an upstream one) and its key.

    A catalog image is identified by its bytes' SHA-256, or its file's path, size and time; a row
    whose image comes from upstream has no identity here: the pipeline chains the upstream key.
    """
    identity = models["segmenter"]
    sources = catalog_sources(rows)
    fixed = [NAME, VERSION, identity.repo, identity.revision, output_settings(cfg.remove_bg)]
    keys = pa.array(column_keys(fixed, [sources["source_identity"]]), pa.string())
    return pa.Table.from_arrays(
        [rows.column("id"), rows.column("variant"), keys,
         sources["source_image"], sources["source_bytes"], sources["source_identity"]], schema=PLAN_SCHEMA,
    )


# --- the session ----------------------------------------------------------------------------------


def choose_providers(device: str, available: Sequence[str]) -> list:
    """onnxruntime providers for a device lease: the leased GPU named explicitly, the CPU as fallback.

    rembg's default picks GPU 0 whatever the lease says, and silently stays on the CPU when both
    onnxruntime and onnxruntime-gpu are installed; so the choice is made here. Without the CUDA
    provider in this onnxruntime, a GPU lease runs on the CPU (and says so, see `load_session`).
    """
    if not device.startswith("cuda") or CUDA not in available:
        return [CPU]
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return [(CUDA, {"device_id": index}), CPU]


def requested_provider(device: str) -> str:
    return CUDA if device.startswith("cuda") else CPU


def _open(identity: ModelIdentity, providers: list):
    """rembg's own session for the model, on `providers`, never downloading (the file was resolved)."""
    from rembg import new_session

    from catalogen.models.tiny.vision import REMBG_MODEL_FILE, rembg_session

    if identity.repo.startswith(TINY_PREFIX):
        session = rembg_session(Path(identity.path), providers)
        session.catalogen_nbytes = (Path(identity.path) / REMBG_MODEL_FILE).stat().st_size
        return session
    path = Path(identity.path)
    with u2net_home(home_of(path, identity.repo)):
        session = new_session(identity.repo, providers=providers)
    session.catalogen_nbytes = path.stat().st_size
    return session


def _open_with_fallback(identity: ModelIdentity, providers: list):
    """rembg 2.0.86 raises TypeError when a provider given with options (the GPU's device_id) falls
    back to the CPU: its warning joins the providers as text. Then open it on the CPU, and say so."""
    try:
        return _open(identity, providers)
    except TypeError as exc:
        if providers == [CPU] or "tuple found" not in str(exc):
            raise
        log.warning("remove_bg: onnxruntime could not start %s for %s (missing CUDA/cuDNN libraries?); "
                    "running on the CPU", providers[0], identity.short())
        return _open(identity, [CPU])


def load_session(identity: ModelIdentity, device: str, budget_gb: float | None = None):
    """The model's rembg session on `device`, opened once per process and reused by every shard."""
    import onnxruntime

    providers = choose_providers(device, onnxruntime.get_available_providers())

    def build():
        session = _open_with_fallback(identity, providers)
        used = session.inner_session.get_providers()[0]
        if used != requested_provider(device):
            log.warning("remove_bg: the lease is on %s but %s runs on %s (onnxruntime has %s; a GPU needs "
                        "onnxruntime-gpu in place of onnxruntime)", device, identity.short(), used,
                        ", ".join(onnxruntime.get_available_providers()))
        return session

    return cached(("rembg", identity.repo, identity.revision, device), device, build, budget_gb)


# --- process --------------------------------------------------------------------------------------


def _flatten(image: Image.Image) -> Image.Image:
    """RGB for the model: transparent parts of an image with alpha go on white (not on black)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _cut_out(image: Image.Image, session, settings: Settings) -> Image.Image:
    """The RGBA cut-out: the source's pixels unchanged, the mask as alpha (or rembg's matting)."""
    from rembg import remove

    matting = settings.alpha_matting
    if matting.enabled:
        return remove(image, session=session, alpha_matting=True,
                      alpha_matting_foreground_threshold=matting.foreground_threshold,
                      alpha_matting_background_threshold=matting.background_threshold,
                      alpha_matting_erode_size=matting.erode_size).convert("RGBA")
    return remove(image, session=session, putalpha=True).convert("RGBA")


def _coverage_fault(share: float, box: tuple | None, settings: Settings) -> str | None:
    """Why a mask is no product: (almost) nothing, or (almost) everything, is foreground."""
    if box is None:
        return "the mask is empty (no pixel is more than half opaque): no product was found"
    if share < settings.min_coverage:
        return (f"the mask covers {share:.2%} of the image, under remove_bg.min_coverage={settings.min_coverage:.2%}: "
                "no product was found")
    if share > settings.max_coverage:
        return (f"the mask covers {share:.2%} of the image, over remove_bg.max_coverage={settings.max_coverage:.2%}: "
                "the background was not separated from the product")
    return None


def _bbox_columns(box: tuple[int, int, int, int] | None) -> dict[str, int | None]:
    x0, y0, x1, y1 = box if box is not None else (None, None, None, None)
    return {"bbox_x0": x0, "bbox_y0": y0, "bbox_x1": x1, "bbox_y1": y1}


def _png(image: Image.Image, provenance: dict[str, Any], from_photo: bool, parameters: str | None) -> bytes:
    """PNG bytes with the provenance in a `catalogen` text chunk, the source's A1111 `parameters` (if it
    had any) and the XMP label (a photo's cut-out keeps the photo's pixels); the same for the same
    pixels and provenance."""
    return encode_png(image, parameters, provenance, source_type(from_photo))


def _source_parameters(data: bytes) -> str | None:
    """The A1111 parameters the source image carries (a generated image's), so its cut-out keeps them."""
    try:
        return read_label(data).parameters
    except Exception:  # noqa: BLE001 - a catalog image's broken metadata is no reason to fail the row
        return None


def _read(row: dict[str, Any], ctx: StageContext) -> tuple[bytes, Image.Image]:
    """The row's image bytes and decoded image; a catalog file must be the one the key was made from."""
    return read_planned(row["source_image"], row["source_identity"], row["source_bytes"], ctx.store.root,
                        ctx.config.images)


def _write_canvas(cutout: Image.Image, row: dict[str, Any], provenance: dict[str, Any], parameters: str | None,
                  ctx: StageContext, photo: bytes | None = None) -> dict:
    settings = ctx.config.remove_bg.canvas
    size = canvas_size(settings.size, settings.aspect)
    canvas, box = place(cutout, size, settings.fill, parse_color(settings.color))
    reached = fill_ratio(box, size)
    relative = ctx.store.image_path(NAME, row["id"], row["variant"], row["key"], ext="canvas.png")
    data = _png(canvas, {**provenance, "canvas": settings.model_dump(), "canvas_fill": reached},
                row["source_identity"] is not None, parameters)
    data = sign_stage_image(data, relative, ctx, ingredient=photo)  # C2PA, when outputs.credentials is set
    return {"canvas_path": relative, "canvas_sha256": ctx.store.write_image(relative, data),
            "canvas_width": size[0], "canvas_height": size[1], "canvas_fill": reached}


def _process_row(row: dict[str, Any], session, ctx: StageContext) -> dict[str, Any]:
    """One row: read, cut out, measure, check, write. A bad row is recorded as failed, never raised."""
    settings: Settings = ctx.config.remove_bg
    try:
        data, image = _read(row, ctx)
    except ImageLoadError as exc:
        return {"status": "failed", "error": str(exc)}
    record: dict[str, Any] = {"source_sha256": sha256_bytes(data), "source_width": image.width,
                              "source_height": image.height}
    try:
        cutout = _cut_out(_flatten(image), session, settings)
    except Exception as exc:  # noqa: BLE001 - onnxruntime and pymatting raise many kinds; the row fails alone
        return {**record, "status": "failed", "error": f"background removal failed: {type(exc).__name__}: {exc}"}
    alpha = np.asarray(cutout.getchannel("A"))
    share = coverage(alpha)
    box = alpha_box(alpha)
    record.update({"coverage": share, **_bbox_columns(box)})
    fault = _coverage_fault(share, box, settings)
    if fault:
        return {**record, "status": "failed", "error": fault}
    identity = ctx.models["segmenter"]
    provenance = {
        **{k: row[k] for k in ("id", "variant", "key", "source_image")}, **record, "bbox": list(box),
        "stage": NAME, "model": identity.repo, "model_revision": identity.revision,
        "provider": session.inner_session.get_providers()[0],
        "alpha_matting": settings.alpha_matting.model_dump() if settings.alpha_matting.enabled else None,
        "catalogen_version": catalogen.__version__,
        **ctx.recipe_entry(row),  # what `catalogen reproduce` makes it again from (inside a run)
    }
    try:
        relative = ctx.store.image_path(NAME, row["id"], row["variant"], row["key"])
        parameters = _source_parameters(data)
        png = _png(cutout, provenance, row["source_identity"] is not None, parameters)
        photo = data if row["source_identity"] is not None else None  # the catalog's photo: the C2PA ingredient
        png = sign_stage_image(png, relative, ctx, ingredient=photo)  # C2PA, when outputs.credentials is set
        record.update({"image_path": relative, "image_sha256": ctx.store.write_image(relative, png),
                       "image_width": cutout.width, "image_height": cutout.height})
        if settings.canvas.enabled:
            record.update(_write_canvas(cutout, row, provenance, parameters, ctx, photo))
    except OSError as exc:
        return {**record, "status": "failed", "error": f"could not write image: {exc}"}
    return {**record, "status": "ok"}


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Cut out each planned row's image; failures are recorded per row, never raised.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, `source_image` filled from upstream).
        ctx (`StageContext`): the run's settings, the output folder, `models["segmenter"]`, the device.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Open the model's session (once per process and device) on the providers the lease asks for.
    identity = ctx.models["segmenter"]
    session = load_session(identity, ctx.device.name, ctx.config.model_memory_gb)
    common = {
        "model": identity.repo, "model_revision": identity.revision, "device": ctx.device.name,
        "provider": session.inner_session.get_providers()[0], "requested_provider": requested_provider(ctx.device.name),
        "alpha_matting": ctx.config.remove_bg.alpha_matting.enabled,
    }

    # 2. Each row alone: read and decode, cut out, measure, write; record every row.
    results = []
    for done, row in enumerate(planned.select(PLAN_SCHEMA.names).to_pylist(), start=1):
        timer = WorkTimer()
        record = _process_row(row, session, ctx)
        results.append({**row, **common, **record, "seconds": timer.elapsed(),
                        "finished_at": datetime.now(timezone.utc)})
        ctx.progress(done)
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)
