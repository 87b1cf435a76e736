"""Image captioning with BLIP-2, and an optional CLIP score of image-text agreement.

Reads: the image of the nearest earlier stage that makes one (`source_image`, a path relative
to the run folder), else the catalog's (a file, a URL or bytes; see catalogen.media.images); and the
prompt the image was made from (the nearest earlier stage that provides one, such as enhance,
else the catalog's or the template's), used only by the CLIP score.
Writes: one caption per row (no files), the model's identity, the prompt it was conditioned on
and, when `caption.clip_score` is on, `clip_score`: CLIPScore's 100 x cosine similarity between
the image and a text (clamped at 0), with the text and the CLIP model's identity.
Key: the BLIP-2 model (repo, resolved revision), prompt, `max_new_tokens`, `num_beams`,
`VERSION`, the catalog image's identity (`catalogen.media.images.image_identity`); with the CLIP score
on, also the CLIP model, which text it compares to and that text. The pipeline adds the keys of
the upstream rows it reads (the image, the prompt).

A caption that is useless as a training label (empty, a word or phrase repeated, no letters, the
prompt echoed back) is recorded with status `degenerate` and the reason in `error`; it counts as
a success, so the row goes on (see `degenerate_reason`).

Reproducibility: decoding is greedy or beam search (no sampling), and every model call is made
at the configured batch size (short batches are padded with copies of their last image), so a
row's caption depends on that row alone, not on the batch it lands in.

    >>> planned = plan(rows, cfg, {"captioner": blip2})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"captioner": blip2}, device, torch.float32))
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field, field_validator

from catalogen.run.batching import AdaptiveBatcher, Outcome, record_batches
from catalogen.catalog import Rule
from catalogen.config import ModelSpec, RunConfig, Strict, as_model_spec
from catalogen.storage.hashing import column_keys, sha256_bytes
from catalogen.media.images import (
    ImageLoadError,
    ImageSettings,
    catalog_sources,
    read_planned,
)
from catalogen.models.clip import KIND as CLIP_KIND
from catalogen.models.clip import PROFILE_CLIP, as_rgb, clip_scores, load_clip, padded
from catalogen.models.loading import ModelIdentity, cached
from catalogen.stage import StageContext, output_schema

NAME = "caption"
POSITION = 60  # in pipeline order (catalogen.registry)
# Bump when a change here alters the captions or scores made from the same inputs.
VERSION = 1

READS = ("image", "prompt")
PROVIDES = ("caption",)
FROM_UPSTREAM = {"source_image": ("image", "image_path"), "source_prompt": ("prompt", "prompt")}
MAKES_IMAGES = False
SHARD_ORDER: tuple[str, ...] = ()  # every row shares one prompt and one set of generation settings

CAPTIONER_KIND = "blip2"
_TINY = ModelSpec(repo="tiny:blip2", kind=CAPTIONER_KIND)
_REAL = ModelSpec(repo="Salesforce/blip2-opt-2.7b", kind=CAPTIONER_KIND)
# Per profile: the captioner, and the CLIP the score stage shares (catalogen.models.clip).
PROFILES: dict[str, dict[str, ModelSpec]] = {
    profile: {"captioner": captioner, "clip": PROFILE_CLIP[profile]}
    for profile, captioner in {"tiny": _TINY, "tiny-sdxl": _TINY, "sd15": _REAL, "sdxl": _REAL}.items()
}

ClipText = Literal["prompt", "base_prompt", "caption"]


class Settings(Strict):
    """Captioning and scoring settings, one set for the whole run."""

    model: ModelSpec | None = Field(None, description="a BLIP-2 model (Hub id, folder or spec); overrides the profile's")
    prompt: str = Field("", description="conditional captioning: the text the caption continues, e.g. 'a photo of'")
    max_new_tokens: int = Field(40, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=16, description="1: greedy decoding; more: beam search")
    batch_size: int = Field(
        8, ge=1, le=256,
        description="images per model call, always run at this size so a caption does not depend on its "
        "neighbours (short batches are padded); halved on out-of-memory",
    )
    clip_score: bool = Field(False, description="also score image-text agreement with CLIP (100 x cosine, >= 0)")
    clip_model: ModelSpec | None = Field(None, description="a CLIP model (Hub id, folder or spec); overrides the profile's")
    clip_text: ClipText = Field(
        "prompt",
        description="what the image is scored against: prompt (the one it was made from: an earlier stage's, "
        "else the base prompt), base_prompt (the catalog's or template's), caption (its own new caption)",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _captioner_spec(cls, value: Any) -> Any:
        return as_model_spec(value, CAPTIONER_KIND)

    @field_validator("clip_model", mode="before")
    @classmethod
    def _clip_spec(cls, value: Any) -> Any:
        return as_model_spec(value, CLIP_KIND)


PLAN_FIELDS = [
    pa.field("source_image", pa.string()),  # relative: an earlier stage's image; absolute: a catalog file; or a URL
    pa.field("source_bytes", pa.large_binary()),  # the catalog's image bytes
    pa.field("source_identity", pa.string()),  # what the key holds of a catalog image (images.image_identity)
    pa.field("source_prompt", pa.string()),  # the prompt the image was made from (handed over from upstream)
    pa.field("base_prompt", pa.string()),  # the catalog's or template's prompt
]
PLAN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("key", pa.string()),
                         *PLAN_FIELDS])
OUTPUT_SCHEMA = output_schema(
    [
        pa.field("caption", pa.string()),
        pa.field("prompt", pa.string()),  # the text the caption continues ("" for none); not part of `caption`
        pa.field("model", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("max_new_tokens", pa.int32()),
        pa.field("num_beams", pa.int32()),
        pa.field("source_image", pa.string()),
        pa.field("source_sha256", pa.string()),  # of the bytes actually read
        pa.field("clip_score", pa.float64()),  # null when the score is off or there is no text
        pa.field("clip_text", pa.string()),
        pa.field("clip_model", pa.string()),
        pa.field("clip_model_revision", pa.string()),
        pa.field("dtype", pa.string()),
        pa.field("batch_size", pa.int32()),
    ],
    images=False,
)


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    """The captioner, and the CLIP model when the score is on."""
    c = cfg.caption
    found = {"captioner": c.model or PROFILES[cfg.profile]["captioner"]}
    if c.clip_score:
        found["clip"] = c.clip_model or PROFILES[cfg.profile]["clip"]
    return found


def rules(cfg: RunConfig) -> dict[str, Rule]:
    """No per-row overrides: one prompt and one set of generation settings per run."""
    return {}


def config_faults(cfg: RunConfig) -> list[str]:
    """Model specs of the wrong kind (a diffusion pipeline given as the captioner, say)."""
    c = cfg.caption
    problems = []
    for name, spec, kind in (("model", c.model, CAPTIONER_KIND), ("clip_model", c.clip_model, CLIP_KIND)):
        if spec is not None and spec.kind != kind:
            problems.append(f"caption.{name}: kind {spec.kind!r} cannot be used here, expected {kind!r} "
                            f"(from {cfg.origin(f'caption.{name}')})")
    return problems


# --- degenerate captions --------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")  # runs of letters or digits, in any script
MAX_RUN_PHRASE = 4  # the longest phrase checked for back-to-back repeats
RUN_REPEATS = 3


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _repeated_run(words: list[str]) -> str | None:
    """The first phrase of 1-4 words said three or more times back to back, or None."""
    for length in range(1, MAX_RUN_PHRASE + 1):
        span = length * RUN_REPEATS
        for start in range(len(words) - span + 1):
            phrase = words[start:start + length]
            if all(words[start + k * length:start + (k + 1) * length] == phrase for k in range(1, RUN_REPEATS)):
                return " ".join(phrase)
    return None


def _dominant_word(words: list[str]) -> str | None:
    """A word that makes up more than half of the caption's words (and occurs twice at least), or None."""
    if not words:
        return None
    word, count = Counter(words).most_common(1)[0]
    return word if count >= 2 and count * 2 > len(words) else None


