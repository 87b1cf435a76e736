"""Model identity, pre-run checks and loading, with one cache per process.

Identity (repo, resolved revision, content hash) is cheap and needs no weights in memory, so a
run can compute every idempotency key, and skip all finished work, without loading a model.
Before a run starts, every model folder is checked for safetensors weights, so a model that
cannot load is refused up front instead of failing every shard.

Loading happens on first use in a process and is then reused by every shard and stage that
process runs. The cache keeps models resident per device up to a memory budget; past it, the
least recently used model is released. Every load is recorded, so tests can count them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from catalogen.config import ModelSpec, RunConfig
from catalogen.storage.hashing import sha256_file_remembered, stable_hash
from catalogen.models.identity import MissingModelsError, ModelIdentity
from catalogen.models.rembg import KIND as REMBG_KIND, resolve_rembg
from catalogen.models.tiny.profile import ensure_tiny, tiny_root

log = logging.getLogger("catalogen.models")  # the name its lines have always carried

TINY_PREFIX = "tiny:"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DIFFUSION_KINDS = ("sd15", "sdxl")


class ModelError(RuntimeError):
    """Models that are present but cannot be used (no safetensors weights, a broken folder)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} model problem(s):\n{listed}")


@contextmanager
def quiet_loading() -> Iterator[None]:
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


def _folder_hash(path: str) -> str:
    """Content hash of a local model folder (or single file), so edited weights never reuse old results.

    Every file's SHA-256, remembered per process only while its stat fingerprint (ctime included)
    is unchanged: an edit that keeps the size and sets the mtime back is still seen.
    """
    root = Path(path)
    if root.is_file():
        return "sha256:" + sha256_file_remembered(root)[:32]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return "sha256:" + stable_hash([(str(p.relative_to(root)), sha256_file_remembered(p)) for p in files])[:32]


# What a Hub model's folder needs when its spec names no files: weights as safetensors, never pickles.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.onnx", "*.jinja"]


def _download(spec: ModelSpec, offline: bool) -> Path:
    """Fetch a Hub model's safetensors weights and configuration (never pickles).

    A repository holding many models (h94/IP-Adapter: a dozen adapters and two image encoders,
    tens of GB) is fetched only in the files its spec names; see `ModelSpec.files`.
    """
    if spec.kind in DIFFUSION_KINDS:
        from diffusers import DiffusionPipeline

        return Path(DiffusionPipeline.download(
            spec.repo, revision=spec.revision, variant=spec.variant, use_safetensors=True, local_files_only=offline,
        ))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec.repo, revision=spec.revision, allow_patterns=spec.files or HUB_FILES,
                                  local_files_only=offline))


def _build_tiny(name: str, cache: Path) -> Path:
    with quiet_loading():
        return ensure_tiny(name, cache)


def _in_a_thread_of_its_own(function: Callable[..., Any], *args: Any) -> Any:
    """Run `function` in a short-lived thread and return its result (or raise its error).

    Torch kernels run once on a process's main thread make later torch work in its other threads
    (where the flow's tasks run) measurably slower (benchmarks/threads.py). Building the tiny
    models is the only torch work the CLI would do on its main thread, so it happens here.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"catalogen-{getattr(function, '__name__', 'work')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def resolve_model(spec: ModelSpec, cfg: RunConfig) -> ModelIdentity:
    """Find (or, when allowed, download) a model's files and pin its exact revision."""
    if spec.repo.startswith(TINY_PREFIX):
        name, cache = spec.repo[len(TINY_PREFIX):], cfg.resolved_cache_dir()
        folder = tiny_root(cache) / name
        if not folder.is_dir():  # build it (once per machine); importing the libraries only then
            folder = _in_a_thread_of_its_own(_build_tiny, name, cache)
        return ModelIdentity(spec.repo, _folder_hash(str(folder)), str(folder), spec.kind)
    if spec.kind == REMBG_KIND:  # a named rembg model: one ONNX file in <cache_dir>/rembg
        return resolve_rembg(spec, cfg)
    local = Path(spec.repo).expanduser()
    if local.exists():
        local = local.resolve()
        return ModelIdentity(spec.repo, _folder_hash(str(local)), str(local), spec.kind, spec.variant)
    offline = cfg.is_offline()
    try:
        folder = _download(spec, offline)
    except Exception as exc:  # noqa: BLE001 - the hub clients raise several kinds for "not cached"
        if offline:
            raise MissingModelsError([f"{spec.repo}@{spec.revision or 'main'}"]) from exc
        raise
    return ModelIdentity(spec.repo, folder.name, str(folder), spec.kind, spec.variant)


