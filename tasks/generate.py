"""Text-to-image generation with Stable Diffusion (SD1.5- and SDXL-shaped pipelines).

Reads: the prompt (an earlier stage's, such as enhance, else the catalog's or the template's) and
the per-row overrides `width`, `height`, `steps`, `guidance_scale`, `scheduler`.
Writes: one PNG per row with its provenance, and `prompt`, `seed`, sizes, scheduler, the model's
identity, the safety checker's verdict and the batch size it ran at.
Key: every parameter that decides the pixels, the model (repo, resolved revision, variant), the
safety-checker mode and `VERSION`; the pipeline adds the keys of the upstream rows it read.

Reproducibility: each image gets its own CPU `torch.Generator` seeded from its row, so its
starting noise (and an ancestral sampler's noise) depends on that row alone, not on the batch
it lands in, its neighbours, shard, retries or the device.

    >>> planned = plan(rows, cfg, {"pipeline": identity})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"pipeline": identity}, device, torch.float32))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field, field_validator

import catalogen
from catalogen.batching import AdaptiveBatcher, Outcome
from catalogen.catalog import Rule, column_or_nulls
from catalogen.config import DiffusionSpec, RunConfig, Strict, field_bounds
from catalogen.diffusion import load_pipeline
from catalogen.hashing import column_keys
from catalogen.models import ModelIdentity, cached
from catalogen.pngmeta import encode_png, format_parameters
from catalogen.prompts import encode_sd, encode_sdxl, encoding_chunks, plain_text
from catalogen.schedulers import SCHEDULERS, canonical_scheduler, make_scheduler
from catalogen.stage import SKIP_COLUMN, StageContext, output_schema

NAME = "generate"
# Bump when a change here alters the images made from the same inputs: it is part of every key,
# so finished rows are recomputed instead of mixed with results of the old code.
VERSION = 2

READS = ("prompt",)
PROVIDES = ("image",)
FROM_UPSTREAM = {"prompt": ("prompt", "prompt"), "negative_prompt": ("prompt", "negative_prompt")}
MAKES_IMAGES = True

PROFILES: dict[str, DiffusionSpec] = {
    "tiny": DiffusionSpec(repo="tiny:sd15", kind="sd15", default_size=64, min_size=16, max_size=512,
                          has_safety_checker=True),
    "tiny-sdxl": DiffusionSpec(repo="tiny:sdxl", kind="sdxl", default_size=64, min_size=16, max_size=512),
    "sd15": DiffusionSpec(repo="stable-diffusion-v1-5/stable-diffusion-v1-5", kind="sd15", default_size=512,
                          min_size=256, max_size=1024, has_safety_checker=True),
    "sdxl": DiffusionSpec(repo="stabilityai/stable-diffusion-xl-base-1.0", kind="sdxl", variant="fp16",
                          default_size=1024, min_size=512, max_size=2048),
}

SafetyMode = Literal["off", "flag", "withhold"]


class Settings(Strict):
    """Text-to-image defaults; any catalog row may override the per-image ones."""

    model: DiffusionSpec | None = Field(None, description="overrides the profile's model")
    scheduler: str = Field("euler", description=f"{', '.join(SCHEDULERS)}, or an A1111 / ComfyUI spelling")
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    width: int | None = Field(None, description="defaults to the model's native size")
    height: int | None = None
    negative_prompt: str = ""
    batch_size: int = Field(
        4, ge=1, le=256,
        description="images per pipeline call, always run at this size so results do not depend on "
        "neighbours (short batches are padded); halved on out-of-memory",
    )
    safety_checker: SafetyMode | None = Field(
        None,
        description="off: don't run it; flag: record its verdict and keep the image; withhold: "
        "record it and write no image. Default: flag when the model has one, else off.",
    )

    @field_validator("scheduler")
    @classmethod
    def _canonical(cls, value: str) -> str:
        canonical = canonical_scheduler(value)
        if canonical is None:
            raise ValueError(f"unknown scheduler {value!r}; choose from {', '.join(SCHEDULERS)}")
        return canonical


PLAN_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("source_prompt", pa.string()),  # the prompt before an earlier stage rewrote it
    pa.field("seed", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
]
PLAN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("key", pa.string()),
                         *PLAN_FIELDS])
PARAM_COLUMNS = ("prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler")
OUTPUT_SCHEMA = output_schema(
    [
        *PLAN_FIELDS,
        pa.field("dtype", pa.string()),
        pa.field("model", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("batch_size", pa.int32()),
        pa.field("safety_flagged", pa.bool_()),
    ],
    images=True,
)
# Rows must agree on these to share a pipeline call (see `_batch_signature`); sharding alike rows
# together keeps the padding of short batches (see `_generate`) to one tail batch of each kind.
BATCH_COLUMNS = ("width", "height", "steps", "guidance_scale", "scheduler")
SHARD_ORDER = (*BATCH_COLUMNS, "negative_prompt")


def model_spec(cfg: RunConfig) -> DiffusionSpec:
    return cfg.generate.model or PROFILES[cfg.profile]


def models(cfg: RunConfig) -> dict[str, DiffusionSpec]:
    return {"pipeline": model_spec(cfg)}


def safety_mode(cfg: RunConfig) -> str:
    """The effective safety-checker mode: as configured, else flag where the model has a checker."""
    return cfg.generate.safety_checker or ("flag" if model_spec(cfg).has_safety_checker else "off")


def _size_rule(spec: DiffusionSpec) -> Rule:
    return Rule("int", spec.min_size, spec.max_size, multiple_of=8, limits_note=f"for {spec.repo}")


def rules(cfg: RunConfig) -> dict[str, Rule]:
    """The catalog columns that override this stage's settings per row."""
    size = _size_rule(model_spec(cfg))
    return {
        "width": size,
        "height": size,
        "steps": Rule("int", *field_bounds(Settings, "steps")),
        "guidance_scale": Rule("float", *field_bounds(Settings, "guidance_scale")),
        "scheduler": Rule("str", canonical=canonical_scheduler, choices=SCHEDULERS, what="scheduler"),
    }