def degenerate_reason(caption: str, prompt: str = "") -> str | None:
    """Why a caption is useless as a training label, or None when it is not.

    Flags: an empty caption; one with no letters (only digits, punctuation or symbols); the
    prompt echoed back with nothing new (`caption` is what the model added after `prompt`);
    a word or phrase of up to four words said three times in a row ("counter counter counter");
    one word making up more than half of the words ("a a dog", "mug mug"). Case and punctuation
    are ignored when comparing words. A short caption ("a mug") is not flagged for being short.
    """
    text = caption.strip()
    if not text:
        return "empty caption"
    if not any(ch.isalpha() for ch in text):
        return f"no words, only digits, punctuation or symbols: {text[:80]!r}"
    words = _words(text)
    prompt_words = _words(prompt)
    if prompt_words and words == prompt_words:
        return f"the prompt {prompt!r} echoed back with nothing new"
    run = _repeated_run(words)
    if run is not None:
        return f"{run!r} repeated {RUN_REPEATS}+ times in a row"
    dominant = _dominant_word(words)
    if dominant is not None:
        return f"{dominant!r} is more than half of the words"
    return None


# --- plan -----------------------------------------------------------------------------------------


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's image source and prompts, and its key.

    The key holds the captioner's identity, the generation settings, the catalog image's identity
    (its bytes' SHA-256, or its file's path, size and time) and, with the CLIP score on, the CLIP
    model, the text source and the text as planned. An upstream image and an upstream prompt are
    keyed by the pipeline, which chains the upstream rows' keys. The batch size changes no
    caption, so it is left out.
    """
    c = cfg.caption
    captioner = models["captioner"]
    base_prompt = pc.cast(rows.column("prompt"), pa.string())
    columns = {
        **catalog_sources(rows),
        "source_prompt": base_prompt,
        "base_prompt": base_prompt,
    }
    fixed: list[Any] = [NAME, VERSION, captioner.repo, captioner.revision, c.prompt, c.max_new_tokens, c.num_beams]
    per_row = [columns["source_identity"]]
    if c.clip_score:
        clip = models["clip"]
        fixed += ["clip", clip.repo, clip.revision, c.clip_text]
        if c.clip_text != "caption":
            per_row.append(base_prompt)
    keys = column_keys(fixed, per_row)
    data = {"id": rows.column("id"), "variant": rows.column("variant"), "key": pa.array(keys, pa.string()), **columns}
    return pa.Table.from_pydict(data, schema=PLAN_SCHEMA)


# --- process --------------------------------------------------------------------------------------


def load_captioner(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None):
    """A BLIP-2 model and its processor from the model's folder (safetensors only), once per process."""

    def build():
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        processor = Blip2Processor.from_pretrained(identity.path)
        if processor.num_query_tokens is None:
            # Without it the processor adds no image tokens, and `generate` silently ignores the image.
            raise ValueError(f"{identity.repo}: its processor_config.json has no num_query_tokens (an old "
                             "revision of the model); use a newer revision")
        model = Blip2ForConditionalGeneration.from_pretrained(identity.path, dtype=dtype, use_safetensors=True)
        # A decoder-only model continues from the right end of each prompt.
        processor.tokenizer.padding_side = "left"
        return model.to(device).eval(), processor

    return cached((CAPTIONER_KIND, identity.repo, identity.revision, device, str(dtype)), device, build, budget_gb)


