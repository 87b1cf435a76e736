"""Text-to-image generation with Stable Diffusion (SD1.5- and SDXL-shaped pipelines).

Reads: the prompt (an earlier stage's, such as enhance, else the catalog's or the template's) and
the per-row overrides `width`, `height`, `steps`, `guidance_scale`, `scheduler`.
Writes: one PNG per row with its provenance, and `prompt`, `seed`, sizes, scheduler, the model's
identity, the safety checker's verdict, the batch size it ran at, the LoRAs and embeddings it
loaded (file sha256, weight, token), and `notes` (e.g. a prompt naming an embedding not loaded).
Key: every parameter that decides the pixels, the model (repo, resolved revision, variant), the
safety-checker mode and `VERSION`; with add-ons, every file's sha256, each LoRA's name and weight
and each embedding's token. The pipeline adds the keys of the upstream rows it read.

Add-ons (`generate.loras`, `generate.embeddings`, a `.safetensors` checkpoint as `generate.model.repo`)
are resolved like models (one `lora.<name>` / `embedding.<n>` role each, recorded in run.json) and
checked before the run: pickles (`.ckpt`, `.bin`, `.pt`, `.pth`) are refused, since loading one can
run code. What each add-on is and how its file is found and read: catalogen/models/loaders.py.

Reproducibility: each image gets its own CPU `torch.Generator` seeded from its row, so its
starting noise (and an ancestral sampler's noise) depends on that row alone, not on the batch
it lands in, its neighbours, shard, retries or the device.

    >>> planned = plan(rows, cfg, {"pipeline": identity})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"pipeline": identity}, device, torch.float32))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field

import catalogen
from catalogen.run.batching import AdaptiveBatcher, Outcome, record_batches
from catalogen.catalog import Rule, column_or_nulls
from catalogen.models.conditioning import prompt_arguments
from catalogen.media.credentials import sign_stage_image
from catalogen.config import DiffusionSpec, ModelSpec, RunConfig, Strict, field_bounds
from catalogen.models.diffusion import (
    SAFETENSORS,
    Adapters,
    SingleFile,
    file_digests,
    finite,
    load_pipeline,
    stop_between_steps,
)
from catalogen.storage.hashing import canonical_json, column_keys
from catalogen.models.loaders import (  # LoRAs, textual inversion, single-file checkpoints
    _HUB_ID,
    _NETWORK_TAG,
    CONFIG_FILES,
    EMBEDDING_DEFAULT_FILE,
    EmbeddingSpec,
    Extras,
    LoraSpec,
    _config_digest,
    _embedding,
    _location_faults,
    _lora,
    _pickle_fault,
    _repeated,
    _Unusable,
    _weight_file,
    unloaded_embeddings,
)
from catalogen.models.loading import (
    TINY_PREFIX,
    MissingModelsError,
    ModelError,
    ModelIdentity,
    cached,
)
from catalogen.media.pngmeta import encode_png, format_parameters
from catalogen.models.prompts import encoding_chunks
from catalogen.models.schedulers import (
    SCHEDULER_HELP,
    SCHEDULERS,
    SchedulerName,
    canonical_scheduler,
    make_scheduler,
)
from catalogen.stage import SKIP_COLUMN, StageContext, output_schema
from catalogen.models.tiny.profile import ensure_tiny

NAME = "generate"
POSITION = 20  # in pipeline order (catalogen.registry)
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


class ModelSettings(DiffusionSpec):
    """The pipeline: a diffusers folder or Hub repo, or one original-layout `.safetensors` checkpoint."""

    config: str | None = Field(
        None,
        description="for a single-file checkpoint: the diffusers folder, Hub repo or tiny:<name> whose configuration "
        "(and tokenizer) it loads with; default the profile's base model of the same kind",
    )


class Settings(Strict):
    """Text-to-image defaults; any catalog row may override the per-image ones."""

    model: ModelSettings | None = Field(None, description="overrides the profile's model")
    loras: tuple[LoraSpec, ...] = Field((), description="LoRA adapters, applied together at their weights")
    embeddings: tuple[EmbeddingSpec, ...] = Field((), description="textual-inversion embeddings, by token")
    scheduler: SchedulerName = Field("euler", description=SCHEDULER_HELP)
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
    # The run's add-ons, the same in every row (null when none), as JSON text: a list of
    # {name, path, weight_name, weight, sha256} (LoRAs) and {token, path, weight_name, sha256} (embeddings).
    pa.field("loras", pa.string()),
    pa.field("embeddings", pa.string()),
    pa.field("model_sha256", pa.string()),  # a single-file checkpoint's sha256 (null for a diffusers folder)
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
        pa.field("notes", pa.string()),  # what to know about a row that still succeeded (e.g. an unloaded embedding)
    ],
    images=True,
)
# Rows must agree on these to share a pipeline call (see `_batch_signature`); sharding alike rows
# together keeps the padding of short batches (see `_generate`) to one tail batch of each kind.
BATCH_COLUMNS = ("width", "height", "steps", "guidance_scale", "scheduler")
SHARD_ORDER = (*BATCH_COLUMNS, "negative_prompt")

log = logging.getLogger("catalogen.generate")


def model_spec(cfg: RunConfig) -> DiffusionSpec:
    return cfg.generate.model or PROFILES[cfg.profile]


def is_single_file(spec: DiffusionSpec) -> bool:
    return spec.repo.endswith(SAFETENSORS)


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    """The pipeline, and every LoRA (`lora.<name>`) and embedding (`embedding.<n>`) file it loads."""
    found: dict[str, ModelSpec] = {"pipeline": model_spec(cfg)}
    for lora in cfg.generate.loras:  # from a Hub repo, only the named file
        found[f"lora.{lora.adapter_name()}"] = ModelSpec(repo=lora.path, kind="lora", revision=lora.revision,
                                                         files=_named(lora.weight_name))
    for index, embedding in enumerate(cfg.generate.embeddings):
        found[f"embedding.{index}"] = ModelSpec(repo=embedding.path, kind="embedding", revision=embedding.revision,
                                                files=_named(embedding.weight_name))
    return found


def _named(weight_name: str | None) -> list[str] | None:
    return None if weight_name is None else [weight_name]


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
    """Run-level settings the model cannot do, checked by the same rules as catalog columns;
    and every model, LoRA or embedding file that is a pickle or is not there."""
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
    problems += _model_faults(cfg)
    problems += _adapter_faults(cfg)
    return problems


# --- single-file checkpoints, LoRAs, embeddings: pre-run checks -----------------------------------


def _adapter_faults(cfg: RunConfig) -> list[str]:
    """Every LoRA and embedding: no pickles, sources that exist, names and tokens used once."""
    problems = []
    kind = model_spec(cfg).kind
    for group, items, tiny_prefix in (("loras", cfg.generate.loras, "lora-"),
                                      ("embeddings", cfg.generate.embeddings, "ti-")):
        for index, item in enumerate(items):
            setting = f"generate.{group}.{index}"
            pickles = _pickle_fault(f"{setting}.path", item.path, cfg) + _pickle_fault(
                f"{setting}.weight_name", item.weight_name, cfg)
            problems += pickles or _location_faults(setting, item.path, item.weight_name, tiny_prefix, cfg)
            tiny_kind = item.path.removeprefix(TINY_PREFIX).removeprefix(tiny_prefix)
            if item.path.startswith(TINY_PREFIX) and tiny_kind in ("sd15", "sdxl") and tiny_kind != kind:
                problems.append(f"{setting}.path={item.path}: made for {tiny_kind}, but the model is {kind}-shaped "
                                f"(from {cfg.origin(setting)})")
    problems += _repeated("generate.loras", [lora.adapter_name() for lora in cfg.generate.loras], "name", cfg)
    tokens = [e.token for e in cfg.generate.embeddings if e.token]
    problems += _repeated("generate.embeddings", tokens, "token", cfg)
    return problems


def _default_config(cfg: RunConfig, kind: str) -> str:
    """The configuration a single-file checkpoint loads with: the profile's base model of its kind."""
    if PROFILES[cfg.profile].kind == kind:
        return PROFILES[cfg.profile].repo
    return f"{TINY_PREFIX}{kind}" if cfg.profile.startswith("tiny") else PROFILES[kind].repo


