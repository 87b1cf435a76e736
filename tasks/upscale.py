"""Upscaling by 2, 3 or 4 with a ControlNet tile model, in overlapping tiles with blended seams.

Reads: the previous image stage's output (or the catalog's image) and the row's prompt (an earlier
stage's, else the catalog's or the template's, else `upscale.prompt`).
Writes: one PNG per row of exactly (input width x factor, input height x factor). The input is
Lanczos-resized by the factor and used as both the img2img image and the ControlNet's control
image. Outputs larger than a tile are cut into overlapping tiles (`tile_grid`); each tile is
denoised on its own and the tiles are blended with cosine ramps across every overlap (`Blend`),
so no tile edge shows. An RGBA input keeps its alpha: Lanczos-resized alone and put back.

The product survives to the last pixel: where the input comes from a product stage (style, or an
earlier upscale) that recorded the product's box and cut-out (`product_bbox`, `product_source`),
the scene is repainted around the product and the product is put back from that cut-out, resized
once (Lanczos) into its box at the output size and blended by its matte exactly as style blends it
(`catalogen.media.placement.product_layer`, `composite`). For a catalog photo the cut-out holds the
photo's own pixels, so the final product comes from the photo, not from the canvas-sized copy;
`product_source_scale` over 1 says the photo was smaller than the product's place and was enlarged.
`upscale.paste_product`: `auto` pastes rows whose product is a catalog photo (a generated product
has no real pixels to keep, so it is repainted as before), `always` every row with a product
upstream, `never` none. A pasted row is checked on the written file (`product_identical`) and fails
if the check fails. `upscale.factor: auto` picks per row the smallest factor (2 to 4) at which the
product's box reaches its cut-out's own size (2 for rows without a product upstream).
Key: the base pipeline and ControlNet (repo, resolved revision), every setting that changes the
pixels (factor, paste_product, strength, conditioning scale, steps, guidance, scheduler, tile size and overlap),
the row's prompts, seed and input image; the pipeline adds the keys of the upstream rows it read.

A tile's noise comes from its own CPU generator, seeded from (row seed, tile index) (`tile_seed`).
A call holds one row's tiles only, in tile order, padded to the full batch size with copies: CPU
kernels round a sample by one level differently at another place in the batch (measured), so
sharing calls across rows would make a row's pixels depend on its neighbours and `reproduce`,
which makes the row alone, would differ.

    >>> planned = plan(rows, cfg, {"pipeline": pipeline_identity, "controlnet": controlnet_identity})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), identities, device, torch.float32))
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

import catalogen
from catalogen.run.batching import AdaptiveBatcher, Outcome
from catalogen.catalog import Rule, column_or_nulls
from catalogen.models.conditioning import is_sdxl, prompt_arguments, prompt_chunks
from catalogen.config import ModelSpec, RunConfig, Strict
from catalogen.media.credentials import sign_stage_image
from catalogen.models.diffusion import finite, load_pipeline
from catalogen.storage.hashing import MAX_SEED, column_keys, stable_hash
from catalogen.media.images import ImageLoadError, catalog_sources, open_input, read_planned
from catalogen.models.loading import ModelIdentity, WorkTimer, cached
from catalogen.media.placement import Box, alpha_box, composite, product_layer, product_pixels_equal, scale_box
from catalogen.media.labels import source_type
from catalogen.media.pngmeta import encode_png, format_parameters
from catalogen.models.schedulers import SCHEDULER_HELP, SchedulerName, make_scheduler
from catalogen.stage import StageContext, output_schema
from tasks import generate
from tasks.style import BBOX

NAME = "upscale"
POSITION = 50  # in pipeline order (catalogen.registry)
VERSION = 1

READS = ("image", "prompt")
PROVIDES = ("image",)
FROM_UPSTREAM = {
    "source_image": ("image", "image_path"),
    "prompt": ("prompt", "prompt"),
    "negative_prompt": ("prompt", "negative_prompt"),
    "product_source": ("image", "product_source"),  # from a product stage (style, upscale); others have none
    "input_product_bbox": ("image", "product_bbox"),
}
MAKES_IMAGES = True
SETTINGS_FROM = ("generate",)  # other sections it reads (generate.model): in each image's recipe too

# The tile ControlNet per profile; the base pipeline is the profile's generate model, and the tile
# size defaults to its native size (the tiny profile's 64, so small test images are tiled too).
PROFILES: dict[str, ModelSpec] = {
    "tiny": ModelSpec(repo="tiny:controlnet-sd15", kind="controlnet"),
    "tiny-sdxl": ModelSpec(repo="tiny:controlnet-sdxl", kind="controlnet"),
    "sd15": ModelSpec(repo="lllyasviel/control_v11f1e_sd15_tile", kind="controlnet"),
    "sdxl": ModelSpec(repo="xinsir/controlnet-tile-sdxl-1.0", kind="controlnet"),
}
MULTIPLE = 8  # tile sides: what the pipelines accept (the VAE's and UNet's downsampling)
MIN_FACTOR, MAX_FACTOR = 2, 4


class Settings(Strict):
    """Upscaling settings for the whole run."""

    controlnet: ModelSpec | None = Field(
        None, description="overrides the profile's tile ControlNet (it must match the base model's family)"
    )
    factor: int | Literal["auto"] = Field(
        2, description="output size = input size x factor (2, 3 or 4); auto: per row, the smallest factor that "
        "brings the product to its cut-out's own resolution (capped at 4; 2 without a product upstream)")
    paste_product: Literal["auto", "always", "never"] = Field(
        "auto", description="put the product back from its cut-out at the output size: auto for catalog "
        "photos only, always (also generated products), never (the whole image is repainted)")
    strength: float = Field(0.8, gt=0, le=1, description="img2img strength: how much of each tile is redrawn")
    controlnet_conditioning_scale: float = Field(1.0, ge=0, le=2)
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0, le=30)
    scheduler: SchedulerName = Field("euler", description=SCHEDULER_HELP)
    prompt: str = Field("", description="the prompt for rows that have none")
    negative_prompt: str = ""
    tile_size: int | None = Field(None, ge=16, le=4096, description="tile side in output pixels, a multiple of 8; "
                                  "default the model's native size")
    tile_overlap: int | None = Field(None, ge=0, description="overlap between tiles; default 1/8 of the tile")
    batch_size: int = Field(4, ge=1, le=256, description="tiles per pipeline call, always run at this size")

    @field_validator("factor")
    @classmethod
    def _factor_in_range(cls, value: int | str) -> int | str:
        """2 to 4 (pydantic's own words for a bound, which a union of int and "auto" would bury)."""
        if value != "auto" and value < MIN_FACTOR:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}",
                                      {"ge": MIN_FACTOR})
        if value != "auto" and value > MAX_FACTOR:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": MAX_FACTOR})
        return value


