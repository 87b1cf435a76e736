"""Model identity and loading, with one cache per process.

Identity (repo, resolved revision, content hash) is cheap and needs no weights in memory, so a
run can compute every idempotency key, and skip all finished work, without loading a model.
Loading happens on first use in a process and is then reused by every shard that process runs.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from catalogen.config import ModelSpec, RunConfig
from catalogen.hashing import sha256_file, stable_hash
from catalogen.tiny import ensure_tiny

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class ModelIdentity:
    repo: str  # as configured
    revision: str  # the Hub commit, or "sha256:…" of a local folder's files
    path: str  # the local folder the weights load from
    kind: str
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MissingModelsError(RuntimeError):
    """Models that are not on this machine while the Hub may not be contacted."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        listed = "\n".join(f"  - {m}" for m in missing)
        super().__init__(
            f"{len(missing)} model(s) missing from the local cache and the Hub is off limits "
            f"(offline mode):\n{listed}\nDownload them first with `catalogen models prepare` on a "
            "machine that can reach the Hub, or unset HF_HUB_OFFLINE."
        )


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide the libraries' per-file progress bars and import notices; we log the load ourselves."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = [(lib, lib.get_verbosity()) for lib in (dlog, tlog)]
    for lib, _ in levels:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level in levels:
            lib.set_verbosity(level)
            lib.enable_progress_bar()


@lru_cache(maxsize=None)
def _folder_hash(path: str) -> str:
    """Content hash of a local model folder, so edited weights never reuse old results."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return "sha256:" + stable_hash([(str(p.relative_to(root)), sha256_file(p)) for p in files])[:32]


def resolve_model(spec: ModelSpec, cfg: RunConfig) -> ModelIdentity:
    """Find (or, when allowed, download) a model's files and pin its exact revision."""
    if spec.repo.startswith(TINY_PREFIX):
        with _quiet_loading():
            folder = ensure_tiny(spec.repo[len(TINY_PREFIX):], cfg.resolved_cache_dir())
        return ModelIdentity(spec.repo, _folder_hash(str(folder)), str(folder), spec.kind)
    local = Path(spec.repo).expanduser()
    if local.is_dir():
        return ModelIdentity(spec.repo, _folder_hash(str(local.resolve())), str(local.resolve()), spec.kind, spec.variant)
    from diffusers import DiffusionPipeline

    offline = cfg.is_offline()
    try:
        folder = DiffusionPipeline.download(
            spec.repo,
            revision=spec.revision,
            variant=spec.variant,
            use_safetensors=True,
            local_files_only=offline,
        )
    except Exception as exc:  # noqa: BLE001 - diffusers raises several kinds for "not cached"
        if offline:
            raise MissingModelsError([f"{spec.repo}@{spec.revision or 'main'}"]) from exc
        raise
    return ModelIdentity(spec.repo, Path(folder).name, str(folder), spec.kind, spec.variant)


def resolve_models(specs: dict[str, ModelSpec], cfg: RunConfig) -> dict[str, ModelIdentity]:
    """Resolve every stage's model, reporting all missing ones at once."""
    identities, missing = {}, []
    for stage, spec in specs.items():
        try:
            identities[stage] = resolve_model(spec, cfg)
        except MissingModelsError as exc:
            missing += exc.missing
    if missing:
        raise MissingModelsError(missing)
    return identities


# --- the per-process cache ------------------------------------------------------------------------

_cache: dict[tuple, Any] = {}
_lock = threading.Lock()
_loads = 0


def load_count() -> int:
    """How many models this process has loaded from disk (a cache miss each)."""
    return _loads


def clear_cache() -> None:
    global _loads
    with _lock:
        _cache.clear()
        _loads = 0


def _cached(key: tuple, build) -> Any:
    global _loads
    with _lock:  # one load at a time: two threads never load the same model twice
        if key not in _cache:
            log.info("loading %s (%s) on %s as %s", key[1], key[2], key[3], key[4])
            with _quiet_loading():
                _cache[key] = build()
            _loads += 1
        return _cache[key]


def load_pipeline(identity: ModelIdentity, device: str, dtype: torch.dtype):
    """A text-to-image pipeline, loaded once per (model, revision, device, dtype) and process."""

    def build():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        common = dict(dtype=dtype, use_safetensors=True, variant=identity.variant)
        if identity.kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(identity.path, add_watermarker=False, **common)
        else:
            # The checker runs separately (see tasks.generate), so its verdict is recorded
            # instead of the pipeline silently blacking out the image.
            pipe = StableDiffusionPipeline.from_pretrained(
                identity.path, safety_checker=None, requires_safety_checker=False, **common
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    return _cached(("pipeline", identity.repo, identity.revision, device, str(dtype)), build)


def load_safety_checker(identity: ModelIdentity, device: str, dtype: torch.dtype):
    """The Stable Diffusion safety checker and its image processor from the model's folder."""

    def build():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = Path(identity.path)
        if not (folder / "safety_checker").is_dir():
            raise FileNotFoundError(f"{identity.repo} has no safety_checker folder")
        checker = StableDiffusionSafetyChecker.from_pretrained(folder, subfolder="safety_checker", dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(folder, subfolder="feature_extractor")
        return checker.to(device).eval(), processor

    return _cached(("safety", identity.repo, identity.revision, device, str(dtype)), build)
