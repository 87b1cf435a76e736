"""A score on every final image: the LAION aesthetic rating and the image-prompt CLIP agreement.

Reads: the image of the nearest earlier stage that makes one (`source_image`, a path relative to
the run folder), else the catalog's; and the prompt the image was made from (the nearest earlier
stage that provides one, such as enhance, else the catalog's or the template's).
Writes: per row (no files) `aesthetic`, the LAION aesthetic predictor v2 rating (about 1 to 10: its
MLP head, catalogen.models.aesthetic, over the L2-normalised CLIP image embedding), and `clip`,
100 x the cosine between the image's and the prompt's CLIP embeddings, clamped at 0 (the scale of
caption's `clip_score`; null for a row without a prompt); with the prompt scored against and both
models' identities. In results.parquet they are `score_aesthetic` and `score_clip`.
Key: the CLIP model and the head (repo, resolved revision), `VERSION`, the catalog image's identity
and the base prompt. The pipeline adds the keys of the upstream rows it reads (the image, the prompt).

One CLIP for caption and score (catalogen.models.clip): a run with both loads it once per worker,
and a caption's `clip_score` equals this stage's `clip` for the same image, prompt and model.
Every model call is made at the configured batch size (short batches padded with copies of their
last image), so a row's scores depend on that row alone, not on its batch (up to the float rounding
of the CPU's kernels, which can differ by a row's place in a batch: ~1e-8 in an embedding).

    >>> planned = plan(rows, cfg, {"clip": clip, "head": head})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"clip": clip, "head": head}, device, torch.float32))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field, field_validator

from catalogen.catalog import Rule
from catalogen.config import ModelSpec, RunConfig, Strict, as_model_spec
from catalogen.media.images import ImageLoadError, ImageSettings, catalog_sources, read_planned
from catalogen.models.aesthetic import KIND as HEAD_KIND
from catalogen.models.aesthetic import AestheticHead, load_head
from catalogen.models.clip import KIND as CLIP_KIND
from catalogen.models.clip import (
    PROFILE_CLIP,
    agreement,
    as_rgb,
    image_embeddings,
    load_clip,
    padded,
    text_embeddings,
)
from catalogen.models.loading import ModelIdentity
from catalogen.run.batching import AdaptiveBatcher, Outcome, record_batches
from catalogen.stage import StageContext, output_schema
from catalogen.storage.hashing import column_keys, sha256_bytes

NAME = "score"
POSITION = 65  # after caption, before renditions (catalogen.registry)
# Bump when a change here alters the scores made from the same inputs.
VERSION = 1

READS = ("image", "prompt")
PROVIDES: tuple[str, ...] = ()  # later stages read the results, not a role
FROM_UPSTREAM = {"source_image": ("image", "image_path"), "source_prompt": ("prompt", "prompt")}
MAKES_IMAGES = False
SHARD_ORDER: tuple[str, ...] = ()  # every row shares the models and settings

# The published head (christophschuhmann/improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE),
# as safetensors: a port whose revision adds model.safetensors beside the original pickle, which is never fetched.
_REAL_HEAD = ModelSpec(repo="ttj/sac-logos-ava1-l14-linearMSE", revision="1e77fa05081323d99725fc40a9bf9f88180490e7",
                       kind=HEAD_KIND, files=["model.safetensors"])
_TINY_HEAD = ModelSpec(repo="tiny:aesthetic", kind=HEAD_KIND)
PROFILES: dict[str, dict[str, ModelSpec]] = {
    profile: {"clip": PROFILE_CLIP[profile], "head": _TINY_HEAD if profile.startswith("tiny") else _REAL_HEAD}
    for profile in PROFILE_CLIP
}


class Settings(Strict):
    """Scoring settings, one set for the whole run."""

    clip_model: ModelSpec | None = Field(
        None, description="a CLIP model (Hub id, folder or spec); overrides the profile's, which caption shares. "
        "The aesthetic head needs the embedding width it was trained on (ViT-L/14: 768)",
    )
    aesthetic_model: ModelSpec | None = Field(
        None, description="the aesthetic head's safetensors (Hub id, folder, file or spec); overrides the profile's",
    )
    batch_size: int = Field(
        16, ge=1, le=512,
        description="images per model call, always run at this size so a score does not depend on its "
        "neighbours (short batches are padded); halved on out-of-memory",
    )

    @field_validator("clip_model", mode="before")
    @classmethod
    def _clip_spec(cls, value: Any) -> Any:
        return as_model_spec(value, CLIP_KIND)

    @field_validator("aesthetic_model", mode="before")
    @classmethod
    def _head_spec(cls, value: Any) -> Any:
        return as_model_spec(value, HEAD_KIND)


PLAN_FIELDS = [
    pa.field("source_image", pa.string()),  # relative: an earlier stage's image; absolute: a catalog file; or a URL
    pa.field("source_bytes", pa.large_binary()),  # the catalog's image bytes
    pa.field("source_identity", pa.string()),  # what the key holds of a catalog image (images.image_identity)
    pa.field("source_prompt", pa.string()),  # the prompt the image was made from (handed over from upstream)
]
PLAN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("key", pa.string()),
                         *PLAN_FIELDS])
OUTPUT_SCHEMA = output_schema(
    [
        pa.field("aesthetic", pa.float64()),  # results: score_aesthetic
        pa.field("clip", pa.float64()),  # results: score_clip; null without a prompt
        pa.field("clip_text", pa.string()),  # the prompt the image was scored against
        pa.field("clip_model", pa.string()),
        pa.field("clip_model_revision", pa.string()),
        pa.field("aesthetic_model", pa.string()),
        pa.field("aesthetic_model_revision", pa.string()),
        pa.field("source_image", pa.string()),
        pa.field("source_sha256", pa.string()),  # of the bytes actually read
        pa.field("dtype", pa.string()),
        pa.field("batch_size", pa.int32()),
    ],
    images=False,
)


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    """The CLIP model and the aesthetic head over its image embeddings."""
    s, profile = cfg.score, PROFILES[cfg.profile]
    return {"clip": s.clip_model or profile["clip"], "head": s.aesthetic_model or profile["head"]}


def rules(cfg: RunConfig) -> dict[str, Rule]:
    """No per-row overrides: one pair of models per run."""
    return {}


def config_faults(cfg: RunConfig) -> list[str]:
    """Model specs of the wrong kind (a diffusion pipeline given as the CLIP model, say)."""
    s = cfg.score
    problems = []
    for name, spec, kind in (("clip_model", s.clip_model, CLIP_KIND), ("aesthetic_model", s.aesthetic_model, HEAD_KIND)):
        if spec is not None and spec.kind != kind:
            problems.append(f"score.{name}: kind {spec.kind!r} cannot be used here, expected {kind!r} "
                            f"(from {cfg.origin(f'score.{name}')})")
    return problems


# --- plan -----------------------------------------------------------------------------------------


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's image source and prompt, and its key.

    The key holds both models' identities, `VERSION`, the catalog image's identity and the base
    prompt; an upstream image or prompt is keyed by the pipeline, which chains the upstream rows'
    keys. The batch size changes no score, so it is left out.
    """
    clip, head = models["clip"], models["head"]
    base_prompt = pc.cast(rows.column("prompt"), pa.string())
    columns = {**catalog_sources(rows), "source_prompt": base_prompt}
    fixed: list[Any] = [NAME, VERSION, clip.repo, clip.revision, head.repo, head.revision]
    keys = column_keys(fixed, [columns["source_identity"], base_prompt])
    data = {"id": rows.column("id"), "variant": rows.column("variant"), "key": pa.array(keys, pa.string()), **columns}
    return pa.Table.from_pydict(data, schema=PLAN_SCHEMA)


