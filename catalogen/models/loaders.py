"""Loading what a run adds to a diffusion pipeline: single-file checkpoints, LoRAs, textual inversion.

As diffusers keeps its `loaders/` apart from its pipelines: what each add-on is (`LoraSpec`,
`EmbeddingSpec`, the generate stage's settings for them), the checks of one add-on's source
before a run (no pickles; a tiny add-on, a local file or folder, or a Hub repo id), the one
`.safetensors` file each loads from and an embedding's layout read from its header alone, what
the key holds of them (`Extras.fingerprint`), and the names prompts use that no loaded embedding
has. Loading them into a pipeline is models/diffusion.py's (`load_pipeline`); which of them a run
uses is the generate stage's settings (tasks/generate.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from catalogen.config import RunConfig, Strict
from catalogen.models.diffusion import SAFETENSORS, Adapters, Embedding, Lora, SingleFile, file_digests
from catalogen.models.loading import PICKLE_SUFFIXES, TINY_PREFIX, ModelIdentity
from catalogen.models.tiny.profile import TINY_MODELS
from catalogen.storage.hashing import sha256_file, stable_hash


ADAPTER_NAME = r"^[A-Za-z0-9_-]+$"  # PEFT adapter names become module keys: no dots; A1111 tags: no ':' or ','
LORA_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # diffusers' names, chosen when a folder has several
EMBEDDING_DEFAULT_FILE = "learned_embeds.safetensors"


class LoraSpec(Strict):
    """A LoRA adapter applied to every image of the run."""

    path: str = Field(
        description="a local .safetensors file or folder, a Hub repo id (with weight_name), or tiny:lora-sd15"
    )
    weight_name: str | None = Field(None, description="the .safetensors file inside the folder or Hub repo")
    weight: float = Field(1.0, ge=-10, le=10, description="its strength, as in A1111's <lora:name:weight>")
    name: str | None = Field(
        None, pattern=ADAPTER_NAME, description="adapter name; default the file's (or folder's) name"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit")

    def adapter_name(self) -> str:
        """The configured name, else the file's stem; for diffusers' default file name, its folder's or repo's name."""
        if self.name:
            return self.name
        file = self.weight_name or (self.path if self.path.endswith(SAFETENSORS) else "")
        stem = Path(file).stem
        if not stem or file == LORA_DEFAULT_FILE:
            stem = Path(self.path.removeprefix(TINY_PREFIX).rstrip("/")).name
        return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


class EmbeddingSpec(Strict):
    """A textual-inversion embedding: prompts that contain its token get its learned vectors."""

    path: str = Field(
        description="a local .safetensors file or folder, a Hub repo id (with weight_name), or tiny:ti-sd15"
    )
    weight_name: str | None = Field(None, description="the .safetensors file inside the folder or Hub repo")
    token: str | None = Field(
        None, pattern=r"^\S+$",
        description="the word prompts use for it; required for A1111 (emb_params) and SDXL (clip_l/clip_g) files, "
        "which do not name their token",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit")


# --- checking a source before the run ------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PICKLE_WHY = (
    "{what}: {suffix} files are Python pickles, and loading a pickle can run any code it holds, so catalogen loads "
    ".safetensors files only. Use the model's .safetensors release, or convert the file once on a machine where you "
    "trust it: load its state dict with torch (map_location='cpu', weights_only=True) and write it with "
    "`safetensors.torch.save_file(state_dict, 'NAME.safetensors')` (from {origin})"
)


def _pickle_fault(setting: str, value: str | None, cfg: RunConfig) -> list[str]:
    suffix = Path(value or "").suffix.lower()
    if suffix not in PICKLE_SUFFIXES:
        return []
    return [PICKLE_WHY.format(what=f"{setting}={value}", suffix=suffix, origin=cfg.origin(setting))]


def _location_faults(setting: str, path: str, weight_name: str | None, tiny_prefix: str, cfg: RunConfig) -> list[str]:
    """A LoRA's or embedding's source: a tiny add-on of the right kind, a local file or folder, or a Hub repo id."""
    origin = f"(from {cfg.origin(setting)})"
    if weight_name is not None and not weight_name.endswith(SAFETENSORS):
        return [f"{setting}.weight_name={weight_name}: not a {SAFETENSORS} file {origin}"]
    if path.startswith(TINY_PREFIX):
        name = path[len(TINY_PREFIX):]
        if name not in TINY_MODELS or not name.startswith(tiny_prefix):
            choices = ", ".join(TINY_PREFIX + m for m in TINY_MODELS if m.startswith(tiny_prefix))
            return [f"{setting}.path={path}: no such tiny add-on; choose from {choices} {origin}"]
        return []
    local = Path(path).expanduser()
    if local.is_file():
        if weight_name is not None:
            return [f"{setting}.weight_name={weight_name}: path {path} is already a file; weight_name picks a file "
                    f"inside a folder or Hub repo {origin}"]
        if local.suffix != SAFETENSORS:
            return [f"{setting}.path={path}: not a {SAFETENSORS} file {origin}"]
        return []
    if local.is_dir():
        if weight_name is None and not any(local.glob(f"*{SAFETENSORS}")):
            pickles = sorted(p.name for p in local.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                return _pickle_fault(f"{setting}.path", str(local / pickles[0]), cfg)
        return []  # which file it holds is checked once resolved (see resolve_extras)
    if _HUB_ID.fullmatch(path) and not path.endswith(SAFETENSORS):
        return []
    return [f"{setting}.path={path}: no such file or folder, and not a Hub repo id (owner/name) {origin}"]


def _repeated(setting: str, values: list[str], what: str, cfg: RunConfig) -> list[str]:
    seen, problems = set(), []
    for value in values:
        if value in seen:
            problems.append(f"{setting}: two entries have the {what} {value!r}; give each its own {what} "
                            f"(from {cfg.origin(setting)})")
        seen.add(value)
    return problems


# --- resolved to files -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Extras:
    """What the run adds to the plain pipeline: its checkpoint file, LoRAs and embeddings."""

    single_file: SingleFile | None = None
    adapters: Adapters = Adapters()

    def __bool__(self) -> bool:
        return self.single_file is not None or bool(self.adapters)

    def fingerprint(self) -> dict[str, Any]:
        """What the key holds: every file's sha256, the LoRAs' names and weights, the embeddings' tokens."""
        single = self.single_file
        return {
            "single_file": [single.sha256, single.config_digest] if single else None,
            "loras": [[lora.name, lora.sha256, lora.weight] for lora in self.adapters.loras],
            "embeddings": [[e.token, e.sha256, list(e.tensors)] for e in self.adapters.embeddings],
        }

    def loaded_tokens(self) -> frozenset[str]:
        return frozenset(e.token.lower() for e in self.adapters.embeddings)