def single_file_config(cfg: RunConfig) -> str:
    spec = model_spec(cfg)
    return getattr(spec, "config", None) or _default_config(cfg, spec.kind)


def _model_faults(cfg: RunConfig) -> list[str]:
    """The configured model: never a pickle; a single-file checkpoint is a local file with a usable configuration."""
    if cfg.generate.model is None:
        return []
    spec = cfg.generate.model
    setting = "generate.model.repo"
    origin = f"(from {cfg.origin(setting)})"
    problems = _pickle_fault(setting, spec.repo, cfg)
    if problems:
        return problems
    if not is_single_file(spec):
        if spec.config is not None:
            problems.append(f"generate.model.config={spec.config}: only a single-file (.safetensors) checkpoint takes "
                            f"a config; {spec.repo} is a diffusers model (from {cfg.origin('generate.model.config')})")
        return problems
    if not Path(spec.repo).expanduser().is_file():
        problems.append(f"{setting}={spec.repo}: a single-file checkpoint must be a local file, and there is none; "
                        f"download it first (e.g. `huggingface-cli download OWNER/REPO FILE.safetensors`) {origin}")
    if spec.has_safety_checker:
        problems.append(f"generate.model.has_safety_checker: a single-file checkpoint brings no safety checker; set "
                        f"it to false (from {cfg.origin('generate.model.has_safety_checker')})")
    config = single_file_config(cfg)
    config_origin = f"(from {cfg.origin('generate.model.config')})"
    if config.startswith(TINY_PREFIX):
        if config[len(TINY_PREFIX):] not in ("sd15", "sdxl"):
            problems.append(f"generate.model.config={config}: choose tiny:sd15 or tiny:sdxl {config_origin}")
    elif Path(config).expanduser().is_dir():
        if not (Path(config).expanduser() / "model_index.json").is_file():
            problems.append(f"generate.model.config={config}: not a diffusers pipeline folder (no model_index.json) "
                            f"{config_origin}")
    elif not _HUB_ID.fullmatch(config):
        problems.append(f"generate.model.config={config}: no such folder, and not a Hub repo id (owner/name) "
                        f"{config_origin}")
    return problems