# --- process --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    position: int
    row: dict[str, Any]


@dataclass
class _Tools:
    """What a batch needs: the loaded models and the run's settings."""

    clip: Any  # (model, processor)
    head: AestheticHead
    device: str
    dtype: torch.dtype
    run_folder: Path
    images: ImageSettings


def _read(job: _Job, tools: _Tools) -> tuple[bytes, Image.Image]:
    row = job.row
    return read_planned(row["source_image"], row["source_identity"], row["source_bytes"], tools.run_folder, tools.images)


def _scores(tools: _Tools, jobs: list[_Job], images: list[Image.Image], size: int) -> list[dict[str, Any]]:
    """Both scores of each image: one CLIP image call, one text call for the rows with a prompt."""
    embeds = image_embeddings(tools.clip, images, size, tools.device, tools.dtype)
    rows = padded(list(range(len(images))), size)  # the head too runs at the batch size
    with torch.inference_mode():
        aesthetic = tools.head(embeds[rows])[:len(images)].tolist()
    texts = [job.row["source_prompt"] or None for job in jobs]
    with_text = [i for i, text in enumerate(texts) if text is not None]
    clip: dict[int, float] = {}
    if with_text:
        text_embeds = text_embeddings(tools.clip, [texts[i] for i in with_text], size, tools.device, tools.dtype)
        clip = dict(zip(with_text, agreement(embeds[with_text], text_embeds)))
    return [{"aesthetic": aesthetic[i], "clip": clip.get(i), "clip_text": texts[i]} for i in range(len(jobs))]


