"""Text-to-image generation with Stable Diffusion (SD1.5- and SDXL-shaped pipelines).

`plan` fixes each row's effective parameters and idempotency key without touching a model;
`process` turns planned rows into images and provenance rows.

Reproducibility: each image gets its own CPU `torch.Generator` seeded from its row, so its
starting noise (and an ancestral sampler's noise) depends on that row alone, not on the batch
it lands in, its neighbours, shard, retries or the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

import catalogen
from catalogen.batching import AdaptiveBatcher, Outcome
from catalogen.config import RunConfig
from catalogen.hashing import stable_hash
from catalogen.models import ModelIdentity, load_pipeline, load_safety_checker
from catalogen.pngmeta import encode_png, format_parameters
from catalogen.prompts import encode_sd, encode_sdxl, encoding_chunks, plain_text
from catalogen.schedulers import make_scheduler
from catalogen.stage import StageContext

NAME = "generate"
# Bump when a change here alters the images made from the same inputs: it is part of every key,
# so finished rows are recomputed instead of mixed with results of the old code.
VERSION = 1

PARAM_COLUMNS = ("prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler")
# Rows must agree on these to share a pipeline call (see `_batch_signature`); sharding alike rows
# together keeps the padding of short batches (see `_generate`) to one tail batch of each kind.
BATCH_COLUMNS = ("width", "height", "steps", "guidance_scale", "scheduler")
SHARD_ORDER = (*BATCH_COLUMNS, "negative_prompt")

PLAN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("variant", pa.int32()),
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("scheduler", pa.string()),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    list(PLAN_SCHEMA)
    + [
        ("status", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("batch_size", pa.int32()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("safety_flagged", pa.bool_()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


def safety_mode(cfg: RunConfig) -> str:
    """The effective safety-checker mode: as configured, else flag where the model has a checker."""
    return cfg.generate.safety_checker or ("flag" if cfg.model_for(NAME).has_safety_checker else "off")


# --- plan -----------------------------------------------------------------------------------------


def _column(rows: pa.Table, name: str, default: Any) -> list:
    if name not in rows.column_names:
        return [default] * rows.num_rows
    return [default if v is None else v for v in rows.column(name).to_pylist()]


def plan(rows: pa.Table, cfg: RunConfig, identity: ModelIdentity) -> pa.Table:
    """Each row's effective parameters (row override, else run default) and idempotency key.

    The key hashes exactly what changes the image: parameters, model identity, safety mode and
    this stage's code version. Shards and neighbours do not change an image; the batch size
    changes only its last float bits (see `_generate`) and is a throughput setting, so it is left
    out of the key and recorded per row instead.
    """
    g = cfg.generate
    model = cfg.model_for(NAME)
    size = model.default_size
    columns = {
        "prompt": _column(rows, "prompt", ""),
        "negative_prompt": _column(rows, "negative_prompt", g.negative_prompt),
        "seed": rows.column("row_seed").to_pylist(),
        "width": [int(v) for v in _column(rows, "width", g.width or size)],
        "height": [int(v) for v in _column(rows, "height", g.height or size)],
        "steps": [int(v) for v in _column(rows, "steps", g.steps)],
        "guidance_scale": [float(v) for v in _column(rows, "guidance_scale", g.guidance_scale)],
        "scheduler": _column(rows, "scheduler", g.scheduler),
    }
    fixed = [NAME, VERSION, identity.repo, identity.revision, identity.variant, safety_mode(cfg)]
    keys = [stable_hash(fixed, values) for values in zip(*(columns[c] for c in PARAM_COLUMNS))]
    data = {
        "id": rows.column("id").to_pylist(),
        "variant": rows.column("variant").to_pylist(),
        "key": keys,
        **columns,
    }
    return pa.Table.from_pydict(data, schema=PLAN_SCHEMA)


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
    embeds, pooled = (torch.cat(t) for t in zip(*(encode_sdxl(pipe, p, chunks) for p in positive)))
    if has_negative or not pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = (torch.cat(t) for t in zip(*(encode_sdxl(pipe, n, chunks) for n in negative)))
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
        raise FloatingPointError(f"the pipeline produced NaN or infinite pixels ({pipe.dtype}); try dtype float32")
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]  # as diffusers' "pil" output


def _safety_flags(ctx: StageContext, images: list[Image.Image]) -> list[bool]:
    checker, processor = load_safety_checker(ctx.identity, ctx.device.name, ctx.dtype)
    clip_input = processor(images, return_tensors="pt").pixel_values.to(ctx.device.name, ctx.dtype)
    scratch = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # the checker blanks it
    with torch.inference_mode():
        _, flags = checker(clip_input=clip_input, images=scratch)
    return [bool(f) for f in flags]


def _provenance(row: dict[str, Any], ctx: StageContext, flagged: bool | None) -> dict[str, Any]:
    """What goes into the PNG: everything that decides the pixels, nothing that varies by run
    (timings, batch size), so re-running a row writes a byte-identical file."""
    return {
        **{k: row[k] for k in ("id", "variant", "key", *PARAM_COLUMNS)},
        "stage": NAME,
        "model": ctx.identity.repo,
        "model_revision": ctx.identity.revision,
        "device": ctx.device.name,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "safety_flagged": flagged,
        "catalogen_version": catalogen.__version__,
    }


def _save(job: _Job, image: Image.Image, flagged: bool | None, mode: str, ctx: StageContext) -> dict[str, Any]:
    row = job.row
    if flagged and mode == "withhold":
        return {"status": "failed", "error": "withheld: the safety checker flagged this image", "safety_flagged": True}
    parameters = format_parameters(
        row["prompt"], row["negative_prompt"],
        steps=row["steps"], scheduler=row["scheduler"], guidance_scale=row["guidance_scale"],
        seed=row["seed"], width=row["width"], height=row["height"],
        model=ctx.identity.repo, model_hash=ctx.identity.revision.removeprefix("sha256:")[:10],
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
    """Generate one image per planned row; failures are recorded per row, never raised."""
    pipe = load_pipeline(ctx.identity, ctx.device.name, ctx.dtype)
    mode = safety_mode(ctx.config)
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    groups: dict[tuple, list[_Job]] = {}
    for position, row in enumerate(rows):
        job = _Job(position, row, encoding_chunks(pipe.tokenizer, row["prompt"], row["negative_prompt"]))
        groups.setdefault(_batch_signature(job), []).append(job)

    common = {
        "device": ctx.device.name,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "model": ctx.identity.repo,
        "model_revision": ctx.identity.revision,
    }
    results: list[dict[str, Any] | None] = [None] * len(rows)
    batcher = AdaptiveBatcher(lambda jobs, size: _generate(pipe, jobs, size), ctx.config.generate.batch_size)
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