def config_faults(cfg: RunConfig) -> list[str]:
    """Run-level settings the model cannot do, checked by the same rules as catalog columns."""
    spec = model_spec(cfg)
    problems = []
    for name in ("width", "height"):
        value = getattr(cfg.generate, name)
        if value is None:
            continue
        rule = _size_rule(spec)
        if value % 8 or not rule.lo <= value <= rule.hi:
            problems.append(f"generate.{name}={value}: must be a multiple of 8 between {spec.min_size} and "
                            f"{spec.max_size} for {spec.repo} (from {cfg.origin(f'generate.{name}')})")
    if cfg.generate.safety_checker not in (None, "off") and not spec.has_safety_checker:
        problems.append(f"generate.safety_checker={cfg.generate.safety_checker}: {spec.repo} has no safety checker "
                        f"(from {cfg.origin('generate.safety_checker')})")
    return problems


# --- plan -----------------------------------------------------------------------------------------


def _filled(rows: pa.Table, name: str, typ: pa.DataType, default: Any) -> pa.Array:
    return pc.fill_null(column_or_nulls(rows, name, typ), pa.scalar(default, typ))


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's effective parameters (row override, else run default) and idempotency key.

    The key hashes exactly what changes the image: parameters, model identity, safety mode and
    this stage's code version. Shards and neighbours do not change an image; the batch size
    changes only its last float bits (see `_generate`) and is a throughput setting, so it is left
    out of the key and recorded per row instead.
    """
    g = cfg.generate
    spec = model_spec(cfg)
    identity = models["pipeline"]
    prompt = pc.cast(rows.column("prompt"), pa.string())
    columns = {
        "prompt": prompt,
        "negative_prompt": _filled(rows, "negative_prompt", pa.string(), g.negative_prompt),
        "source_prompt": prompt,
        "seed": rows.column("seed"),
        "width": _filled(rows, "width", pa.int32(), g.width or spec.default_size),
        "height": _filled(rows, "height", pa.int32(), g.height or spec.default_size),
        "steps": _filled(rows, "steps", pa.int32(), g.steps),
        "guidance_scale": _filled(rows, "guidance_scale", pa.float64(), g.guidance_scale),
        "scheduler": _filled(rows, "scheduler", pa.string(), g.scheduler),
    }
    fixed = [NAME, VERSION, identity.repo, identity.revision, identity.variant, safety_mode(cfg)]
    keys = column_keys(fixed, [columns[c] for c in PARAM_COLUMNS])
    data = {"id": rows.column("id"), "variant": rows.column("variant"), "key": keys, **columns}
    planned = pa.Table.from_pydict(data, schema=PLAN_SCHEMA)
    return planned.append_column(SKIP_COLUMN, _own_image_skips(rows))


def _own_image_skips(rows: pa.Table) -> pa.Array:
    """A row that brings its own image (catalog `image`) skips generation and enters the next stage as is."""
    has_image = pa.array([False] * rows.num_rows)
    for name in ("image", "image_bytes"):
        if name in rows.column_names:
            has_image = pc.or_(has_image, rows.column(name).is_valid())
    reason = pa.scalar("the row brings its own image", pa.string())
    return pc.if_else(has_image, reason, pa.scalar(None, pa.string()))


# --- process --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    position: int
    row: dict[str, Any]
    chunks: int  # 0: the pipeline encodes the prompts itself; else 75-token chunks (see prompts.py)


def _with_scheduler(pipe, scheduler):
    """A pipeline sharing `pipe`'s modules but with its own scheduler (schedulers hold state)."""
    components = {**pipe.components, "scheduler": scheduler}
    if "text_encoder_2" in components:
        extra = dict(force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        extra = dict(requires_safety_checker=False)
    view = type(pipe)(**components, **extra)
    view.set_progress_bar_config(disable=True)
    return view


def _encode_sdxl_all(pipe, texts: list[str], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL embeddings and pooled embeddings of several prompts, stacked along the batch."""
    embeds, pooled = [], []
    for text in texts:
        e, p = encode_sdxl(pipe, text, chunks)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def _conditioning(pipe, jobs: list[_Job]) -> dict[str, Any]:
    """The pipeline's prompt arguments for a batch whose rows share one encoding plan."""
    chunks = jobs[0].chunks
    positive = [job.row["prompt"] for job in jobs]
    negative = [job.row["negative_prompt"] for job in jobs]
    has_negative = bool(negative[0])  # part of the batch signature: all or none have one
    if chunks == 0:
        # None, not "", so SDXL zeroes the unconditional embedding exactly as a plain call does.
        return {"prompt": [plain_text(p) for p in positive],
                "negative_prompt": [plain_text(n) for n in negative] if has_negative else None}
    if "text_encoder_2" not in pipe.components:
        return {"prompt_embeds": torch.cat([encode_sd(pipe, p, chunks) for p in positive]),
                "negative_prompt_embeds": torch.cat([encode_sd(pipe, n, chunks) for n in negative])}
    embeds, pooled = _encode_sdxl_all(pipe, positive, chunks)
    if has_negative or not pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = _encode_sdxl_all(pipe, negative, chunks)
    else:
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}


def _generate(pipe, jobs: list[_Job], size: int) -> list[Image.Image]:
    """One pipeline call, always `size` images wide.

    Kernels pick their blocking by batch shape, so the same row computed in a batch of 1 and of 4
    differs in the last float bits (measured: ~1e-6, now and then one 8-bit level). At a fixed
    shape each row's result does not depend on its neighbours or its place, so a short batch is
    filled up with copies of its last row, whose images are dropped.
    """
    real = len(jobs)
    jobs = jobs + [jobs[-1]] * (size - real)
    first = jobs[0].row
    view = _with_scheduler(pipe, make_scheduler(first["scheduler"], pipe.scheduler.config))
    generators = [torch.Generator("cpu").manual_seed(job.row["seed"]) for job in jobs]
    with torch.inference_mode():
        out = view(
            **_conditioning(pipe, jobs),
            width=first["width"],
            height=first["height"],
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance_scale"],
            generator=generators,
            output_type="np",
        )
    arrays = out.images[:real]
    if not all(np.isfinite(a).all() for a in arrays):
        # Raised for the whole batch, the rows are retried one by one and only the bad one fails.
        hint = "" if pipe.dtype == torch.float32 else "; try dtype float32"
        raise FloatingPointError(f"the pipeline produced NaN or infinite pixels ({pipe.dtype}){hint}")
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]  # as diffusers' "pil" output