def _run_batch(tools: _Tools, jobs: list[_Job], size: int) -> list[dict[str, Any]]:
    """Score one batch. A row whose image cannot be read fails alone; errors of the models
    themselves raise, so the batcher can halve the batch or retry the rows one by one."""
    records: list[dict[str, Any]] = [{} for _ in jobs]
    ready, images = [], []
    for index, job in enumerate(jobs):
        try:
            data, image = _read(job, tools)
        except ImageLoadError as exc:
            records[index] = {"status": "failed", "error": f"cannot read the image: {exc}"}
            continue
        images.append(as_rgb(image))
        records[index] = {"source_sha256": sha256_bytes(data), "status": "ok"}
        ready.append(index)
    if ready:
        for index, found in zip(ready, _scores(tools, [jobs[i] for i in ready], images, size)):
            records[index] = {**records[index], **found}
    return records


def _batch_runner(tools: _Tools):
    """The batcher's call: padded CLIP calls and the head over one batch of jobs."""

    def run(jobs: list[_Job], size: int) -> list[dict[str, Any]]:
        return _run_batch(tools, jobs, size)

    return run


def _checked_widths(clip: Any, head: AestheticHead, ctx: StageContext) -> None:
    """The head reads the CLIP embedding it was trained on: refuse a mismatch before any row."""
    width = clip[0].config.projection_dim
    if width != head.input_size:
        c, h = ctx.models["clip"], ctx.models["head"]
        raise ValueError(f"score: the aesthetic head {h.short()} takes {head.input_size}-dim embeddings, but the "
                         f"CLIP model {c.short()} makes {width}-dim ones; set score.clip_model to the CLIP it was "
                         "trained on (ViT-L/14 for the LAION head)")


def _common(ctx: StageContext) -> dict[str, Any]:
    """The columns every row of this table shares: model identities, device and dtype."""
    clip, head = ctx.models["clip"], ctx.models["head"]
    return {
        "clip_model": clip.repo,
        "clip_model_revision": clip.revision,
        "aesthetic_model": head.repo,
        "aesthetic_model_revision": head.revision,
        "device": ctx.device.name,
        "dtype": ctx.dtype_name,
    }


def _records(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [{"status": "failed", "error": f"{type(o.error).__name__}: {o.error}"} if o.error is not None else o.result
            for o in outcomes]


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Score one image per planned row; failures are recorded per row.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, image and prompt filled from upstream).
        ctx (`StageContext`): the run's settings (`score:`), the run folder, `models["clip"]` and
            `models["head"]`, the device and dtype.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Load the models (once per process; the CLIP model is caption's when both use the same one).
    budget = ctx.config.model_memory_gb
    clip = load_clip(ctx.models["clip"], ctx.device.name, ctx.dtype, budget)
    head = load_head(ctx.models["head"], ctx.device.name, budget)
    _checked_widths(clip, head, ctx)
    tools = _Tools(clip, head, ctx.device.name, ctx.dtype, ctx.store.root, ctx.config.images)

    # 2. One job per row: every row shares the models, so any rows can share a batch.
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    jobs = [_Job(position, row) for position, row in enumerate(rows)]

    # 3. Run the batches; record every row with the shared columns.
    results: list[dict[str, Any] | None] = [None] * len(rows)
    batcher = AdaptiveBatcher(_batch_runner(tools), ctx.config.score.batch_size)
    record_batches([jobs], batcher, _records, results, _common(ctx), ctx.progress)
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)
