"""Stable Diffusion pipelines, loaded once per process and shared by the stages that use them.

Every load goes through `models.cached`, so a worker that runs several stages keeps one copy of
each model per device, within the memory budget.
"""

from __future__ import annotations

import torch

from catalogen.models import ModelIdentity, cached


def load_pipeline(identity: ModelIdentity, device: str, dtype: torch.dtype, budget_gb: float | None = None):
    """A text-to-image pipeline (SD1.5- or SDXL-shaped), from safetensors only."""

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

    key = ("pipeline", identity.repo, identity.revision, device, str(dtype))
    return cached(key, device, build, budget_gb)