CONFIG_FILES = ("*.json", "*.txt", "*.model")  # a pipeline's configuration and tokenizer files, no weights


def _config_digest(folder: Path) -> str:
    files = sorted(p for pattern in CONFIG_FILES for p in folder.rglob(pattern) if p.is_file())
    return stable_hash([(str(p.relative_to(folder)), sha256_file(p)) for p in files])


class _Unusable(Exception):
    """An add-on whose files cannot be used (the message names it and says why)."""


def _weight_file(identity: ModelIdentity, weight_name: str | None, default: str, label: str) -> Path:
    """The one .safetensors file an add-on loads from: the path itself, the named file, or the folder's only one."""
    root = Path(identity.path)
    if root.is_file():
        return root
    if weight_name is not None:
        if not (root / weight_name).is_file():
            raise _Unusable(f"{label}: no {weight_name} in {root}")
        return root / weight_name
    found = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix == SAFETENSORS)
    if len(found) == 1:
        return root / found[0]
    if default in found:
        return root / default
    if found:
        raise _Unusable(f"{label}: {root} holds several {SAFETENSORS} files ({', '.join(found)}); "
                        "choose one with weight_name")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _Unusable(PICKLE_WHY.format(what=f"{label}: {root} has only {', '.join(pickles)}",
                                          suffix=Path(pickles[0]).suffix, origin="its folder"))
    raise _Unusable(f"{label}: no {SAFETENSORS} file in {root}")