# --- single-file checkpoints, LoRAs, embeddings: resolved to files --------------------------------


def _config_folder(config: str, cfg: RunConfig) -> Path:
    """A local folder holding the configuration a single-file checkpoint loads with (Hub: configs only)."""
    if config.startswith(TINY_PREFIX):
        return ensure_tiny(config[len(TINY_PREFIX):], cfg.resolved_cache_dir())
    local = Path(config).expanduser()
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    offline = cfg.is_offline()
    try:
        return Path(snapshot_download(config, allow_patterns=list(CONFIG_FILES), local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - the hub client raises several kinds for "not cached"
        if offline:
            raise MissingModelsError([f"{config} (the configuration of {model_spec(cfg).repo})"]) from exc
        raise


def resolve_extras(cfg: RunConfig, identities: Mapping[str, ModelIdentity]) -> Extras:
    """The run's checkpoint file, LoRAs and embeddings as local files with their hashes; no weights loaded.

    Raises `ModelError` naming every add-on whose folder holds no usable file (called by `plan`,
    so a run is refused before anything is written).
    """
    spec = model_spec(cfg)
    single = None
    if is_single_file(spec):
        path = identities["pipeline"].path
        folder = _config_folder(single_file_config(cfg), cfg)
        single = SingleFile(path, file_digests(path)[0], str(folder), _config_digest(folder))
    problems: list[str] = []
    loras = []
    for index, lora in enumerate(cfg.generate.loras):
        try:
            loras.append(_lora(lora, identities[f"lora.{lora.adapter_name()}"], f"generate.loras.{index} ({lora.path})"))
        except _Unusable as exc:
            problems.append(str(exc))
    embeddings = []
    for index, embedding in enumerate(cfg.generate.embeddings):
        label = f"generate.embeddings.{index} ({embedding.path})"
        try:
            file = _weight_file(identities[f"embedding.{index}"], embedding.weight_name, EMBEDDING_DEFAULT_FILE, label)
            embeddings.append(_embedding(embedding, file, spec.kind, label))
        except _Unusable as exc:
            problems.append(str(exc))
    problems += _repeated("generate.embeddings", [e.token for e in embeddings], "token", cfg)
    if problems:
        raise ModelError(problems)
    return Extras(single, Adapters(tuple(loras), tuple(embeddings)))


def _extras_columns(cfg: RunConfig, extras: Extras) -> dict[str, str | None]:
    """The provenance columns every planned row carries (JSON text, null when there is nothing to list)."""
    loras = []
    for spec, lora in zip(cfg.generate.loras, extras.adapters.loras):
        loras.append({"name": lora.name, "path": spec.path, "weight_name": spec.weight_name, "weight": lora.weight,
                      "sha256": lora.sha256})
    embeddings = []
    for spec, embedding in zip(cfg.generate.embeddings, extras.adapters.embeddings):
        embeddings.append({"token": embedding.token, "path": spec.path, "weight_name": spec.weight_name,
                           "sha256": embedding.sha256})
    return {
        "loras": canonical_json(loras) if loras else None,
        "embeddings": canonical_json(embeddings) if embeddings else None,
        "model_sha256": extras.single_file.sha256 if extras.single_file else None,
    }


# --- plan -----------------------------------------------------------------------------------------


def _filled(rows: pa.Table, name: str, typ: pa.DataType, default: Any) -> pa.Array:
    return pc.fill_null(column_or_nulls(rows, name, typ), pa.scalar(default, typ))


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's effective parameters (row override, else run default) and idempotency key.

    The key hashes exactly what changes the image: parameters, model identity, safety mode and
    this stage's code version; with a single-file checkpoint, LoRAs or embeddings, also each
    file's sha256, each LoRA's name and weight and each embedding's token. Shards and neighbours
    do not change an image; the batch size changes only its last float bits (see `_generate`) and
    is a throughput setting, so it is left out of the key and recorded per row instead.

    Raises `ModelError` when a LoRA's or embedding's folder holds no usable file (see `resolve_extras`).
    """
    g = cfg.generate
    spec = model_spec(cfg)
    identity = models["pipeline"]
    extras = resolve_extras(cfg, models)
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
    for name, value in _extras_columns(cfg, extras).items():
        columns[name] = pa.repeat(pa.scalar(value, pa.string()), rows.num_rows)
    fixed = [NAME, VERSION, identity.repo, identity.revision, identity.variant, safety_mode(cfg)]
    if extras:  # only then: keys of runs without add-ons stay as they were
        fixed.append(extras.fingerprint())
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
    texts: tuple[str, str]  # prompt and negative prompt as our own encoding reads them (see `_job`)


@dataclass(frozen=True)
class _Run:
    """What writing a row's image needs besides the row."""

    ctx: StageContext
    mode: str  # the safety checker's
    extras: Extras


def _job(position: int, row: dict[str, Any], pipe, extras: Extras) -> _Job:
    """A row and how its prompts are encoded.

    The pipeline spells an embedding of n vectors out as n tokens (`<tok> <tok>_1 …`) in its own
    encoding; prompts that need ours (long or weighted, see prompts.py) are spelt out here, so they
    get every vector and their length is counted right.
    """
    texts = (row["prompt"], row["negative_prompt"])
    if extras.adapters.embeddings:
        tokenizer = pipe.tokenizer
        texts = (pipe.maybe_convert_prompt(texts[0], tokenizer), pipe.maybe_convert_prompt(texts[1], tokenizer))
    return _Job(position, row, encoding_chunks(pipe.tokenizer, *texts), texts)


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
    """The pipeline's prompt arguments for a batch whose rows share one encoding plan.

    Prompts the pipeline encodes itself go as written; those catalogen encodes (long or weighted)
    go with their embeddings' multi-vector tokens spelled out (`job.texts`).
    """
    chunks = jobs[0].chunks
    if chunks == 0:
        positive = [job.row["prompt"] for job in jobs]
        negative = [job.row["negative_prompt"] for job in jobs]
    else:
        positive = [job.texts[0] for job in jobs]
        negative = [job.texts[1] for job in jobs]
    return prompt_arguments(pipe, positive, negative, chunks)


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
            callback_on_step_end=stop_between_steps,
        )
    arrays = finite(out.images[:real], pipe.dtype)
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]  # as diffusers' "pil" output