PLAN_FIELDS = [
    pa.field("source_image", pa.string()),  # relative: an upstream stage's image; absolute: a catalog file
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("factor", pa.int32()),  # null in the plan with factor: auto (decided per row from its product)
    pa.field("paste_product", pa.string()),  # the setting: auto | always | never
    pa.field("product_source", pa.string()),  # the cut-out the product's pixels come from (an upstream's)
    pa.field("input_product_bbox", BBOX),  # the product's box in the input image (an upstream's)
    pa.field("strength", pa.float64()),
    pa.field("controlnet_conditioning_scale", pa.float64()),
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
    pa.field("tile_size", pa.int32()),
    pa.field("tile_overlap", pa.int32()),
]
PLAN_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("key", pa.string()),
    *PLAN_FIELDS, pa.field("source_bytes", pa.large_binary()),
    pa.field("source_identity", pa.string()),  # what the key holds of a catalog image (images.image_identity)
])
OUTPUT_SCHEMA = output_schema(
    [
        *PLAN_FIELDS,
        pa.field("tiles", pa.int32()),
        pa.field("product_bbox", BBOX),  # where the product sits in this image (input box x factor)
        pa.field("product_pasted", pa.bool_()),  # put back from `product_source` at this size
        pa.field("product_identical", pa.bool_()),  # the written file holds the pasted product exactly;
        # False: a product was repainted (not pasted); null: no product upstream
        pa.field("product_source_scale", pa.float64()),  # the product's size here over its size in the cut-out
        pa.field("input_width", pa.int32()),
        pa.field("input_height", pa.int32()),
        pa.field("dtype", pa.string()),
        pa.field("model", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("controlnet", pa.string()),
        pa.field("controlnet_revision", pa.string()),
        pa.field("batch_size", pa.int32()),
    ],
    images=True,
)
SHARD_ORDER = ("negative_prompt",)
RECORDED = tuple(f.name for f in PLAN_FIELDS)


def controlnet_spec(cfg: RunConfig) -> ModelSpec:
    """The tile ControlNet; from the Hub, only its configuration and the weights `load_controlnet`
    reads (repositories often hold fp32 and fp16 copies side by side)."""
    spec = cfg.upscale.controlnet or PROFILES[cfg.profile]
    if spec.files is not None:
        return spec
    weights = "diffusion_pytorch_model" + (f".{spec.variant}" if spec.variant else "")
    return spec.model_copy(update={"files": ["*.json", f"{weights}.safetensors", f"{weights}-*.safetensors"]})


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    return {"pipeline": generate.model_spec(cfg), "controlnet": controlnet_spec(cfg)}


def rules(cfg: RunConfig) -> dict[str, Rule]:
    return {}


def tile_size(cfg: RunConfig) -> int:
    return cfg.upscale.tile_size or generate.model_spec(cfg).default_size


def tile_overlap(cfg: RunConfig) -> int:
    if cfg.upscale.tile_overlap is not None:
        return cfg.upscale.tile_overlap
    return tile_size(cfg) // 8


def _after_product_stage(cfg: RunConfig) -> bool:
    """Whether upscale's image comes from a stage that records where the product is (`product_bbox`)."""
    from tasks import STAGES

    before = cfg.stages[: cfg.stages.index(NAME)] if NAME in cfg.stages else []
    providers = [name for name in before if "image" in STAGES[name].PROVIDES]
    return bool(providers) and "product_bbox" in STAGES[providers[-1]].OUTPUT_SCHEMA.names


def config_faults(cfg: RunConfig) -> list[str]:
    """Tiles the pipelines cannot take, overlaps that leave no tile its own middle, no denoising step."""
    u = cfg.upscale
    problems = []
    size, overlap = tile_size(cfg), tile_overlap(cfg)
    if size % MULTIPLE:
        problems.append(f"upscale.tile_size={size}: must be a multiple of {MULTIPLE} "
                        f"(from {cfg.origin('upscale.tile_size')})")
    if overlap >= size / 2:
        problems.append(f"upscale.tile_overlap={overlap}: must be less than half the tile ({size}) "
                        f"(from {cfg.origin('upscale.tile_overlap')})")
    if u.paste_product == "always" and not _after_product_stage(cfg):
        problems.append("upscale.paste_product=always: the stage before upscale must record the product "
                        f"(style, or another upscale after it) (from {cfg.origin('upscale.paste_product')})")
    if int(u.steps * u.strength) < 1:
        problems.append(f"upscale.strength={u.strength} with upscale.steps={u.steps} leaves no denoising step "
                        f"(steps x strength must be at least 1) (from {cfg.origin('upscale.strength')})")
    return problems


# --- plan -----------------------------------------------------------------------------------------


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's upscaling parameters and key; no model loads."""
    u = cfg.upscale
    n = rows.num_rows
    size, overlap = tile_size(cfg), tile_overlap(cfg)
    sources = catalog_sources(rows)
    columns = {
        "source_image": sources["source_image"],
        "prompt": pc.coalesce(pc.cast(rows.column("prompt"), pa.string()), pa.scalar(u.prompt, pa.string())),
        "negative_prompt": pc.fill_null(column_or_nulls(rows, "negative_prompt", pa.string()), u.negative_prompt),
        "seed": rows.column("seed"),
        "factor": pa.array([None if u.factor == "auto" else u.factor] * n, pa.int32()),
        "paste_product": pa.array([u.paste_product] * n, pa.string()),
        "product_source": pa.nulls(n, pa.string()),
        "input_product_bbox": pa.nulls(n, BBOX),
        "strength": pa.array([u.strength] * n, pa.float64()),
        "controlnet_conditioning_scale": pa.array([u.controlnet_conditioning_scale] * n, pa.float64()),
        "steps": pa.array([u.steps] * n, pa.int32()),
        "guidance_scale": pa.array([u.guidance_scale] * n, pa.float64()),
        "scheduler": pa.array([u.scheduler] * n, pa.string()),
        "tile_size": pa.array([size] * n, pa.int32()),
        "tile_overlap": pa.array([overlap] * n, pa.int32()),
    }
    pipeline, controlnet = models["pipeline"], models["controlnet"]
    fixed = [NAME, VERSION, pipeline.repo, pipeline.revision, pipeline.variant, controlnet.repo, controlnet.revision,
             u.factor, u.paste_product, u.strength, u.controlnet_conditioning_scale, u.steps, u.guidance_scale, u.scheduler,
             size, overlap]
    per_row = [columns["prompt"], columns["negative_prompt"], columns["seed"], sources["source_identity"]]
    keys = pa.array(column_keys(fixed, per_row), pa.string())
    data = {"id": rows.column("id"), "variant": rows.column("variant"), "key": keys, **columns,
            "source_bytes": sources["source_bytes"], "source_identity": sources["source_identity"]}
    return pa.Table.from_pydict(data, schema=PLAN_SCHEMA)


# --- tiles ----------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one side of `length` pixels: as few as cover it with at least
    `overlap` between neighbours, spread evenly so the last one ends exactly at the edge."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(t: np.ndarray) -> np.ndarray:
    """A cosine ramp from 0 to 1 over t in [0, 1]; ramp(t) + ramp(1 - t) == 1."""
    return 0.5 - 0.5 * np.cos(np.pi * t)


def axis_weights(starts: list[int], tile: int, index: int) -> np.ndarray:
    """A tile's blend weights along one side: rising across the overlap with the tile before it,
    falling across the overlap with the tile after it, 1 elsewhere (and at the image's edges).

    Across an overlap shared by two tiles, one rises exactly as the other falls (sampled at pixel
    centres, so no weight is 0), so their weights sum to 1.
    """
    weights = np.ones(tile)
    if index > 0:
        shared = starts[index - 1] + tile - starts[index]
        weights[:shared] *= _ramp((np.arange(shared) + 0.5) / shared)
    if index < len(starts) - 1:
        shared = starts[index] + tile - starts[index + 1]
        weights[tile - shared:] *= 1 - _ramp((np.arange(shared) + 0.5) / shared)
    return weights


@dataclass(frozen=True)
class TileGrid:
    """How an output of `width` x `height` is cut: tiles of `tile_width` x `tile_height` at `boxes`.

    A side no longer than the tile is one tile, rounded up to a multiple of 8 (`padded_*`: the image
    is edge-padded to that and cropped back).
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def padded_width(self) -> int:
        return max(self.width, self.tile_width)

    @property
    def padded_height(self) -> int:
        return max(self.height, self.tile_height)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile, row by row: the tile index is the position here."""
        return [(x, y, x + self.tile_width, y + self.tile_height) for y in self.ys for x in self.xs]

    def weights(self, index: int) -> np.ndarray:
        """Tile `index`'s blend weights, (tile_height, tile_width)."""
        row, column = divmod(index, len(self.xs))
        wy = axis_weights(list(self.ys), self.tile_height, row)
        wx = axis_weights(list(self.xs), self.tile_width, column)
        return np.outer(wy, wx)


def tile_grid(width: int, height: int, tile: int, overlap: int) -> TileGrid:
    """The tiles covering an output of `width` x `height` (see `TileGrid`)."""
    tile_width = tile if width > tile else _round_up(width, MULTIPLE)
    tile_height = tile if height > tile else _round_up(height, MULTIPLE)
    xs, ys = axis_starts(width, tile, overlap), axis_starts(height, tile, overlap)
    return TileGrid(width, height, tile_width, tile_height, tuple(xs), tuple(ys))


class Blend:
    """Tiles accumulated into one image, each weighted by `TileGrid.weights`, normalised at the end."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        self.total = np.zeros((grid.padded_height, grid.padded_width, 3))
        self.weight = np.zeros((grid.padded_height, grid.padded_width, 1))

    def add(self, index: int, tile: np.ndarray) -> None:
        """`tile`: (tile_height, tile_width, 3) floats in [0, 1]."""
        left, top, right, bottom = self.grid.boxes[index]
        weights = self.grid.weights(index)[..., None]
        self.total[top:bottom, left:right] += weights * tile
        self.weight[top:bottom, left:right] += weights

    def result(self) -> np.ndarray:
        """The blended image cropped to the output size, as 8-bit pixels."""
        blended = (self.total / self.weight)[: self.grid.height, : self.grid.width]
        return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def tile_seed(row_seed: int, index: int) -> int:
    """Tile `index`'s noise seed: a function of the row's seed and the index only."""
    return int(stable_hash("tile", row_seed, index)[:16], 16) & MAX_SEED


def upscaled_input(image: Image.Image, grid: TileGrid) -> np.ndarray:
    """The RGB input Lanczos-resized to the grid's output size, then edge-padded to the grid:
    (padded_height, padded_width, 3) uint8."""
    resized = np.asarray(image.convert("RGB").resize((grid.width, grid.height), Image.Resampling.LANCZOS))
    pad = ((0, grid.padded_height - grid.height), (0, grid.padded_width - grid.width), (0, 0))
    return np.pad(resized, pad, mode="edge")


def upscaled_alpha(image: Image.Image, factor: int) -> Image.Image:
    """The alpha channel Lanczos-resized on its own (what an RGBA input keeps)."""
    size = (image.width * factor, image.height * factor)
    return image.getchannel("A").resize(size, Image.Resampling.LANCZOS)


# --- models ---------------------------------------------------------------------------------------


def load_controlnet(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None):
    """A ControlNet model from its folder (safetensors only), once per process."""

    def build():
        from diffusers import ControlNetModel

        model = ControlNetModel.from_pretrained(
            identity.path, dtype=dtype, use_safetensors=True, variant=identity.variant
        )
        return model.to(device).eval()

    key = ("controlnet", identity.repo, identity.revision, device, str(dtype))
    return cached(key, device, build, budget_gb)


def _tiling_vae(vae):
    """The VAE with tiling on, sharing its weights: a shallow copy, so the switch stays off on the
    shared pipeline's VAE (generate's images must not change because an upscale ran in the process).
    Tiling only acts on tiles larger than the VAE's own sample size."""
    view = copy.copy(vae)
    view.enable_tiling()
    return view


