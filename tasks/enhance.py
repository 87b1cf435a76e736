"""Prompt enhancement with an LLM: a row's base prompt in, a Stable Diffusion prompt pair out.

Reads: the base prompt (the catalog's `prompt`, or what the run's `template:` made of the row).
Writes: `prompt` and `negative_prompt` (what generate then uses), the input (`source_prompt`), the
model's raw answer, which model answered and whether the answer came from the cache. A row whose
answer is empty, unparsable or too long, or whose request failed after its retries, keeps its
input prompt with status `fallback` and the reason in `error`; it still goes on to generate.
Raw answers are kept up to `max_answer_chars` (longer ones are cut, marked, and fall back); a
server's echo of the API key is scrubbed from everything kept. A stopped run (`stopping.ABANDON`)
ends the shard with `stopping.Abandoned`: no part is written and its rows stay pending.
Key: the input text, the backend, the model's identity (repo and resolved revision, or the
server's model name), the system prompt's text, the decoding settings, and the row's seed only
when sampling (so with sampling each variant gets its own prompt).

Answers are cached on disk (SQLite, shared by every process and every run folder on the
machine: `<cache_dir>/enhance/answers.sqlite`), so a second run over the same rows, or another
run, does not ask the model again, and a fully cached shard never loads it. See tasks/llm.py for
the backends, the parser and the cache.

    >>> planned = plan(rows, cfg, {"llm": identity})
    >>> results = process(planned, StageContext(cfg, RunStore("out"), {"llm": identity}, device, torch.float32))
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from catalogen.run.batching import AdaptiveBatcher
from catalogen.config import ModelSpec, RunConfig
from catalogen.storage.hashing import column_keys, sha256_bytes
from catalogen.models.loading import ModelIdentity, WorkTimer, cached
from catalogen.stage import StageContext, output_schema
from catalogen.storage.store import now_utc
from tasks.llm import (
    DEFAULT_MODEL,
    DEFAULT_REVISION,
    AnswerCache,
    LLMSettings,
    LocalBackend,
    OpenAIBackend,
    Request,
    system_prompt,
)
from tasks.llm import enhance as ask

NAME = "enhance"
POSITION = 10  # in pipeline order (catalogen.registry)
VERSION = 1

READS = ("prompt",)
PROVIDES = ("prompt",)
FROM_UPSTREAM: dict[str, tuple[str, str]] = {"source_prompt": ("prompt", "prompt")}
MAKES_IMAGES = False
SHARD_ORDER: tuple[str, ...] = ()

# The local model per profile; the real profiles share the default instruct model.
PROFILES = {
    "tiny": ModelSpec(repo="tiny:llm", kind="llm"),
    "tiny-sdxl": ModelSpec(repo="tiny:llm", kind="llm"),
    "sd15": ModelSpec(repo=DEFAULT_MODEL, kind="llm", revision=DEFAULT_REVISION),
    "sdxl": ModelSpec(repo=DEFAULT_MODEL, kind="llm", revision=DEFAULT_REVISION),
}


class Settings(LLMSettings):
    """The LLM settings (see tasks/llm.py), with the model taken from the profile unless named."""

    model: str | None = Field(None, description="local: Hub id or folder (default: the profile's); openai: the server's model name")
    revision: str | None = Field(None, description="Hub commit, branch or tag of a local model (default: the profile's pin)")
    answer_cache: Path | None = Field(None, description="SQLite file of cached answers; default <cache_dir>/enhance/answers.sqlite")


PLAN_FIELDS = [
    pa.field("source_prompt", pa.string()),
    pa.field("seed", pa.int64()),
]
PLAN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("key", pa.string()),
                         *PLAN_FIELDS])
OUTPUT_SCHEMA = output_schema(
    [
        *PLAN_FIELDS,
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("raw_answer", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("model", pa.string()),  # the model that answered (a server may name a more exact one)
        pa.field("model_revision", pa.string()),
        pa.field("cached", pa.bool_()),
    ],
    images=False,
)


def effective(cfg: RunConfig) -> LLMSettings:
    """The settings the backends get: the model and revision filled in from the profile."""
    own: Settings = cfg.enhance
    spec = PROFILES[cfg.profile]
    model = own.model or (spec.repo if own.backend == "local" else None)
    revision = own.revision if own.model else spec.revision
    fields = own.model_dump(exclude={"answer_cache"})
    return LLMSettings(**{**fields, "model": model or "", "revision": revision})


def models(cfg: RunConfig) -> dict[str, ModelSpec]:
    """The local model to resolve and pin; a server's model is not ours to resolve."""
    if cfg.enhance.backend != "local":
        return {}
    settings = effective(cfg)
    return {"llm": ModelSpec(repo=settings.model, kind="llm", revision=settings.revision)}


def needs_device(cfg: RunConfig) -> bool:
    """A server backend runs elsewhere: its shards take no GPU lease."""
    return cfg.enhance.backend == "local"


def rules(cfg: RunConfig) -> dict:
    return {}


def config_faults(cfg: RunConfig) -> list[str]:
    problems = []
    own: Settings = cfg.enhance
    if own.backend == "openai" and not own.model:
        problems.append(f"enhance.model: the openai backend needs the server's model name (from {cfg.origin('enhance')})")
    try:
        system_prompt(effective(cfg))
    except (OSError, ValueError) as exc:
        problems.append(f"enhance.system_prompt_file: {exc} (from {cfg.origin('enhance.system_prompt_file')})")
    return problems