def read_image(row: Mapping[str, Any], run_folder: Path, settings: ImageSettings) -> tuple[bytes, Image.Image]:
    """The bytes and decoded image a row captions (raises ImageLoadError with the reason)."""
    return read_planned(row["source_image"], row["source_identity"], row["source_bytes"], run_folder, settings)


@dataclass(frozen=True)
class _Job:
    position: int
    row: dict[str, Any]


@dataclass
class _Tools:
    """What a batch needs: the loaded models and the run's settings."""

    captioner: Any  # (model, processor)
    clip: Any | None  # (model, processor), or None when the score is off
    settings: Settings
    device: str
    dtype: torch.dtype
    run_folder: Path
    images: ImageSettings


def _captions(tools: _Tools, images: list[Image.Image], size: int) -> list[str]:
    """One BLIP-2 call over `size` images (short lists padded); only the new tokens are decoded."""
    model, processor = tools.captioner
    s = tools.settings
    real = len(images)
    batch = padded(images, size)
    inputs = processor(images=batch, text=[s.prompt] * size, return_tensors="pt", padding=True)
    inputs = inputs.to(tools.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(tools.dtype)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False)
    new = ids[:real, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def _clip_text(row: dict[str, Any], caption: str, source: ClipText) -> str | None:
    text = {"prompt": row["source_prompt"], "base_prompt": row["base_prompt"], "caption": caption}[source]
    return text if text else None


def _scored(tools: _Tools, jobs: list[_Job], images: list[Image.Image], captions: list[str],
            size: int) -> list[dict[str, Any]]:
    """The CLIP columns of each row (all null when the score is off or a row has no text)."""
    if tools.clip is None:
        return [{} for _ in jobs]
    texts = [_clip_text(job.row, caption, tools.settings.clip_text) for job, caption in zip(jobs, captions)]
    with_text = [i for i, text in enumerate(texts) if text is not None]
    scores: dict[int, float] = {}
    if with_text:
        found = clip_scores(tools.clip, [images[i] for i in with_text], [texts[i] for i in with_text], size,
                            tools.device, tools.dtype)
        scores = dict(zip(with_text, found))
    return [{"clip_score": scores.get(i), "clip_text": texts[i]} for i in range(len(jobs))]


def _caption_record(caption: str, prompt: str) -> dict[str, Any]:
    reason = degenerate_reason(caption, prompt)
    return {"caption": caption, "status": "ok" if reason is None else "degenerate", "error": reason}


def _run_batch(tools: _Tools, jobs: list[_Job], size: int) -> list[dict[str, Any]]:
    """Caption (and score) one batch. A row whose image cannot be read fails alone; errors of the
    models themselves raise, so the batcher can halve the batch or retry the rows one by one."""
    records: list[dict[str, Any]] = [{} for _ in jobs]
    ready, images = [], []
    for index, job in enumerate(jobs):
        try:
            data, image = read_image(job.row, tools.run_folder, tools.images)
        except ImageLoadError as exc:
            records[index] = {"status": "failed", "error": f"cannot read the image: {exc}"}
            continue
        images.append(as_rgb(image))
        records[index] = {"source_sha256": sha256_bytes(data)}
        ready.append(index)
    if not ready:
        return records
    ready_jobs = [jobs[i] for i in ready]
    captions = _captions(tools, images, size)
    scored = _scored(tools, ready_jobs, images, captions, size)
    for index, caption, clip in zip(ready, captions, scored):
        records[index] = {**records[index], **_caption_record(caption, tools.settings.prompt), **clip}
    return records


def _batch_runner(tools: _Tools):
    """The batcher's call: one padded model call (or two, with CLIP) over a batch of jobs."""

    def run(jobs: list[_Job], size: int) -> list[dict[str, Any]]:
        return _run_batch(tools, jobs, size)

    return run


def _common(ctx: StageContext) -> dict[str, Any]:
    """The columns every row of this table shares: settings and model identities."""
    s = ctx.config.caption
    captioner = ctx.models["captioner"]
    clip = ctx.models.get("clip") if s.clip_score else None
    return {
        "prompt": s.prompt,
        "model": captioner.repo,
        "model_revision": captioner.revision,
        "max_new_tokens": s.max_new_tokens,
        "num_beams": s.num_beams,
        "clip_model": clip.repo if clip else None,
        "clip_model_revision": clip.revision if clip else None,
        "device": ctx.device.name,
        "dtype": ctx.dtype_name,
    }


def _failed(outcome: Outcome) -> dict[str, Any]:
    return {"status": "failed", "error": f"{type(outcome.error).__name__}: {outcome.error}"}


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Caption (and optionally score) one image per planned row; failures are recorded per row.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, image and prompt filled from upstream).
        ctx (`StageContext`): the run's settings (`caption:`), the run folder, `models["captioner"]`
            (and `models["clip"]` with the score on), the device and dtype.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Load the models (once per process).
    s = ctx.config.caption
    budget = ctx.config.model_memory_gb
    captioner = load_captioner(ctx.models["captioner"], ctx.device.name, ctx.dtype, budget)
    clip = load_clip(ctx.models["clip"], ctx.device.name, ctx.dtype, budget) if s.clip_score else None
    tools = _Tools(captioner, clip, s, ctx.device.name, ctx.dtype, ctx.store.root, ctx.config.images)

    # 2. One job per row: every row shares the prompt and settings, so any rows can share a batch.
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    jobs = [_Job(position, row) for position, row in enumerate(rows)]

    # 3. Run the batches; record every row with the shared columns.
    common = _common(ctx)
    def records(outcomes: list[Outcome]) -> list[dict[str, Any]]:
        return [_failed(outcome) if outcome.error is not None else outcome.result for outcome in outcomes]

    results: list[dict[str, Any] | None] = [None] * len(rows)
    batcher = AdaptiveBatcher(_batch_runner(tools), s.batch_size)
    record_batches([jobs], batcher, records, results, common, ctx.progress)
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)