def _controlnet_view(pipe, controlnet, scheduler):
    """A ControlNet img2img pipeline over the plain pipeline's modules and the ControlNet."""
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
    )

    components = {**pipe.components, "scheduler": scheduler, "controlnet": controlnet, "vae": _tiling_vae(pipe.vae)}
    if is_sdxl(pipe):
        view = StableDiffusionXLControlNetImg2ImgPipeline(
            **components, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, add_watermarker=False
        )
    else:
        view = StableDiffusionControlNetImg2ImgPipeline(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return view


# --- process --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """A row's product: its box in its cut-out (RGBA, the source's own pixels; read again when the
    row is written, so a shard never holds every row's full-size photo) and its box in the output
    image; `paste` says whether it is put back there."""

    box: Box
    target: Box
    paste: bool

    @property
    def source_scale(self) -> float:
        """The product's size in the output over its size in the cut-out: over 1, the cut-out was enlarged."""
        return max((self.target[2] - self.target[0]) / (self.box[2] - self.box[0]),
                   (self.target[3] - self.target[1]) / (self.box[3] - self.box[1]))


def paste_wanted(mode: str, from_photo: bool) -> bool:
    """Whether a row's product goes back from its cut-out: `auto` only for a catalog photo's product."""
    return mode == "always" or (mode == "auto" and from_photo)


def auto_factor(placed: Box, product: Box) -> int:
    """The smallest factor at which the product's `placed` box reaches its size in the cut-out
    (`product`) on both sides, within 2..4."""
    needed = max((product[2] - product[0]) / (placed[2] - placed[0]), (product[3] - product[1]) / (placed[3] - placed[1]))
    return min(MAX_FACTOR, max(MIN_FACTOR, math.ceil(needed - 1e-9)))


def _read_product(row: dict[str, Any], ctx: StageContext) -> tuple[Image.Image, Box]:
    """The row's cut-out (an upstream image, or the catalog file itself) and the product's box in it."""
    _, cutout = read_planned(row["product_source"], row["source_identity"], None, ctx.store.root, ctx.config.images)
    cutout = cutout.convert("RGBA")
    box = alpha_box(np.asarray(cutout.getchannel("A")))
    if box is None:
        raise ImageLoadError(f"the product's cut-out {row['product_source']} has no pixel more than half opaque")
    return cutout, box


@dataclass
class _Work:
    """One row on its way: its input, its tiles, and the blend that collects them."""

    position: int
    row: dict[str, Any]
    chunks: int
    source: Image.Image
    grid: TileGrid
    product: Product | None = None
    blend: Blend | None = None
    pixels: np.ndarray | None = None  # the upscaled, padded input; made when the first tile needs it
    left: int = 0  # tiles not yet blended
    error: str | None = None
    batch_size: int = 0
    seconds: float = 0.0

    def tile(self, index: int) -> Image.Image:
        if self.pixels is None:
            self.pixels = upscaled_input(self.source, self.grid)
        left, top, right, bottom = self.grid.boxes[index]
        return Image.fromarray(self.pixels[top:bottom, left:right])

    def release(self) -> None:
        self.pixels = None
        self.blend = None
        self.product = None

    def add(self, index: int, tile: np.ndarray) -> None:
        if self.blend is None:
            self.blend = Blend(self.grid)
        self.blend.add(index, tile)


@dataclass(frozen=True)
class _Tile:
    work: _Work
    index: int


def _prepare(position: int, row: dict[str, Any], pipe, ctx: StageContext) -> _Work:
    """A row's input and product, read, its factor decided, and its tile grid; raises ImageLoadError
    for an input it cannot use."""
    source = open_input(row, ctx.store.root, ctx.config.images)
    paste = paste_wanted(row["paste_product"], row["source_identity"] is not None)
    placed = row["input_product_bbox"]
    if paste and row["paste_product"] == "always" and (placed is None or row["product_source"] is None):
        raise ImageLoadError("upscale.paste_product=always, but no product stage before upscale recorded this "
                             "row's product (its box and cut-out)")
    box = None
    if placed is not None and row["product_source"] is not None and (paste or row["factor"] is None):
        _, box = _read_product(row, ctx)
    row["factor"] = row["factor"] or (auto_factor(placed, box) if box is not None else MIN_FACTOR)
    factor = row["factor"]
    product = None if box is None else Product(box, scale_box(tuple(placed), factor), paste)
    grid = tile_grid(source.width * factor, source.height * factor, row["tile_size"], row["tile_overlap"])
    chunks = prompt_chunks(pipe, row["prompt"], row["negative_prompt"])
    return _Work(position, row, chunks, source, grid, product, left=len(grid.boxes))


def _upscale_batch(pipe, controlnet, tiles: list[_Tile], size: int) -> list[np.ndarray]:
    """One ControlNet img2img call over tiles, always `size` wide (padded with the last tile, whose
    result is dropped: see tasks/generate.py `_generate`). Returns each tile as floats in [0, 1]."""
    real = len(tiles)
    tiles = tiles + [tiles[-1]] * (size - real)
    first = tiles[0].work
    row = first.row
    view = _controlnet_view(pipe, controlnet, make_scheduler(row["scheduler"], pipe.scheduler.config))
    images = [tile.work.tile(tile.index) for tile in tiles]
    generators = [torch.Generator("cpu").manual_seed(tile_seed(t.work.row["seed"], t.index)) for t in tiles]
    prompts = prompt_arguments(pipe, [t.work.row["prompt"] for t in tiles],
                               [t.work.row["negative_prompt"] for t in tiles], first.chunks)
    with torch.inference_mode():
        out = view(
            **prompts,
            image=images,
            control_image=images,
            width=first.grid.tile_width,
            height=first.grid.tile_height,
            strength=row["strength"],
            controlnet_conditioning_scale=row["controlnet_conditioning_scale"],
            num_inference_steps=row["steps"],
            guidance_scale=row["guidance_scale"],
            generator=generators,
            output_type="np",
        )
    arrays = list(finite(out.images[:real], pipe.dtype))
    return arrays


def _provenance(row: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """What goes into the PNG: what decides the pixels, nothing that varies by run."""
    pipeline, controlnet = ctx.models["pipeline"], ctx.models["controlnet"]
    return {
        **{k: row[k] for k in ("id", "variant", "key", *RECORDED)},
        "stage": NAME,
        "model": pipeline.repo,
        "model_revision": pipeline.revision,
        "controlnet": controlnet.repo,
        "controlnet_revision": controlnet.revision,
        "device": ctx.device.name,
        "dtype": ctx.dtype_name,
        "catalogen_version": catalogen.__version__,
        **ctx.recipe_entry(row),  # what `catalogen reproduce` makes it again from (inside a run)
    }


def _finish(work: _Work, ctx: StageContext) -> dict[str, Any]:
    """The row's blended image, its alpha put back, written; or the failure of one of its tiles."""
    facts = {"tiles": len(work.grid.boxes), "input_width": work.source.width, "input_height": work.source.height}
    if work.error is not None:
        return {**facts, "status": "failed", "error": work.error}
    row = work.row
    pixels, layer = work.blend.result(), None
    facts.update(_product_facts(work))
    if work.product is not None and work.product.paste:
        try:
            cutout, _ = _read_product(row, ctx)
        except ImageLoadError as exc:
            return {**facts, "status": "failed", "error": str(exc), "product_identical": None}
        layer = product_layer(cutout, (work.grid.width, work.grid.height), work.product.target, work.product.box)
        pixels = composite(layer, pixels)
    image = Image.fromarray(pixels)
    if work.source.mode == "RGBA":
        image.putalpha(upscaled_alpha(work.source, row["factor"]))
    pipeline, controlnet = ctx.models["pipeline"], ctx.models["controlnet"]
    parameters = format_parameters(
        row["prompt"], row["negative_prompt"],
        steps=row["steps"], scheduler=row["scheduler"], guidance_scale=row["guidance_scale"],
        seed=row["seed"], width=image.width, height=image.height,
        model=pipeline.repo, model_hash=pipeline.revision.removeprefix("sha256:")[:10],
        extra={"Denoising strength": row["strength"], "ControlNet": controlnet.repo,
               "ControlNet weight": row["controlnet_conditioning_scale"], "Upscale factor": row["factor"],
               "Tile": f"{row['tile_size']}/{row['tile_overlap']}", "Version": f"catalogen {catalogen.__version__}"},
    )
    data = encode_png(image, parameters, _provenance(row, ctx), source_type(row["source_identity"] is not None))
    if layer is not None and not product_pixels_equal(data, layer):
        return {**facts, "status": "failed", "error": "the product's pixels changed while upscaling",
                "product_identical": False}
    relative = ctx.store.image_path(NAME, row["id"], row["variant"], row["key"])
    try:
        data = sign_stage_image(data, relative, ctx, row=row)  # C2PA, when outputs.credentials is set
        digest = ctx.store.write_image(relative, data)
    except OSError as exc:
        return {**facts, "status": "failed", "error": f"could not write image: {exc}"}
    return {**facts, "status": "ok", "image_path": relative, "image_sha256": digest,
            "image_width": image.width, "image_height": image.height}


def _product_facts(work: _Work) -> dict[str, Any]:
    """Where the product sits in the output and what became of it (see `OUTPUT_SCHEMA`)."""
    product, placed = work.product, work.row["input_product_bbox"]
    if product is None:
        target = None if placed is None else list(scale_box(tuple(placed), work.row["factor"]))
        return {"product_bbox": target, "product_pasted": False, "product_identical": False if target else None}
    return {"product_bbox": list(product.target), "product_pasted": product.paste, "product_identical": product.paste,
            "product_source_scale": product.source_scale}


def _absorb(outcome: Outcome, seconds: float) -> _Work | None:
    """Blend one tile's outcome into its row; the row, once its last tile is in."""
    work, index = outcome.item.work, outcome.item.index
    work.seconds += seconds
    work.batch_size = outcome.batch_size
    if outcome.error is not None and work.error is None:
        work.error = f"tile {index}: {type(outcome.error).__name__}: {outcome.error}"
    elif work.error is None:
        work.add(index, outcome.result)
    work.left -= 1
    return work if work.left == 0 else None


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Upscale one image per planned row; failures are recorded per row, never raised.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, `source_image` and prompts filled from upstream).
        ctx (`StageContext`): the run's settings, the output folder, `models["pipeline"]` and
            `models["controlnet"]`, the device.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Load the plain pipeline (the one generate shares) and the ControlNet, once per process.
    pipeline, controlnet_identity = ctx.models["pipeline"], ctx.models["controlnet"]
    budget = ctx.config.model_memory_gb
    pipe = load_pipeline(pipeline, ctx.device.name, ctx.dtype, budget)
    controlnet = load_controlnet(controlnet_identity, ctx.device.name, ctx.dtype, budget)
    common = {"device": ctx.device.name, "dtype": ctx.dtype_name, "model": pipeline.repo,
              "model_revision": pipeline.revision, "controlnet": controlnet_identity.repo,
              "controlnet_revision": controlnet_identity.revision}

    # 2. Read each row's input and cut its output into tiles; a row whose input cannot be used fails here.
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    results: list[dict[str, Any] | None] = [None] * len(rows)
    groups: list[list[_Tile]] = []  # one row's tiles each: see the module docstring
    for position, row in enumerate(rows):
        try:
            work = _prepare(position, row, pipe, ctx)
        except ImageLoadError as exc:
            results[position] = {**row, **common, "status": "failed", "error": str(exc), "seconds": 0.0,
                                 "finished_at": datetime.now(timezone.utc)}
            continue
        groups.append([_Tile(work, index) for index in range(len(work.grid.boxes))])
    done = sum(r is not None for r in results)
    ctx.progress(done)

    # 3. Run the tiles through the batcher; blend each into its row; write a row once its last tile is in.
    batcher = AdaptiveBatcher(_batch_runner(pipe, controlnet), ctx.config.upscale.batch_size)
    for tiles in groups:
        timer = WorkTimer()  # a model loaded meanwhile is not a row's time
        for outcomes in batcher.run(tiles):
            seconds = timer.elapsed() / len(outcomes)
            complete = []
            for outcome in outcomes:
                work = _absorb(outcome, seconds)
                if work is not None:
                    complete.append(work)
            for work in complete:
                results[work.position] = {
                    **work.row, **common, **_finish(work, ctx),
                    "seconds": work.seconds, "batch_size": work.batch_size, "finished_at": datetime.now(timezone.utc),
                }
                work.release()
            done += len(complete)
            ctx.progress(done)
            timer.restart()
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)


def _batch_runner(pipe, controlnet):
    """The batcher's call: one padded ControlNet img2img call over a batch of tiles."""

    def run(tiles: list[_Tile], size: int) -> list[np.ndarray]:
        return _upscale_batch(pipe, controlnet, tiles, size)

    return run
