"""The prompt arguments of one batched pipeline call, for stages that condition on text.

Rows that share a call must share an encoding plan (`encoding_chunks`, and whether they have a
negative prompt), so their embeddings line up; callers put both into their batch signature. Plain
prompts go through the pipeline's own encoding; long or weighted ones are encoded here (see
catalogen/models/prompts.py). This is the same rule tasks/generate.py applies to its own calls.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from catalogen.models.prompts import encode_sd, encode_sdxl, encoding_chunks, plain_text


def is_sdxl(pipe) -> bool:
    return "text_encoder_2" in pipe.components


def prompt_chunks(pipe, prompt: str, negative_prompt: str) -> int:
    """0 if the pipeline can encode both prompts itself, else their common number of 75-token chunks."""
    return encoding_chunks(pipe.tokenizer, prompt, negative_prompt)


def _encode_sdxl_all(pipe, texts: Sequence[str], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = [], []
    for text in texts:
        one, one_pooled = encode_sdxl(pipe, text, chunks)
        embeds.append(one)
        pooled.append(one_pooled)
    return torch.cat(embeds), torch.cat(pooled)


def prompt_arguments(pipe, positive: Sequence[str], negative: Sequence[str], chunks: int) -> dict[str, Any]:
    """Keyword arguments for `pipe(...)` that condition each row on its own prompts.

    Args:
        pipe: an SD1.5- or SDXL-shaped pipeline (any of their task variants).
        positive, negative (`list[str]`): one prompt per row; the negatives all empty or all not.
        chunks (`int`): the rows' common `prompt_chunks` (0: plain prompts).
    """
    has_negative = bool(negative[0])
    if chunks == 0:
        # None, not "", so SDXL zeroes the unconditional embedding exactly as a plain call does.
        negatives = [plain_text(text) for text in negative] if has_negative else None
        return {"prompt": [plain_text(text) for text in positive], "negative_prompt": negatives}
    if not is_sdxl(pipe):
        return {"prompt_embeds": torch.cat([encode_sd(pipe, text, chunks) for text in positive]),
                "negative_prompt_embeds": torch.cat([encode_sd(pipe, text, chunks) for text in negative])}
    embeds, pooled = _encode_sdxl_all(pipe, positive, chunks)
    if has_negative or not pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = _encode_sdxl_all(pipe, negative, chunks)
    else:
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}