def load_safety_checker(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None):
    """The Stable Diffusion safety checker and its image processor from the model's folder (safetensors only)."""

    def build():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = identity.path
        checker = StableDiffusionSafetyChecker.from_pretrained(
            folder, subfolder="safety_checker", dtype=dtype, use_safetensors=True
        )
        processor = CLIPImageProcessor.from_pretrained(folder, subfolder="feature_extractor")
        return checker.to(device).eval(), processor

    return cached(("safety", identity.repo, identity.revision, device, str(dtype)), device, build, budget_gb)


def _safety_flags(ctx: StageContext, images: list[Image.Image]) -> list[bool]:
    checker, processor = load_safety_checker(ctx.models["pipeline"], ctx.device.name, ctx.dtype,
                                             ctx.config.model_memory_gb)
    clip_input = processor(images, return_tensors="pt").pixel_values.to(ctx.device.name, ctx.dtype)
    scratch = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # the checker blanks it
    with torch.inference_mode():
        _, flags = checker(clip_input=clip_input, images=scratch)
    return [bool(f) for f in flags]


def _provenance(row: dict[str, Any], ctx: StageContext, flagged: bool | None) -> dict[str, Any]:
    """What goes into the PNG: everything that decides the pixels, nothing that varies by run
    (timings, batch size), so re-running a row writes a byte-identical file."""
    identity = ctx.models["pipeline"]
    return {
        **{k: row[k] for k in ("id", "variant", "key", "source_prompt", *PARAM_COLUMNS)},
        "stage": NAME,
        "model": identity.repo,
        "model_revision": identity.revision,
        "device": ctx.device.name,
        "dtype": ctx.dtype_name,
        "safety_flagged": flagged,
        "catalogen_version": catalogen.__version__,
    }


