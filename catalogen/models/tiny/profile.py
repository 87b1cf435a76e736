"""The tiny model profile: real architectures with random weights, built in code.

The model hubs are out of reach in development and CI, and mocks would not exercise the loading,
scheduling and batching code that real runs depend on. So we build SD1.5- and SDXL-shaped pipelines
small enough to run on a CPU in milliseconds, save them in the diffusers folder format, and load
them back through exactly the `from_pretrained` path a downloaded model takes.

Weights come from a fixed torch seed, so every machine builds byte-identical files and the same
row gives the same image everywhere.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# Bump when the architecture or weights below change: it is part of the cache path, so an old build
# is never mistaken for the new one.
TINY_VERSION = "2"

_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def profile_note(profile: str) -> str | None:
    """What a tiny profile's output is, said once where a person reads a run (its output, its
    report), since noise can look like a bug; None for a real profile."""
    if not profile.startswith("tiny"):
        return None
    real = "sdxl" if profile == "tiny-sdxl" else "sd15"
    return (f"profile {profile}: real architectures, random weights: images and captions are noise; "
            f"use --profile {real} for real output")


def _bytes_to_unicode() -> list[str]:
    """The printable alphabet of byte-level BPE (the same mapping CLIP's tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer():
    """A character-level CLIP BPE tokenizer (every byte, alone and word-final, and no merges)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + list(_SPECIAL)
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _text_config(vocab_size: int, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=projection,
        max_position_embeddings=77,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


# The real models' scheduler configurations (SD1.5 ships PNDM, SDXL Euler), so scheduler swaps
# behave here exactly as on the real models.
_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    timestep_spacing="leading",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    prediction_type="epsilon",
)


def _safety_checker():
    """A tiny CLIP safety checker with thresholds that flag nothing, plus its image processor."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=4,
        ),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)  # cosine distance never exceeds 1: nothing flagged
        checker.special_care_embeds_weights.fill_(2.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def _unet(**shape):
    """The UNet both tiny pipelines share: two blocks, 32x32 latents; `shape` adds each family's parts."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **shape,
    )


def build_sd15(folder: Path, cache_dir: Path) -> None:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = _unet(cross_attention_dim=32, norm_num_groups=32)
    vae = _vae()
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), 32, 32))
    checker, processor = _safety_checker()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(_SCHEDULER_CONFIG),
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl(folder: Path, cache_dir: Path) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text dims
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    vae = _vae()
    tokenizer = _clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 32, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), 32, 32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


# name -> builder(folder, cache_dir), as "module:function" so that naming a tiny model imports none of
# the libraries its builder needs; a builder may call `ensure_tiny` for the models it derives from.
_BUILDERS: dict[str, str] = {
    "sd15": "catalogen.models.tiny.profile:build_sd15",
    "sdxl": "catalogen.models.tiny.profile:build_sdxl",
    "rembg": "catalogen.models.tiny.vision:build_rembg",
    "blip2": "catalogen.models.tiny.vision:build_blip2",
    "clip": "catalogen.models.tiny.vision:build_clip",
    "aesthetic": "catalogen.models.tiny.vision:build_aesthetic",
    "llm": "catalogen.models.tiny.llm:build_llm",
    "controlnet-sd15": "catalogen.models.tiny.adapters:build_controlnet_sd15",
    "controlnet-sdxl": "catalogen.models.tiny.adapters:build_controlnet_sdxl",
    "ip-adapter": "catalogen.models.tiny.adapters:build_ip_adapter",
    "lora-sd15": "catalogen.models.tiny.adapters:build_lora_sd15",
    "lora-sdxl": "catalogen.models.tiny.adapters:build_lora_sdxl",
    "ti-sd15": "catalogen.models.tiny.adapters:build_ti_sd15",
    "ti-sdxl": "catalogen.models.tiny.adapters:build_ti_sdxl",
    "single-file": "catalogen.models.tiny.adapters:build_single_file",
}
TINY_MODELS = tuple(_BUILDERS)


def _builder(name: str) -> Callable[[Path, Path], None]:
    module, function = _BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def tiny_root(cache_dir: Path) -> Path:
    return cache_dir / "tiny" / f"v{TINY_VERSION}"


def ensure_tiny(name: str, cache_dir: Path) -> Path:
    """Build tiny model `name` under `cache_dir` unless present; returns its folder.

    Built in a temporary sibling and renamed into place, so a crash never leaves a half-written
    model that later runs would load.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; expected one of {', '.join(TINY_MODELS)}")
    target = tiny_root(cache_dir) / name
    if target.is_dir():  # only ever appears complete, by rename
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _builder(name)(tmp, cache_dir)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; theirs is identical
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