def _embedding(spec: EmbeddingSpec, file: Path, kind: str, label: str) -> Embedding:
    """The embedding in `file`, by its layout (read from the header alone): SDXL's two tensors
    (clip_l, clip_g), A1111's `emb_params`, or diffusers' one tensor named by its token."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        names = tuple(handle.keys())
    if set(names) == {"clip_l", "clip_g"}:
        if kind != "sdxl":
            raise _Unusable(f"{label}: {file.name} is an SDXL embedding (clip_l, clip_g); the model is {kind}-shaped")
        if not spec.token:
            raise _Unusable(f"{label}: {file.name} is an SDXL embedding, which does not name its token: set token")
        return Embedding(spec.token, str(file), file_digests(file)[0], ("clip_l", "clip_g"))
    if len(names) != 1:
        raise _Unusable(f"{label}: {file.name} is not a textual-inversion embedding (tensors: {', '.join(names[:5])})")
    if kind == "sdxl":
        raise _Unusable(f"{label}: {file.name} is an SD1.5 embedding (one tensor); SDXL needs clip_l and clip_g")
    if names[0] == "emb_params" and not spec.token:
        raise _Unusable(f"{label}: {file.name} is an A1111 embedding (emb_params), which does not name its token: "
                        "set token")
    return Embedding(spec.token or names[0], str(file), file_digests(file)[0], names)


def _lora(spec: LoraSpec, identity: ModelIdentity, label: str) -> Lora:
    file = _weight_file(identity, spec.weight_name, LORA_DEFAULT_FILE, label)
    sha256, tensors_sha256 = file_digests(file)
    return Lora(spec.adapter_name(), str(file), spec.weight, sha256, tensors_sha256[:12])


# --- prompts that name embeddings -----------------------------------------------------------------

# Negative embeddings that prompts (LLM-written ones especially) name as if every setup had them.
KNOWN_EMBEDDINGS = (
    "easynegative", "easynegativev2", "bad-hands-5", "badhandv4", "bad_prompt", "bad_prompt_version2",
    "ng_deepnegative_v1_75t", "verybadimagenegative_v1.3", "bad-artist", "bad-artist-anime", "bad-image-v2-39000",
    "negative_hand-neg", "fastnegativev2", "baddream", "unrealisticdream", "unaestheticxl_v10", "negativexl_d",
)
_ANGLE_TAG = re.compile(r"<[^<>\s]{1,80}>")
_KNOWN_NAME = re.compile(
    r"(?<![\w-])(?:" + "|".join(re.escape(name) for name in KNOWN_EMBEDDINGS) + r")(?![\w-])", re.IGNORECASE
)
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):", re.IGNORECASE)  # A1111 extra networks, not embeddings


def unloaded_embeddings(text: str, loaded: frozenset[str]) -> list[str]:
    """Names in `text` that look like embeddings and are not among the `loaded` tokens (lower case).

    Looks like one: an angle-bracketed token (`<style>`, `<lora:x:1>`), or a popular negative
    embedding's name as a whole word, any case. Each name once, in order of appearance.
    """
    found = [match.group(0) for match in _ANGLE_TAG.finditer(text)]
    rest = _ANGLE_TAG.sub(" ", text)
    found += [match.group(0) for match in _KNOWN_NAME.finditer(rest)]
    names: list[str] = []
    for name in found:
        if name.lower() not in loaded and name not in names:
            names.append(name)
    return names