def answer_cache_path(cfg: RunConfig) -> Path:
    return cfg.enhance.answer_cache or cfg.resolved_cache_dir() / "enhance" / "answers.sqlite"


def _identity(settings: LLMSettings, models: Mapping[str, ModelIdentity]) -> str:
    """What pins the answers: the local weights' resolved revision, or the server's model name."""
    if "llm" in models:
        return f"{models['llm'].repo}@{models['llm'].revision}"
    return f"{settings.base_url or 'api.openai.com'}/{settings.model}"


# --- plan -----------------------------------------------------------------------------------------


def plan(rows: pa.Table, cfg: RunConfig, models: Mapping[str, ModelIdentity]) -> pa.Table:
    """Each row's input text and key (see the module docstring for what the key holds)."""
    settings = effective(cfg)
    source = pc.cast(rows.column("prompt"), pa.string())
    system = system_prompt(settings)
    decoding = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "max_prompt_chars": settings.max_prompt_chars, "max_answer_chars": settings.max_answer_chars}
    if settings.sampling:
        decoding["top_p"] = settings.top_p
    fixed = [NAME, VERSION, settings.backend, _identity(settings, models), sha256_bytes(system.encode()), decoding]
    per_row = [source, rows.column("seed")] if settings.sampling else [source]
    keys = column_keys(fixed, per_row)
    data = {"id": rows.column("id"), "variant": rows.column("variant"), "key": keys, "source_prompt": source,
            "seed": rows.column("seed")}
    return pa.Table.from_pydict(data, schema=PLAN_SCHEMA)


# --- process --------------------------------------------------------------------------------------


def _local_backend(identity: ModelIdentity, settings: LLMSettings, ctx: StageContext) -> LocalBackend:
    """The local chat model, loaded once per process (and only when an answer is missing)."""

    def build() -> LocalBackend:
        backend = LocalBackend(identity.path, ctx.device.name, ctx.dtype, settings)
        backend.catalogen_nbytes = sum(p.numel() * p.element_size() for p in backend.model.parameters())
        return backend

    # A backend decodes with the settings it was built with: all of them key it, so a later run of this
    # process with another temperature (or anything else) never gets one built for the earlier run.
    key = ("llm", identity.repo, identity.revision, ctx.device.name, str(ctx.dtype), settings)
    return cached(key, ctx.device.name, build, ctx.config.model_memory_gb)


def _server_backend(settings: LLMSettings) -> OpenAIBackend:
    """A client per server and settings (each request sends the settings' temperature, top_p, …)."""
    key = ("openai", settings.base_url or "api.openai.com", settings)
    return cached(key, "remote", partial(OpenAIBackend, settings), None)


def process(planned: pa.Table, ctx: StageContext) -> pa.Table:
    """Enhance every planned row's prompt; a bad answer falls back to the input, never raising.

    Args:
        planned (`pa.Table`): rows of `PLAN_SCHEMA`.
        ctx (`StageContext`): the run's settings, `models["llm"]` for the local backend, the device.

    Returns:
        `pa.Table` of `OUTPUT_SCHEMA`, one row per planned row, in the same order.
    """
    # 1. Settings, the answer cache, and a backend that loads only if an answer is missing.
    settings = effective(ctx.config)
    cache = AnswerCache(answer_cache_path(ctx.config))
    identity = _identity(settings, ctx.models)
    if settings.backend == "local":
        source = partial(_local_backend, ctx.models["llm"], settings, ctx)
        revision = ctx.models["llm"].revision
    else:
        source = partial(_server_backend, settings)
        revision = None
    rows = planned.select(PLAN_SCHEMA.names).to_pylist()

    # 2. Ask in batches (halved on out-of-memory; a failing batch is retried row by row).
    def run(batch: list[dict[str, Any]], size: int):
        requests = [Request(row["source_prompt"], row["seed"]) for row in batch]
        return ask(source, settings, identity, cache, requests)

    step = settings.batch_size if settings.backend == "local" else settings.concurrency * 4
    batcher = AdaptiveBatcher(run, step)
    records: list[dict[str, Any]] = []
    timer = WorkTimer()  # a model loaded meanwhile is not a row's time
    for outcomes in batcher.run(rows):
        seconds = timer.elapsed() / len(outcomes)
        finished = now_utc()
        for outcome in outcomes:
            records.append(_record(outcome, settings, revision, ctx, seconds, finished))
        ctx.progress(len(records))
        timer.restart()
    return pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)


def _record(outcome, settings: LLMSettings, revision: str | None, ctx: StageContext, seconds: float, finished) -> dict:
    row = outcome.item
    common = {**row, "backend": settings.backend, "model_revision": revision, "seconds": seconds,
              "finished_at": finished, "device": ctx.device.name if settings.backend == "local" else "remote"}
    if outcome.error is not None:
        return {**common, "status": "failed", "error": f"{type(outcome.error).__name__}: {outcome.error}",
                "model": settings.model}
    answer = outcome.result
    return {**common, "status": answer.status, "error": answer.reason, "prompt": answer.positive,
            "negative_prompt": answer.negative, "raw_answer": answer.raw, "model": answer.model, "cached": answer.cached}
