"""Tiny add-on models for the tiny profile: ControlNet, IP-Adapter, LoRA, textual inversion, single file.

The styling and upscaling stages load add-ons through diffusers' own loaders (`ControlNetModel.from_pretrained`,
`load_ip_adapter`, `load_lora_weights`, `load_textual_inversion`, `from_single_file`). Each of those
reads a particular on-disk layout, so each tiny add-on here is written in exactly the layout its real
counterpart ships in (the Hub repo h94/IP-Adapter, a diffusers/PEFT LoRA file, an LDM checkpoint),
derived from the tiny SD1.5 and SDXL models so that every shape matches.

Every weight comes from a fixed seed, so each build is byte-identical on every machine. The builders
follow `catalogen.models.tiny.profile`'s contract, `builder(folder, cache_dir)`, and are registered in its `_BUILDERS`;
changing any weight here means bumping `catalogen.models.tiny.profile.TINY_VERSION`, like a change to the base models.
"""

from __future__ import annotations

import json
from pathlib import Path

# --- where each add-on lives inside its folder (what a stage passes to the diffusers loaders) -------

IP_ADAPTER_IMAGE_ENCODER = "models/image_encoder"
IP_ADAPTER_WEIGHTS = {
    "sd15": ("models", "ip-adapter_sd15.safetensors"),
    "sdxl": ("sdxl_models", "ip-adapter_sdxl_vit-h.safetensors"),
}
# Two adapters per family, so stages can test combining them with `set_adapters`.
LORA_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_b.safetensors")
TI_TOKEN = "<tiny-style>"
TI_SD15_DIFFUSERS = "learned_embeds.safetensors"  # {"<tiny-style>": (dim,)}: the token is in the file
TI_SD15_A1111 = "tiny-style-a1111.safetensors"  # {"emb_params": (n, dim)}: pass token= when loading
TI_SDXL = "tiny-style-sdxl.safetensors"  # {"clip_l": (n, dim of text_encoder), "clip_g": (n, dim of text_encoder_2)}
SINGLE_FILE = "tiny-sd15.safetensors"


def _seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _random_like(shape, generator, std: float):
    import torch

    return torch.randn(tuple(shape), generator=generator) * std


def _base(family: str, cache_dir: Path) -> Path:
    """The tiny pipeline an add-on derives from (imported here: `catalogen.models.tiny.profile` imports this module)."""
    from catalogen.models.tiny.profile import ensure_tiny

    return ensure_tiny(family, cache_dir)


def _load_unet(family: str, cache_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(_base(family, cache_dir), subfolder="unet")


# --- ControlNet (tile) ------------------------------------------------------------------------------


def _build_controlnet(family: str, folder: Path, cache_dir: Path) -> None:
    """A ControlNet copied from the tiny UNet, whose zero convolutions are made non-zero.

    A fresh ControlNet's output convolutions are zero, so the control image would change nothing and
    a test could not tell a working ControlNet from an ignored one. The conditioning embedding
    downsamples by 2 (two stages), matching the tiny VAE; the real (16, 32, 96, 256) downsamples by 8.
    """
    import torch
    from diffusers import ControlNetModel

    unet = _load_unet(family, cache_dir)
    torch.manual_seed(0)  # the conditioning embedding's first layers are initialised randomly
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
    zero_convs += list(controlnet.controlnet_down_blocks)
    generator = _seeded(1)
    with torch.no_grad():
        for conv in zero_convs:
            for param in conv.parameters():
                param.copy_(_random_like(param.shape, generator, std=0.3))
    controlnet.save_pretrained(folder, safe_serialization=True)


def build_controlnet_sd15(folder: Path, cache_dir: Path) -> None:
    _build_controlnet("sd15", folder, cache_dir)


def build_controlnet_sdxl(folder: Path, cache_dir: Path) -> None:
    _build_controlnet("sdxl", folder, cache_dir)


# --- IP-Adapter -------------------------------------------------------------------------------------


def _image_encoder():
    """The tiny CLIP vision tower both adapters share (as SD1.5 and SDXL vit-h share models/image_encoder).

    32x32 inputs, like the SD1.5 folder's feature extractor: the SD1.5 pipeline preprocesses IP-Adapter
    images with that extractor, the SDXL one with a processor sized from this encoder's config.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=4, projection_dim=32,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config), processor


def _ip_adapter_state_dict(unet, image_embed_dim: int, generator) -> dict:
    """IP-Adapter weights in the original (tencent-ailab) key layout, for `unet`.

    `image_proj` maps one CLIP image embedding to 4 tokens of the UNet's cross-attention width.
    `ip_adapter.N` are the extra key/value projections of the N-th attention processor, numbered over
    all of the UNet's processors in order (the original saved `ModuleList(unet.attn_processors.values())`),
    so only the cross-attention ones (attn2: odd N here) have weights; diffusers assumes exactly that.
    Key/value projections start as copies of the text ones, as IP-Adapter training does.
    """
    import torch

    width = unet.config.cross_attention_dim
    tokens = 4
    state = {
        "image_proj.proj.weight": _random_like((tokens * width, image_embed_dim), generator, std=0.2),
        "image_proj.proj.bias": torch.zeros(tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    modules = dict(unet.named_modules())
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        attention = modules[name.removesuffix(".processor")]
        state[f"ip_adapter.{index}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        state[f"ip_adapter.{index}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
    return state


def build_ip_adapter(folder: Path, cache_dir: Path) -> None:
    """One folder in the layout of h94/IP-Adapter: SD1.5 and SDXL weights and their shared image encoder."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder, processor = _image_encoder()
    encoder.save_pretrained(folder / IP_ADAPTER_IMAGE_ENCODER)
    processor.save_pretrained(folder / IP_ADAPTER_IMAGE_ENCODER)
    generator = _seeded(2)
    for family, (subfolder, weight_name) in IP_ADAPTER_WEIGHTS.items():
        state = _ip_adapter_state_dict(_load_unet(family, cache_dir), encoder.config.projection_dim, generator)
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
        save_file(state, folder / subfolder / weight_name)


# --- LoRA -------------------------------------------------------------------------------------------

_UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
_TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def _lora_layers(model, targets: tuple[str, ...], rank: int, generator, prefix: str = "") -> dict:
    """PEFT-style `lora_A`/`lora_B` pairs for every linear layer of `model` whose name ends in `targets`.

    lora_B is random, not zero as in training: an untrained LoRA would change nothing, and tests must
    see an adapter's effect.
    """
    import torch

    layers = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.endswith(targets)):
            continue
        layers[f"{prefix}{name}.lora_A.weight"] = _random_like((rank, module.in_features), generator, std=0.2)
        layers[f"{prefix}{name}.lora_B.weight"] = _random_like((module.out_features, rank), generator, std=0.2)
    return layers


