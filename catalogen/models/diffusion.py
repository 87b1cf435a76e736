"""Stable Diffusion pipelines, loaded once per process and shared by the stages that use them.

Every load goes through `models.cached`, so a worker that runs several stages keeps one copy of
each model per device, within the memory budget.

A pipeline may come from a diffusers folder or from one original-layout checkpoint file (what
A1111 and Civitai distribute), and may carry LoRA adapters and textual-inversion embeddings.
Adapters change the modules they are loaded into, so a pipeline with adapters is its own cached
object, keyed by the adapters' file hashes and weights; the plain pipeline other stages share is
never touched. Only `.safetensors` files are ever read: a pickle (`.ckpt`, `.bin`, `.pt`) can run
code when it is loaded.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from catalogen import stopping
from catalogen.storage.hashing import file_fingerprint
from catalogen.models.loading import ModelIdentity, cached

SAFETENSORS = ".safetensors"


@dataclass(frozen=True)
class SingleFile:
    """A whole pipeline in one original-layout (LDM) `.safetensors` checkpoint.

    Such a file holds weights only; the components' configuration (and the tokenizer) come from
    `config`, a local diffusers folder, so loading never reaches for the Hub.
    """

    path: str
    sha256: str
    config: str  # local folder with model_index.json and the components' configs
    config_digest: str  # hash of that folder's configuration files: part of the key


@dataclass(frozen=True)
class Lora:
    """One LoRA adapter: a local `.safetensors` file, applied at `weight` under adapter name `name`."""

    name: str
    path: str
    weight: float
    sha256: str  # of the whole file
    a1111_hash: str  # what A1111 writes as the LoRA's hash: sha256 of the tensors after the header, 12 digits


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding that prompts call up with `token`.

    `tensors` names the file's tensors: one (SD1.5: diffusers' `{token: vectors}` or A1111's
    `emb_params`), or ("clip_l", "clip_g") for SDXL, one per text encoder.
    """

    token: str
    path: str
    sha256: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Adapters:
    loras: tuple[Lora, ...] = ()
    embeddings: tuple[Embedding, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings)

    def identity(self) -> tuple:
        """What makes two adapter sets give the same pixels: files and weights, in load order."""
        loras = tuple((lora.name, lora.sha256, lora.weight) for lora in self.loras)
        embeddings = tuple((e.token, e.sha256, e.tensors) for e in self.embeddings)
        return loras, embeddings


NO_ADAPTERS = Adapters()


@lru_cache(maxsize=256)
def _digests(path: str, fingerprint: tuple[int, ...]) -> tuple[str, str]:
    whole = hashlib.sha256()
    tensors = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(8)
        whole.update(head)
        header = fh.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
        whole.update(header)
        while block := fh.read(1 << 20):
            whole.update(block)
            tensors.update(block)
    return whole.hexdigest(), tensors.hexdigest()


def file_digests(path: str | Path) -> tuple[str, str]:
    """(sha256 of the file, sha256 of its tensor data after the safetensors header), read in one pass.

    The second is the hash A1111 and Civitai show for a LoRA (kohya's "addnet" hash); it stays the
    same when only the file's metadata header is edited. Remembered while the file's
    `file_fingerprint` holds, so a process hashes a large checkpoint once.
    """
    return _digests(str(path), file_fingerprint(path))


def _require_safetensors(path: str) -> None:
    if not path.endswith(SAFETENSORS):
        raise ValueError(f"{path} is not a {SAFETENSORS} file; catalogen never loads pickles (they can run code)")