def _save(job: _Job, image: Image.Image, flagged: bool | None, mode: str, ctx: StageContext) -> dict[str, Any]:
    row = job.row
    if flagged and mode == "withhold":
        return {"status": "failed", "error": "withheld: the safety checker flagged this image", "safety_flagged": True}
    identity = ctx.models["pipeline"]
    parameters = format_parameters(
        row["prompt"], row["negative_prompt"],
        steps=row["steps"], scheduler=row["scheduler"], guidance_scale=row["guidance_scale"],
        seed=row["seed"], width=row["width"], height=row["height"],
        model=identity.repo, model_hash=identity.revision.removeprefix("sha256:")[:10],
        extra={"Version": f"catalogen {catalogen.__version__}"},
    )
    relative = ctx.store.image_path(NAME, row["id"], row["variant"], row["key"])
    data = encode_png(image, parameters, _provenance(row, ctx, flagged))
    return {
        "status": "ok",
        "image_path": relative,
        "image_sha256": ctx.store.write_image(relative, data),
        "image_width": image.width,
        "image_height": image.height,
        "safety_flagged": flagged,
    }


def _records(outcomes: list[Outcome], mode: str, ctx: StageContext) -> list[dict[str, Any]]:
    """Check, encode and write one batch's images; one result record per row."""
    images = [o.result for o in outcomes if o.error is None]
    flags = iter(_safety_flags(ctx, images) if mode != "off" and images else [])
    records = []
    for outcome in outcomes:
        if outcome.error is not None:
            records.append({"status": "failed", "error": f"{type(outcome.error).__name__}: {outcome.error}"})
            continue
        flagged = next(flags) if mode != "off" else None
        try:
            records.append(_save(outcome.item, outcome.result, flagged, mode, ctx))
        except OSError as exc:
            records.append({"status": "failed", "error": f"could not write image: {exc}"})
    return records


def _batch_signature(job: _Job) -> tuple:
    """Rows that can share one pipeline call without changing each other's image: everything but
    the prompts' text and the seeds must match."""
    row = job.row
    return (*(row[k] for k in BATCH_COLUMNS), bool(row["negative_prompt"]), job.chunks)


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Generate one image per planned row; failures are recorded per row, never raised.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, prompts filled from upstream).
        ctx (`StageContext`): the run's settings, the output folder, `models["pipeline"]`, the device.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Load the pipeline (once per process) and decide the safety-checker mode.
    pipe = load_pipeline(ctx.models["pipeline"], ctx.device.name, ctx.dtype, ctx.config.model_memory_gb)
    mode = safety_mode(ctx.config)

    # 2. Group rows that can share a pipeline call.
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    groups: dict[tuple, list[_Job]] = {}
    for position, row in enumerate(rows):
        job = _Job(position, row, encoding_chunks(pipe.tokenizer, row["prompt"], row["negative_prompt"]))
        groups.setdefault(_batch_signature(job), []).append(job)

    # 3. Run each group through the batcher; write each batch's images and record every row.
    identity = ctx.models["pipeline"]
    common = {"device": ctx.device.name, "dtype": ctx.dtype_name, "model": identity.repo,
              "model_revision": identity.revision}
    results: list[dict[str, Any] | None] = [None] * len(rows)
    batcher = AdaptiveBatcher(_batch_runner(pipe), ctx.config.generate.batch_size)
    done = 0
    for jobs in groups.values():
        started = time.perf_counter()
        for outcomes in batcher.run(jobs):
            records = _records(outcomes, mode, ctx)
            seconds = (time.perf_counter() - started) / len(outcomes)  # batch time, shared by its rows
            finished = datetime.now(timezone.utc)
            for outcome, record in zip(outcomes, records):
                results[outcome.item.position] = {
                    **outcome.item.row, **common, **record,
                    "seconds": seconds, "batch_size": outcome.batch_size, "finished_at": finished,
                }
            done += len(outcomes)
            ctx.progress(done)
            started = time.perf_counter()
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)


def _batch_runner(pipe):
    """The batcher's call: one padded pipeline call over a batch of jobs."""

    def run(jobs: list[_Job], size: int) -> list[Image.Image]:
        return _generate(pipe, jobs, size)

    return run
