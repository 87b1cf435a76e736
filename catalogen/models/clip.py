"""CLIP, once for every stage that uses it: loading, image and text embeddings, and their agreement.

caption (its `clip_score`) and score (`score_clip`, and the embedding its aesthetic head reads) call
these functions with the same model: one implementation, one number for the same image and text,
and one load per process (the cache key is the same, see `load_clip`).

Every call runs at a fixed batch size (short lists padded with copies of their last item) and
texts are padded to the model's full length, so an embedding never depends on its batch
neighbours. Embeddings come back L2-normalised, in float32, for the real items only.

May import: catalogen.config, catalogen.models.loading (the cache) and below; no stage.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from catalogen.config import ModelSpec
from catalogen.models.loading import ModelIdentity, cached

KIND = "clip"
# The CLIP each profile uses by default (caption's score and the score stage share it).
_TINY = ModelSpec(repo="tiny:clip", kind=KIND)
_REAL = ModelSpec(repo="openai/clip-vit-large-patch14", kind=KIND)
PROFILE_CLIP: dict[str, ModelSpec] = {"tiny": _TINY, "tiny-sdxl": _TINY, "sd15": _REAL, "sdxl": _REAL}
# The background a transparent image (a cut-out) is read on: BLIP-2 and CLIP take RGB.
BACKGROUND = (255, 255, 255)


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; transparent pixels (a cut-out's background) become `BACKGROUND`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def padded(items: list, size: int) -> list:
    """`items` filled up to `size` with copies of the last one (their results are dropped)."""
    return items + [items[-1]] * (size - len(items))


def load_clip(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None) -> Any:
    """A CLIP model and its processor from the model's folder (safetensors only), once per process."""

    def build():
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(identity.path, dtype=dtype, use_safetensors=True)
        return model.to(device).eval(), CLIPProcessor.from_pretrained(identity.path)

    return cached((KIND, identity.repo, identity.revision, device, str(dtype)), device, build, budget_gb)


def _normalised(embeds: torch.Tensor, real: int, dtype: torch.dtype) -> torch.Tensor:
    found = torch.nn.functional.normalize(embeds[:real].float(), dim=-1)
    if not torch.isfinite(found).all():
        hint = "" if dtype == torch.float32 else "; try dtype float32"
        raise FloatingPointError(f"the CLIP model produced NaN or infinite embeddings ({dtype}){hint}")
    return found


def image_embeddings(clip: Any, images: list[Image.Image], size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The L2-normalised image embeddings (CLIP's projection), one row per image, float32."""
    model, processor = clip
    pixels = processor(images=padded(images, size), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        embeds = model.get_image_features(pixel_values=pixels.to(device, dtype)).pooler_output
    return _normalised(embeds, len(images), dtype)


def text_embeddings(clip: Any, texts: list[str], size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The L2-normalised text embeddings, one row per text (cut at, and padded to, the model's length)."""
    model, processor = clip
    inputs = processor.tokenizer(
        padded(texts, size), return_tensors="pt", padding="max_length", truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
    ).to(device)
    with torch.inference_mode():
        embeds = model.get_text_features(input_ids=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"]).pooler_output
    return _normalised(embeds, len(texts), dtype)


def agreement(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """CLIPScore without its weight's rounding: max(100 x cosine, 0), per (image, text) pair."""
    return (100 * (image_embeds * text_embeds).sum(dim=-1)).clamp(min=0).tolist()


def clip_scores(clip: Any, images: list[Image.Image], texts: list[str], size: int, device: str,
                dtype: torch.dtype) -> list[float]:
    """`agreement` of each image with its text, both embedded at batch size `size`."""
    return agreement(image_embeddings(clip, images, size, device, dtype),
                     text_embeddings(clip, texts, size, device, dtype))