def _text_lora_layers(text_encoder, rank: int, generator) -> dict:
    """Text-encoder LoRA keys as Hub files write them, under `text_model.`.

    transformers 5 flattened `CLIPTextModel` (no `text_model` wrapper); diffusers strips the prefix when
    loading, and real files still carry it, so the tiny files do too.
    """
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    return _lora_layers(text_encoder, _TEXT_TARGETS, rank, generator, prefix)


def build_lora_sd15(folder: Path, cache_dir: Path) -> None:
    """Two SD1.5 LoRAs: UNet + text encoder (rank 4), and UNet only (rank 2)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    base = _base("sd15", cache_dir)
    unet = _load_unet("sd15", cache_dir)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    generator = _seeded(3)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=_lora_layers(unet, _UNET_TARGETS, 4, generator),
        text_encoder_lora_layers=_text_lora_layers(text_encoder, 4, generator),
        weight_name=LORA_WEIGHTS[0],
    )
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=_lora_layers(unet, _UNET_TARGETS, 2, generator), weight_name=LORA_WEIGHTS[1]
    )


def build_lora_sdxl(folder: Path, cache_dir: Path) -> None:
    """Two SDXL LoRAs: UNet + both text encoders (rank 4), and UNet only (rank 2)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = _base("sdxl", cache_dir)
    unet = _load_unet("sdxl", cache_dir)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
    generator = _seeded(4)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=_lora_layers(unet, _UNET_TARGETS, 4, generator),
        text_encoder_lora_layers=_text_lora_layers(text_encoder, 4, generator),
        text_encoder_2_lora_layers=_text_lora_layers(text_encoder_2, 4, generator),
        weight_name=LORA_WEIGHTS[0],
    )
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=_lora_layers(unet, _UNET_TARGETS, 2, generator), weight_name=LORA_WEIGHTS[1]
    )


# --- textual inversion ------------------------------------------------------------------------------


def _hidden_size(base: Path, subfolder: str) -> int:
    return json.loads((base / subfolder / "config.json").read_text())["hidden_size"]