def load_safety_checker(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None):
    """The Stable Diffusion safety checker and its image processor from the model's folder (safetensors only)."""

    def build():
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
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


def _provenance(row: dict[str, Any], run: _Run, flagged: bool | None) -> dict[str, Any]:
    """What goes into the PNG: everything that decides the pixels, nothing that varies by run
    (timings, batch size), so re-running a row writes a byte-identical file."""
    ctx = run.ctx
    identity = ctx.models["pipeline"]
    provenance = {
        **{k: row[k] for k in ("id", "variant", "key", "source_prompt", *PARAM_COLUMNS)},
        "stage": NAME,
        "model": identity.repo,
        "model_revision": identity.revision,
        "device": ctx.device.name,
        "dtype": ctx.dtype_name,
        "safety_flagged": flagged,
        "catalogen_version": catalogen.__version__,
        **ctx.recipe_entry(row),  # what `catalogen reproduce` makes it again from (inside a run)
    }
    # Only when present, so the files of runs without add-ons stay byte-identical to before.
    for name in ("loras", "embeddings"):
        if row[name]:
            provenance[name] = json.loads(row[name])
    if row["model_sha256"]:
        provenance["model_sha256"] = row["model_sha256"]
    return provenance


def _a1111_parameters(row: dict[str, Any], run: _Run) -> str:
    """The A1111 `parameters` text, with LoRAs and embeddings as A1111 writes them.

    A1111 keeps `<lora:name:weight>` in the prompt it records (pasting it back loads the LoRA) and
    lists `Lora hashes` (kohya's tensor-data hash, 12 digits) and `TI hashes` (file sha256, 12
    digits), which sites such as Civitai use to link the resources; `Model hash` is the first 10
    digits of a checkpoint file's sha256.
    """
    identity = run.ctx.models["pipeline"]
    adapters = run.extras.adapters
    prompt = row["prompt"]
    extra: dict[str, Any] = {}
    if adapters.loras:
        tags, hashes = [], []
        for lora in adapters.loras:
            tags.append(f"<lora:{lora.name}:{lora.weight:g}>")
            hashes.append(f"{lora.name}: {lora.a1111_hash}")
        prompt = " ".join([prompt, *tags])
        extra["Lora hashes"] = ", ".join(hashes)
    if adapters.embeddings:
        extra["TI hashes"] = ", ".join(f"{e.token}: {e.sha256[:12]}" for e in adapters.embeddings)
    extra["Version"] = f"catalogen {catalogen.__version__}"
    single = run.extras.single_file
    model_hash = single.sha256[:10] if single else identity.revision.removeprefix("sha256:")[:10]
    return format_parameters(
        prompt, row["negative_prompt"],
        steps=row["steps"], scheduler=row["scheduler"], guidance_scale=row["guidance_scale"],
        seed=row["seed"], width=row["width"], height=row["height"],
        model=identity.repo, model_hash=model_hash, extra=extra,
    )