def _base_pipeline(identity: ModelIdentity, dtype: torch.dtype, single_file: SingleFile | None):
    """The pipeline's own weights, from a diffusers folder or one checkpoint file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if identity.kind == "sdxl":
        cls, extra = StableDiffusionXLPipeline, dict(add_watermarker=False)
    else:
        # The checker runs separately (see tasks.generate), so its verdict is recorded
        # instead of the pipeline silently blacking out the image.
        cls, extra = StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)
    if single_file is None:
        return cls.from_pretrained(identity.path, dtype=dtype, use_safetensors=True, variant=identity.variant, **extra)
    _require_safetensors(single_file.path)
    # config= a local folder: without it diffusers guesses the model and fetches its configs from the Hub.
    return cls.from_single_file(single_file.path, config=single_file.config, dtype=dtype, local_files_only=True, **extra)


def _add_embeddings(pipe, embeddings: tuple[Embedding, ...]) -> None:
    """Load each embedding's vectors under its token (SDXL: into both text encoders)."""
    from safetensors.torch import load_file

    # Growing the token table draws the new rows from torch's global generator (then overwritten);
    # forking keeps that global state the same whether or not a run loads embeddings.
    with torch.random.fork_rng(devices=[]):
        for embedding in embeddings:
            _require_safetensors(embedding.path)
            state = load_file(embedding.path)
            encoders = [(pipe.text_encoder, pipe.tokenizer)]
            if len(embedding.tensors) == 2:
                encoders.append((pipe.text_encoder_2, pipe.tokenizer_2))
            for name, (text_encoder, tokenizer) in zip(embedding.tensors, encoders):
                pipe.load_textual_inversion(state[name], token=embedding.token, text_encoder=text_encoder,
                                            tokenizer=tokenizer)


def _add_loras(pipe, loras: tuple[Lora, ...]) -> None:
    """Load each LoRA under its adapter name, then activate all of them at their weights.

    `set_adapters` is always called: what is active after `load_lora_weights` alone depends on
    how many adapters were loaded before, and the weights would be left at 1.
    """
    for lora in loras:
        _require_safetensors(lora.path)
        path = Path(lora.path)
        with warnings.catch_warnings():
            # PEFT warns from the second adapter on that the model now holds several: that is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=lora.name,
                                   use_safetensors=True, local_files_only=True)
    if loras:
        pipe.set_adapters([lora.name for lora in loras], adapter_weights=[lora.weight for lora in loras])


def load_pipeline(
    identity: ModelIdentity,
    device: str,
    dtype: torch.dtype,
    budget_gb: float | None = None,
    single_file: SingleFile | None = None,
    adapters: Adapters = NO_ADAPTERS,
):
    """A text-to-image pipeline (SD1.5- or SDXL-shaped), from safetensors only.

    Args:
        identity (`ModelIdentity`): the model; its folder, or its checkpoint file with `single_file`.
        single_file (`SingleFile`, *optional*): load `identity` from one checkpoint file.
        adapters (`Adapters`, *optional*): LoRAs and embeddings to load into it.

    The plain pipeline is cached under the model's identity; one with a checkpoint file or
    adapters under those too, so each combination is a separate object.
    """

    def build():
        pipe = _base_pipeline(identity, dtype, single_file)
        _add_embeddings(pipe, adapters.embeddings)
        _add_loras(pipe, adapters.loras)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    key: tuple = ("pipeline", identity.repo, identity.revision, device, str(dtype))
    if single_file is not None:
        key += (("single_file", single_file.sha256, single_file.config_digest),)
    if adapters:
        key += (("adapters", adapters.identity()),)
    return cached(key, device, build, budget_gb)


def finite(images, dtype: torch.dtype):
    """A pipeline's output images, if every pixel is a finite number (float16 can overflow to NaN).

    Raised for the whole batch, the batch's rows are then retried one by one, and only the rows
    whose images are still not finite fail.
    """
    import numpy as np

    if not all(np.isfinite(image).all() for image in images):
        hint = "" if dtype == torch.float32 else "; try dtype float32"
        raise FloatingPointError(f"the pipeline produced NaN or infinite pixels ({dtype}){hint}")
    return images


def stop_between_steps(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A `callback_on_step_end` that ends a denoising loop once a stop's grace period is over."""
    stopping.check()
    return callback_kwargs