def build_ti_sd15(folder: Path, cache_dir: Path) -> None:
    """SD1.5 embeddings in both common formats: diffusers (one vector, named) and A1111 (two vectors)."""
    from safetensors.torch import save_file

    dim = _hidden_size(_base("sd15", cache_dir), "text_encoder")
    generator = _seeded(5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({TI_TOKEN: _random_like((dim,), generator, std=1.0)}, folder / TI_SD15_DIFFUSERS)
    save_file({"emb_params": _random_like((2, dim), generator, std=1.0)}, folder / TI_SD15_A1111)


def build_ti_sdxl(folder: Path, cache_dir: Path) -> None:
    """An SDXL embedding as SDXL files ship it: one tensor per text encoder (clip_l, then clip_g)."""
    from safetensors.torch import save_file

    base = _base("sdxl", cache_dir)
    generator = _seeded(6)
    state = {
        "clip_l": _random_like((2, _hidden_size(base, "text_encoder")), generator, std=1.0),
        "clip_g": _random_like((2, _hidden_size(base, "text_encoder_2")), generator, std=1.0),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / TI_SDXL)


# --- single file (original Stable Diffusion checkpoint layout) --------------------------------------

# Inside a ResNet block, diffusers' names -> LDM's (the `ResBlock` of ldm.modules.diffusionmodules).
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers module prefix -> (LDM prefix, renames inside it), for this UNet's block layout.

    LDM numbers its blocks flat: `input_blocks.k` holds one ResNet (`.0`) and its attention (`.1`),
    and a downsampler takes a block of its own; `output_blocks.k` holds layers_per_block + 1 ResNets
    per level, and the upsampler sits after the level's last ResNet (after its attention, if any).
    """
    prefixes = {name: (ldm, {}) for name, ldm in _UNET_TOP_LEVEL.items()}
    levels = len(config["down_block_types"])
    per_level = config["layers_per_block"]
    k = 1
    for level in range(levels):
        for layer in range(per_level):
            prefixes[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{k}.0", _UNET_RESNET_PARTS)
            prefixes[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if level < levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    prefixes["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET_PARTS)
    prefixes["mid_block.attentions.0"] = ("middle_block.1", {})
    prefixes["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET_PARTS)
    k = 0
    for level, block_type in enumerate(config["up_block_types"]):
        for layer in range(per_level + 1):
            prefixes[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{k}.0", _UNET_RESNET_PARTS)
            prefixes[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{k}.1", {})
            k += 1
        if level < levels - 1:
            slot = 2 if "CrossAttn" in block_type else 1
            prefixes[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{slot}.conv", {})
    return prefixes


def _vae_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers module prefix -> (LDM prefix, renames inside it) for an AutoencoderKL.

    LDM numbers the decoder's levels from the bottom (`up.0` is the last one diffusers runs).
    """
    prefixes = {}
    levels = len(config["down_block_types"])
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.conv_in"] = (f"{side}.conv_in", {})
        prefixes[f"{side}.conv_out"] = (f"{side}.conv_out", {})
        prefixes[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        prefixes[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET_PARTS)
        prefixes[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET_PARTS)
        prefixes[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION_PARTS)
    for level in range(levels):
        for layer in range(config["layers_per_block"]):
            prefixes[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}", _VAE_RESNET_PARTS,
            )
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        ldm_level = levels - 1 - level
        for layer in range(config["layers_per_block"] + 1):
            prefixes[f"decoder.up_blocks.{level}.resnets.{layer}"] = (
                f"decoder.up.{ldm_level}.block.{layer}", _VAE_RESNET_PARTS,
            )
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", {})
    prefixes["quant_conv"] = ("quant_conv", {})
    prefixes["post_quant_conv"] = ("post_quant_conv", {})
    return prefixes


def _rename(key: str, prefixes: dict[str, tuple[str, dict[str, str]]], what: str) -> str:
    """`key` under its longest known module prefix, renamed to LDM; a key with none is an error."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            ldm_prefix, inner = prefixes[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{ldm_prefix}.{rest}"
    raise ValueError(f"no LDM name for {what} weight {key!r}: the single-file mapping does not cover this layout")


def _to_ldm_unet(state: dict, config: dict) -> dict:
    prefixes = _unet_prefixes(config)
    return {f"model.diffusion_model.{_rename(k, prefixes, 'UNet')}": v for k, v in state.items()}


def _to_ldm_vae(state: dict, config: dict) -> dict:
    """The VAE under `first_stage_model.`; LDM's mid-block attention uses 1x1 convolutions, not linears."""
    prefixes = _vae_prefixes(config)
    converted = {}
    for key, value in state.items():
        name = _rename(key, prefixes, "VAE")
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]
        converted[f"first_stage_model.{name}"] = value
    return converted


def _to_ldm_text_encoder(state: dict) -> dict:
    """The CLIP text model under `cond_stage_model.transformer.text_model.`, as SD1.5 checkpoints hold it."""
    converted = {}
    for key, value in state.items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        converted[f"cond_stage_model.transformer.{name}"] = value
    return converted


def build_single_file(folder: Path, cache_dir: Path) -> None:
    """The tiny SD1.5 pipeline as one original-layout (LDM) checkpoint, for `from_single_file`.

    Written from the tiny folder's own safetensors, so loading it back must give identical weights.
    """
    from safetensors.torch import load_file, save_file

    base = _base("sd15", cache_dir)
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    vae_config = json.loads((base / "vae" / "config.json").read_text())
    checkpoint = _to_ldm_unet(load_file(base / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
    checkpoint.update(_to_ldm_vae(load_file(base / "vae" / "diffusion_pytorch_model.safetensors"), vae_config))
    checkpoint.update(_to_ldm_text_encoder(load_file(base / "text_encoder" / "model.safetensors")))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, folder / SINGLE_FILE)

