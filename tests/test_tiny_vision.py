"""The tiny rembg, BLIP-2 and CLIP models: built once, loaded through the libraries' own APIs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalogen.models.tiny.profile import ensure_tiny
from catalogen.models.tiny.vision import REMBG_GRAPH_NAME, REMBG_MODEL_FILE, rembg_session

# A red rectangle on an off-white, slightly noisy background: rows 20-49, columns 30-69 of 80x96.
HEIGHT, WIDTH = 80, 96
RECT = (slice(20, 50), slice(30, 70))
EDGE = 2  # pixels either side of the rectangle's outline left unchecked: resizing blurs them


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-vision-cache")


def _background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.full((HEIGHT, WIDTH, 3), 240) + rng.integers(0, 10, (HEIGHT, WIDTH, 3))).astype(np.uint8)


def _product_image() -> Image.Image:
    pixels = _background()
    pixels[RECT] = (200, 30, 25)
    return Image.fromarray(pixels)


def _shape_image(colour: tuple[int, int, int], box: tuple[slice, slice]) -> Image.Image:
    pixels = _background()
    pixels[box] = colour
    return Image.fromarray(pixels)


def _inside_and_outside(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = RECT
    inside = alpha[rows.start + EDGE : rows.stop - EDGE, cols.start + EDGE : cols.stop - EDGE]
    near = np.zeros(alpha.shape, dtype=bool)
    near[rows.start - EDGE : rows.stop + EDGE, cols.start - EDGE : cols.stop + EDGE] = True
    return inside, alpha[~near]


# --- rembg ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rembg_folder(cache) -> Path:
    return ensure_tiny("rembg", cache)


@pytest.fixture
def no_downloads(monkeypatch):
    """Fail loudly if rembg reaches for pooch, its downloader for named models."""
    import pooch

    def refuse(*args, **kwargs):
        raise AssertionError(f"rembg tried to download: {args} {kwargs}")

    monkeypatch.setattr(pooch, "retrieve", refuse)
    monkeypatch.delenv("U2NET_HOME", raising=False)


def test_rembg_session_opens_our_file_without_downloading(rembg_folder, no_downloads):
    session = rembg_session(rembg_folder, providers=["CPUExecutionProvider"])

    assert session.name() == "u2net_custom"
    assert session.inner_session.get_modelmeta().graph_name == REMBG_GRAPH_NAME
    assert session.inner_session.get_providers() == ["CPUExecutionProvider"]
    assert "U2NET_HOME" not in os.environ  # the helper restored the environment


def test_rembg_refuses_the_file_without_its_home(rembg_folder, no_downloads):
    """Why `rembg_session` exists: rembg 2.0.86 rejects a model path outside its home folder."""
    from rembg import new_session

    with pytest.raises(ValueError, match="within the models directory"):
        new_session("u2net_custom", model_path=str(rembg_folder / REMBG_MODEL_FILE))


def test_rembg_cuts_out_a_shape_on_a_plain_background(rembg_folder):
    from rembg import remove

    cutout = remove(_product_image(), session=rembg_session(rembg_folder))

    assert cutout.mode == "RGBA" and cutout.size == (WIDTH, HEIGHT)
    inside, outside = _inside_and_outside(np.asarray(cutout)[..., 3])
    assert inside.min() > 200
    assert outside.max() < 50


def test_rembg_finds_nothing_on_a_plain_background(rembg_folder):
    from rembg import remove

    alpha = np.asarray(remove(Image.fromarray(_background(seed=1)), session=rembg_session(rembg_folder)))[..., 3]

    assert alpha.max() < 50  # at most the faint top-left mark that stands for "nothing found"
    assert (alpha > 128).mean() == 0


# --- BLIP-2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip2(cache):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    folder = ensure_tiny("blip2", cache)
    model = Blip2ForConditionalGeneration.from_pretrained(folder, use_safetensors=True).eval()
    return model, Blip2Processor.from_pretrained(folder)


def _three_products() -> list[Image.Image]:
    return [
        _shape_image((200, 30, 25), (slice(10, 60), slice(20, 50))),
        _shape_image((30, 160, 40), (slice(30, 70), slice(40, 90))),
        _shape_image((20, 40, 200), (slice(5, 35), slice(5, 80))),
    ]


def _caption(model, processor, images, prompts, max_new_tokens: int) -> tuple[torch.Tensor, list[str]]:
    """New token ids and decoded captions, the way the caption stage reads them."""
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    # Without a prompt, generate starts from the image tokens and BOS it makes itself.
    prompt_length = inputs["input_ids"].shape[1] if prompts is not None else processor.num_query_tokens + 1
    new = ids[:, prompt_length:]
    return new, processor.batch_decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("prompts", [None, ["a photo of", "a", "the product is a red chair on"]])
def test_blip2_captions_a_batch(blip2, prompts):
    model, processor = blip2

    new, captions = _caption(model, processor, _three_products(), prompts, max_new_tokens=5)

    assert 0 < new.shape[1] <= 5
    assert len(captions) == 3
    assert all(isinstance(caption, str) and caption.strip() for caption in captions)
    assert all(caption.isascii() and caption.isprintable() for caption in captions)
    assert len(set(captions)) > 1  # the image reaches the text


def test_blip2_loads_through_auto_classes(cache):
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        Blip2Processor,
    )

    folder = ensure_tiny("blip2", cache)
    processor = AutoProcessor.from_pretrained(folder)

    assert isinstance(processor, Blip2Processor)
    assert processor.num_query_tokens == 4
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)
    assert isinstance(model, Blip2ForConditionalGeneration)
    assert model.config.image_token_id == image_token


def test_blip2_save_and_reload_give_the_same_captions(blip2, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model, processor = blip2
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path, use_safetensors=True).eval()
    reprocessor = Blip2Processor.from_pretrained(tmp_path)

    prompts = ["a photo of", "", "a"]
    before, _ = _caption(model, processor, _three_products(), prompts, max_new_tokens=6)
    after, _ = _caption(reloaded, reprocessor, _three_products(), prompts, max_new_tokens=6)
    assert torch.equal(before, after)


# --- CLIP ----------------------------------------------------------------------------------------


def test_clip_scores_images_against_texts(cache):
    from transformers import CLIPModel, CLIPProcessor

    folder = ensure_tiny("clip", cache)
    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    images = _three_products()[:2]
    texts = ["a red chair", "a green bottle on a table", "shoes"]

    with torch.no_grad():
        logits = model(**processor(text=texts, images=images, return_tensors="pt", padding=True)).logits_per_image

    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])


# --- Deterministic builds ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rembg", "blip2", "clip"])
def test_builds_are_byte_identical(name, cache, tmp_path):
    first = ensure_tiny(name, cache)
    second = ensure_tiny(name, tmp_path)

    files = sorted(path.name for path in first.iterdir())
    assert files == sorted(path.name for path in second.iterdir())
    for file in files:
        assert (first / file).read_bytes() == (second / file).read_bytes(), f"{name}/{file} differs between builds"