def resolve_models(specs: Mapping[str, ModelSpec], cfg: RunConfig) -> dict[str, ModelIdentity]:
    """Resolve every model, reporting all missing ones at once."""
    identities, missing = {}, []
    for role, spec in specs.items():
        try:
            identities[role] = resolve_model(spec, cfg)
        except MissingModelsError as exc:
            missing += exc.missing
    if missing:
        raise MissingModelsError(missing)
    return identities


# --- can it load? ---------------------------------------------------------------------------------


def _weights_problems(folder: Path, label: str, variant: str | None) -> list[str]:
    """A folder of one component: it needs safetensors weights, and pickles alone are refused."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if variant and safetensors and not any(f".{variant}." in p.name for p in safetensors):
        return [f"{label}: no '{variant}' variant weights in {folder}"]
    if safetensors:
        return []
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        return [f"{label}: only pickle weights ({', '.join(sorted(pickles))}) in {folder}; catalogen loads "
                "safetensors only (pickles can run code when loaded): convert them, or use a safetensors release"]
    return [f"{label}: no weights in {folder}"]


def _pipeline_components(folder: Path) -> list[str]:
    """The component folders of a diffusers pipeline that hold weights (model_index.json lists them)."""
    index = json.loads((folder / "model_index.json").read_text())
    return sorted(
        name for name, value in index.items()
        if isinstance(value, list) and value[0] is not None and (folder / name / "config.json").exists()
        and not name.startswith("_") and "scheduler" not in name
    )


def loadability_problems(identity: ModelIdentity) -> list[str]:
    """What would stop this model from loading as safetensors, found by looking at its files only."""
    folder = Path(identity.path)
    label = identity.repo
    if folder.is_file():
        if identity.kind == REMBG_KIND and folder.suffix == ".onnx":  # ONNX holds no code to run at load
            return []
        if folder.suffix != ".safetensors":
            return [f"{label}: {folder.name} is not a .safetensors file; catalogen loads safetensors only"]
        return []
    if not folder.is_dir():
        return [f"{label}: {folder} does not exist"]
    if identity.kind in DIFFUSION_KINDS:
        if not (folder / "model_index.json").exists():
            return [f"{label}: {folder} is not a diffusers pipeline folder (no model_index.json)"]
        problems = []
        for component in _pipeline_components(folder):
            problems += _weights_problems(folder / component, f"{label} ({component})", identity.variant)
        return problems
    if any(folder.rglob("*.safetensors")) or any(folder.rglob("*.onnx")):
        return []
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return [f"{label}: only pickle weights ({', '.join(pickles[:5])}) in {folder}; catalogen loads safetensors only"]
    return [f"{label}: no weights in {folder}"]


def check_loadable(identities: Mapping[str, ModelIdentity]) -> None:
    problems = [p for identity in identities.values() for p in loadability_problems(identity)]
    if problems:
        raise ModelError(problems)


# --- the per-process cache ------------------------------------------------------------------------


@dataclass
class _Entry:
    value: Any
    device: str
    nbytes: int


_cache: "OrderedDict[tuple, _Entry]" = OrderedDict()
_lock = threading.RLock()
_loads: list[dict[str, Any]] = []
_sequence = 0  # numbers every load and release of this process; never reset
_clock = threading.local()  # per thread: seconds spent in `cached` (loading, or waiting for a load)


def loading_seconds() -> float:
    """Seconds this thread has spent getting models from `cached` (a load, or waiting on another
    thread's): what `WorkTimer` leaves out of a row's time."""
    return getattr(_clock, "seconds", 0.0)


class WorkTimer:
    """Seconds of work since (re)start, this thread's model loading left out, so every stage's
    seconds per row mean the same thing wherever its models happen to load (loads are recorded
    once per load, in `load_events` and run.json's throughput)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._started, self._loading = time.perf_counter(), loading_seconds()

    def elapsed(self) -> float:
        return max(0.0, time.perf_counter() - self._started - (loading_seconds() - self._loading))


def _record(event: dict[str, Any]) -> None:
    global _sequence
    _loads.append({**event, "seq": _sequence})
    _sequence += 1


def load_mark() -> int:
    """Where this process's record of loads stands now: `loads_since(mark)` counts from there."""
    with _lock:
        return _sequence


def loads_since(mark: int) -> dict[int, str]:
    """This process's model loads since `mark`, {sequence number: "repo (what)"}. Shards that ran at
    once in one process may each report the same load; its number keeps it counted once."""
    with _lock:
        return {e["seq"]: f"{e['repo']} ({e['what']})" for e in _loads if e["event"] == "load" and e["seq"] >= mark}


def load_seconds_since(mark: int) -> dict[int, float]:
    """Seconds each of this process's loads since `mark` took, by sequence number (as `loads_since`)."""
    with _lock:
        return {e["seq"]: e["seconds"] for e in _loads if e["event"] == "load" and e["seq"] >= mark}


def load_count() -> int:
    """How many models this process has loaded from disk (a cache miss each)."""
    return sum(1 for event in _loads if event["event"] == "load")


def load_events() -> list[dict[str, Any]]:
    """Every load of this process: what, where, how big, how long; and what it released."""
    with _lock:
        return [dict(e) for e in _loads]


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _loads.clear()


def nbytes(value: Any) -> int:
    """Memory held by a loaded model: its tensors, found through pipelines, tuples and modules."""
    import torch

    if isinstance(value, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in [*value.parameters(), *value.buffers()])
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    components = getattr(value, "components", None)
    if isinstance(components, dict):
        return nbytes(components)
    return int(getattr(value, "catalogen_nbytes", 0))


def default_budget(device: str) -> int:
    """80% of a GPU's memory; 50% of the machine's RAM for the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    import psutil

    return int(0.5 * psutil.virtual_memory().total)


def _evict_for(device: str, needed: int, budget: int) -> None:
    used = sum(e.nbytes for e in _cache.values() if e.device == device)
    for key in [k for k, e in _cache.items() if e.device == device]:
        if used + needed <= budget:
            return
        entry = _cache.pop(key)
        used -= entry.nbytes
        log.info("releasing %s from %s (%.0f MB) to stay within the %.1f GB model budget",
                 key[1], device, entry.nbytes / 2**20, budget / 2**30)
        _record({"event": "release", "what": key[0], "repo": key[1], "device": device, "bytes": entry.nbytes})
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def cached(key: tuple, device: str, build: Callable[[], Any], budget_gb: float | None = None) -> Any:
    """`build()` once per `key` and process; least recently used models go first past the budget.

    `key` is (what, repo, revision, device, dtype, …). Loads are serialised, so two threads never
    load the same model twice.
    """
    asked = time.perf_counter()
    try:
        return _cached(key, device, build, budget_gb)
    finally:
        _clock.seconds = loading_seconds() + time.perf_counter() - asked


def _cached(key: tuple, device: str, build: Callable[[], Any], budget_gb: float | None) -> Any:
    with _lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry.value
        log.info("loading %s (%s) on %s", key[1], key[0], device)
        started = time.perf_counter()
        with quiet_loading():
            value = build()
        size = nbytes(value)
        budget = int(budget_gb * 2**30) if budget_gb else default_budget(device)
        _evict_for(device, size, budget)
        _cache[key] = _Entry(value, device, size)
        _record({"event": "load", "what": key[0], "repo": key[1], "device": device, "bytes": size,
                 "seconds": round(time.perf_counter() - started, 3)})
        return value