def _save(job: _Job, image: Image.Image, flagged: bool | None, run: _Run) -> dict[str, Any]:
    row = job.row
    if flagged and run.mode == "withhold":
        return {"status": "failed", "error": "withheld: the safety checker flagged this image", "safety_flagged": True}
    store = run.ctx.store
    relative = store.image_path(NAME, row["id"], row["variant"], row["key"])
    data = encode_png(image, _a1111_parameters(row, run), _provenance(row, run, flagged))
    data = sign_stage_image(data, relative, run.ctx)  # C2PA content credentials, when outputs.credentials is set
    return {
        "status": "ok",
        "image_path": relative,
        "image_sha256": store.write_image(relative, data),
        "image_width": image.width,
        "image_height": image.height,
        "safety_flagged": flagged,
    }


def _records(outcomes: list[Outcome], run: _Run) -> list[dict[str, Any]]:
    """Check, encode and write one batch's images; one result record per row."""
    images = [o.result for o in outcomes if o.error is None]
    checked = run.mode != "off"
    flags = iter(_safety_flags(run.ctx, images) if checked and images else [])
    records = []
    for outcome in outcomes:
        if outcome.error is not None:
            records.append({"status": "failed", "error": f"{type(outcome.error).__name__}: {outcome.error}"})
            continue
        flagged = next(flags) if checked else None
        try:
            records.append(_save(outcome.item, outcome.result, flagged, run))
        except OSError as exc:
            records.append({"status": "failed", "error": f"could not write image: {exc}"})
    return records


