"""The tiny add-on models, loaded through the real diffusers APIs exactly as the coming stages will.

Each test checks that an add-on loads from its standard layout and that it really acts: a ControlNet
whose control image changed nothing, or a LoRA at weight 1 that left the image alone, would pass a
test that only looked for an image.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from catalogen.models.tiny import adapters as tiny_adapters
from catalogen.models.tiny.profile import TINY_MODELS, ensure_tiny, tiny_root

FAST = {"num_inference_steps": 3, "output_type": "np"}
ADD_ONS = [name for name in TINY_MODELS if name not in ("sd15", "sdxl")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-adapters")
    for name in TINY_MODELS:
        ensure_tiny(name, root)
    return root


def model(cache: Path, name: str) -> Path:
    return tiny_root(cache) / name


def noise_image(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Style references a tiny CLIP tells apart clearly (two noise images embed almost alike).
STYLES = {1: (220, 30, 30), 2: (30, 30, 220), 3: (30, 200, 60), 4: (240, 220, 40)}


def style_image(style: int) -> Image.Image:
    return Image.new("RGB", (32, 32), STYLES[style])


def right_half_mask(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_to_image(family: str, cache: Path):
    """The plain tiny pipeline, loaded from its folder as a stage would (SD1.5 without its checker)."""
    if family == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(model(cache, "sd15"), safety_checker=None)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(model(cache, "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = "a red door", seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(prompt, generator=seeded(seed), height=32, width=32, **FAST, **kwargs).images


def max_change(a: np.ndarray, b: np.ndarray) -> float:
    """The largest pixel difference, in [0, 1] units (1/255 is one step of an 8-bit image)."""
    return float(np.abs(a - b).max())


def folder_digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digests[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# --- builds -------------------------------------------------------------------------------------------


def test_add_ons_build_byte_identically(cache: Path, tmp_path: Path):
    # Same seed, same bytes: an add-on's hash can go into a stage's key and match on every machine.
    for name in ADD_ONS:
        first, again = folder_digests(model(cache, name)), folder_digests(ensure_tiny(name, tmp_path))
        assert first and first == again, name
    ip = model(cache, "ip-adapter")
    assert {"models/image_encoder/config.json", "models/image_encoder/preprocessor_config.json"} <= set(folder_digests(ip))
    for name in ("lora-sd15", "lora-sdxl"):
        assert sorted(folder_digests(model(cache, name))) == sorted(tiny_adapters.LORA_WEIGHTS)


def test_ip_adapter_keys_follow_the_original_numbering(cache: Path):
    # One pair per cross-attention (attn2) processor, numbered over all processors: 1, 3, 5, ...
    for family, (subfolder, weight_name) in tiny_adapters.IP_ADAPTER_WEIGHTS.items():
        unet = text_to_image(family, cache).unet
        cross = [i for i, name in enumerate(unet.attn_processors) if name.endswith("attn2.processor")]
        with safe_open(model(cache, "ip-adapter") / subfolder / weight_name, "pt") as f:
            keys = set(f.keys())
        expected = {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias"}
        for index in cross:
            expected |= {f"ip_adapter.{index}.to_k_ip.weight", f"ip_adapter.{index}.to_v_ip.weight"}
        assert keys == expected, family
        assert cross == list(range(1, 2 * len(cross), 2))  # what diffusers' loader assumes (key_id += 2)


# --- ControlNet ---------------------------------------------------------------------------------------


def controlnet_img2img(family: str, cache: Path):
    controlnet = ControlNetModel.from_pretrained(model(cache, f"controlnet-{family}"))
    if family == "sd15":
        pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            model(cache, "sd15"), controlnet=controlnet, safety_checker=None
        )
    else:
        pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(model(cache, "sdxl"), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tile_upscale(pipe, source: Image.Image, control: Image.Image) -> np.ndarray:
    return pipe("a red door", image=source, control_image=control, strength=0.8, generator=seeded(), **FAST).images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_tile_runs_and_the_control_image_matters(cache: Path, family: str):
    pipe = controlnet_img2img(family, cache)
    for size in (32, 64):
        source = noise_image(1, size)
        as_tile = tile_upscale(pipe, source, control=source)
        other = tile_upscale(pipe, source, control=noise_image(2, size))
        assert as_tile.shape == (1, size, size, 3)
        assert max_change(as_tile, other) > 0.01, (family, size)
        assert np.array_equal(as_tile, tile_upscale(pipe, source, control=source))  # and it is deterministic


# --- IP-Adapter ---------------------------------------------------------------------------------------


def with_ip_adapter(family: str, cache: Path):
    pipe = text_to_image(family, cache)
    subfolder, weight_name = tiny_adapters.IP_ADAPTER_WEIGHTS[family]
    folder = model(cache, "ip-adapter")
    if family == "sd15":
        pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight_name)
    else:
        pipe.load_ip_adapter(
            folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=tiny_adapters.IP_ADAPTER_IMAGE_ENCODER
        )
    return pipe


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ip_adapter_styles_text_to_image_and_scale_zero_removes_it(cache: Path, family: str):
    without = generate(text_to_image(family, cache))
    pipe = with_ip_adapter(family, cache)
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    style_a = generate(pipe, ip_adapter_image=style_image(1))
    style_b = generate(pipe, ip_adapter_image=style_image(2))
    assert max_change(style_a, style_b) > 0.02
    assert max_change(style_a, without) > 0.02
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(generate(pipe, ip_adapter_image=style_image(1)), without)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ip_adapter_styles_inpainting(cache: Path, family: str):
    # The style stage inpaints a scene around a product: same components, inpainting pipeline.
    components = with_ip_adapter(family, cache).components
    if family == "sd15":
        pipe = StableDiffusionInpaintPipeline(**components)
    else:
        pipe = StableDiffusionXLInpaintPipeline(**components)
    product = noise_image(5)
    common = {"image": product, "mask_image": right_half_mask(), "strength": 0.8}
    style_a = generate(pipe, ip_adapter_image=style_image(1), **common)
    style_b = generate(pipe, ip_adapter_image=style_image(2), **common)
    assert style_a.shape == (1, 32, 32, 3)
    assert max_change(style_a, style_b) > 0.01


# diffusers #9813. `ip_adapter_image` is a list with one entry PER ADAPTER, not per row; an entry may be
# a list of images, and then every row sees all of them. Precomputed `ip_adapter_image_embeds` with one
# row each are repeated batch-size times, so rows again see each other's images. Only embeddings passed
# through unchanged keep rows apart. These tests pin that behaviour of diffusers 0.42.1: if one fails
# after an upgrade, the upgrade changed IP-Adapter batching, and the style stage should be revisited.

PROMPTS = ["a red door", "a blue boat"]


def batch_of_two(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPTS, generator=[seeded(10), seeded(11)], height=32, width=32, **FAST, **kwargs).images


def row_embeds(pipe, styles: list[int]) -> list[torch.Tensor]:
    """Per-row IP-Adapter embeddings in the layout the UNet reads: all negative rows, then all positive."""
    negative, positive = [], []
    for style in styles:
        embeds = pipe.prepare_ip_adapter_image_embeds(style_image(style), None, "cpu", 1, True)[0]
        negative_row, positive_row = embeds.chunk(2)
        negative.append(negative_row)
        positive.append(positive_row)
    return [torch.cat(negative + positive)]


def passed_through(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance):
    """Stands in for `prepare_ip_adapter_image_embeds`: uses per-row embeddings as given (the workaround)."""
    return [embeds.to(device) for embeds in ip_adapter_image_embeds]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ip_adapter_batch_rows_mix_unless_embeddings_pass_through(cache: Path, family: str):
    pipe = with_ip_adapter(family, cache)
    with pytest.raises(ValueError, match="same length as the number of IP Adapters"):
        batch_of_two(pipe, ip_adapter_image=[style_image(1), style_image(2)])

    # A list of images for the one adapter: row 0's image changes with its neighbour's style.
    nested_12 = batch_of_two(pipe, ip_adapter_image=[[style_image(1), style_image(2)]])
    nested_13 = batch_of_two(pipe, ip_adapter_image=[[style_image(1), style_image(3)]])
    assert max_change(nested_12[0], nested_13[0]) > 0.01

    # One style for the whole batch is safe: row 0 then matches row 0 of the per-row workaround below.
    shared_1 = batch_of_two(pipe, ip_adapter_image=style_image(1))

    # Per-row embeddings through the stock pipeline: the same (#9813).
    embeds_12, embeds_13, embeds_42 = row_embeds(pipe, [1, 2]), row_embeds(pipe, [1, 3]), row_embeds(pipe, [4, 2])
    stock_12 = batch_of_two(pipe, ip_adapter_image_embeds=embeds_12)
    stock_13 = batch_of_two(pipe, ip_adapter_image_embeds=embeds_13)
    assert max_change(stock_12[0], stock_13[0]) > 0.01

    # The workaround: hand the per-row embeddings to the UNet unchanged. Each row is then its own.
    pipe.prepare_ip_adapter_image_embeds = passed_through
    rows_12 = batch_of_two(pipe, ip_adapter_image_embeds=embeds_12)
    rows_13 = batch_of_two(pipe, ip_adapter_image_embeds=embeds_13)
    rows_42 = batch_of_two(pipe, ip_adapter_image_embeds=embeds_42)
    assert np.array_equal(rows_12[0], rows_13[0]) and np.array_equal(rows_12[1], rows_42[1])
    assert max_change(rows_12[0], rows_42[0]) > 0.01  # and a row's own style still counts
    assert np.array_equal(rows_12[0], shared_1[0])


# --- LoRA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_adapters_load_combine_and_unload(cache: Path, family: str):
    pipe = text_to_image(family, cache)
    base = generate(pipe)
    first, second = tiny_adapters.LORA_WEIGHTS
    pipe.load_lora_weights(model(cache, f"lora-{family}"), weight_name=first, adapter_name="a")
    pipe.load_lora_weights(model(cache, f"lora-{family}"), weight_name=second, adapter_name="b")
    expected = {"unet": ["a", "b"], "text_encoder": ["a"]}  # the second file has no text-encoder layers
    if family == "sdxl":
        expected["text_encoder_2"] = ["a"]
    assert pipe.get_list_adapters() == expected

    pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 0.0])
    assert np.array_equal(generate(pipe), base)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    only_a = generate(pipe)
    pipe.set_adapters(["b"], adapter_weights=[1.0])
    only_b = generate(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    mixed = generate(pipe)
    for changed in (only_a, only_b, mixed):
        assert max_change(changed, base) > 0.01
    assert max_change(only_a, only_b) > 0.01 and max_change(mixed, only_a) > 0.01
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)


# --- textual inversion --------------------------------------------------------------------------------


def test_textual_inversion_sd15_both_formats(cache: Path):
    pipe = text_to_image("sd15", cache)
    token = tiny_adapters.TI_TOKEN
    assert len(pipe.tokenizer.tokenize(f"a {token} door")) > 6  # character-level before loading
    plain = generate(pipe, "a door")
    pipe.load_textual_inversion(model(cache, "ti-sd15"), weight_name=tiny_adapters.TI_SD15_DIFFUSERS)
    assert token in pipe.tokenizer.get_vocab()
    assert pipe.tokenizer.tokenize(f"a {token} door") == ["a</w>", token, "d", "o", "o", "r</w>"]
    styled = generate(pipe, f"a {token} door")
    assert max_change(styled, plain) > 0.01
    assert np.array_equal(generate(pipe, "a door"), plain)  # the token, not the load, changes the image

    pipe.load_textual_inversion(model(cache, "ti-sd15"), weight_name=tiny_adapters.TI_SD15_A1111, token="<a1111>")
    assert pipe.maybe_convert_prompt("a <a1111> door", pipe.tokenizer) == "a <a1111> <a1111>_1 door"
    assert max_change(generate(pipe, "a <a1111> door"), plain) > 0.01


def test_textual_inversion_sdxl_loads_into_both_text_encoders(cache: Path):
    pipe = text_to_image("sdxl", cache)
    token = tiny_adapters.TI_TOKEN
    plain = generate(pipe, "a door")
    state = load_file(model(cache, "ti-sdxl") / tiny_adapters.TI_SDXL)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        prompt = pipe.maybe_convert_prompt(f"a {token} door", tokenizer)
        assert tokenizer.tokenize(prompt)[:3] == ["a</w>", token, f"{token}_1"]
    assert max_change(generate(pipe, f"a {token} door"), plain) > 0.01


# --- single file --------------------------------------------------------------------------------------


def test_single_file_loads_offline_with_identical_weights(cache: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"from_single_file tried the network: {args}")

    path = model(cache, "single-file") / tiny_adapters.SINGLE_FILE
    with safe_open(path, "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}  # the LDM layout

    folder = text_to_image("sd15", cache)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(model(cache, "sd15")), safety_checker=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(folder, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == loaded.keys(), name
        unequal = [key for key in expected if not torch.equal(expected[key], loaded[key])]
        assert not unequal, (name, unequal[:3])
    assert np.array_equal(generate(pipe), generate(folder))