def _batch_signature(job: _Job) -> tuple:
    """Rows that can share one pipeline call without changing each other's image: everything but
    the prompts' text and the seeds must match."""
    row = job.row
    return (*(row[k] for k in BATCH_COLUMNS), bool(row["negative_prompt"]), job.chunks)


# --- prompts that name embeddings -----------------------------------------------------------------


def _notes(row: dict[str, Any], loaded: frozenset[str], warned: set[str]) -> str | None:
    """The row's note on embeddings its prompts name but the run does not load; logged once per name."""
    notes = []
    for label, text in (("prompt", row["prompt"]), ("negative prompt", row["negative_prompt"])):
        for name in unloaded_embeddings(text or "", loaded):
            if _NETWORK_TAG.match(name):
                notes.append(f"{label} has the A1111 tag {name!r}, which is read as plain words "
                             "(LoRAs are set in generate.loras)")
            else:
                notes.append(f"{label} names embedding {name!r} which is not loaded")
            if name not in warned:
                warned.add(name)
                log.warning("%s of row %s names %r, which is not a loaded embedding: it is read as plain words "
                            "(load it with generate.embeddings, or drop it from the prompts)", label, row["id"], name)
    return "; ".join(notes) or None


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Generate one image per planned row; failures are recorded per row, never raised.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA` (from `plan`, prompts filled from upstream).
        ctx (`StageContext`): the run's settings, the output folder, `models["pipeline"]` (and a
            `lora.<name>` / `embedding.<n>` role per add-on), the device.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Load the pipeline with the run's checkpoint file, LoRAs and embeddings (once per process).
    extras = resolve_extras(ctx.config, ctx.models)
    pipe = load_pipeline(ctx.models["pipeline"], ctx.device.name, ctx.dtype, ctx.config.model_memory_gb,
                         single_file=extras.single_file, adapters=extras.adapters)
    run = _Run(ctx, safety_mode(ctx.config), extras)

    # 2. Group rows that can share a pipeline call; note prompts naming embeddings that are not loaded.
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()
    groups: dict[tuple, list[_Job]] = {}
    notes: list[str | None] = []
    loaded = extras.loaded_tokens()
    warned: set[str] = set()
    for position, row in enumerate(rows):
        job = _job(position, row, pipe, extras)
        groups.setdefault(_batch_signature(job), []).append(job)
        notes.append(_notes(row, loaded, warned))

    # 3. Run each group through the batcher; write each batch's images and record every row.
    identity = ctx.models["pipeline"]
    common = {"device": ctx.device.name, "dtype": ctx.dtype_name, "model": identity.repo,
              "model_revision": identity.revision}
    def records(outcomes: list[Outcome]) -> list[dict[str, Any]]:
        found = _records(outcomes, run)
        return [{**record, "notes": notes[o.item.position]} for o, record in zip(outcomes, found)]

    results: list[dict[str, Any] | None] = [None] * len(rows)
    batcher = AdaptiveBatcher(_batch_runner(pipe), ctx.config.generate.batch_size)
    record_batches(groups.values(), batcher, records, results, common, ctx.progress)
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)


def _batch_runner(pipe):
    """The batcher's call: one padded pipeline call over a batch of jobs."""

    def run(jobs: list[_Job], size: int) -> list[Image.Image]:
        return _generate(pipe, jobs, size)

    return run
