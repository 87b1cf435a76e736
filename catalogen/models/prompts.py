"""Prompts beyond CLIP's 77 tokens, and A1111 emphasis such as `(word:1.3)`.

LLM-written prompts are long and use weights, so truncating them at 77 tokens or reading the
brackets literally would quietly drop what the user asked for. A prompt that needs neither goes
through the pipeline's own encoding untouched (so plain prompts match plain diffusers exactly);
one that does is encoded here as A1111 does it: 75-token chunks, each framed by BOS/EOS and
encoded separately, concatenated along the sequence, with each token's embedding scaled by its
weight and the whole rescaled to keep its original mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111: (x) strengthens by 1.1, [x] weakens by 1.1
CHUNK_TOKENS = 75  # 77 minus BOS and EOS

_PIECE = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash: literal
    r"|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)"  # ":1.3)" closes a weighted group
    r"|[()\[\]]"
    r"|[^\\()\[\]:]+"
    r"|[\\:]"
)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments by A1111's emphasis rules.

    `(a)` x1.1, `[a]` /1.1, `(a:w)` xw, nesting multiplies, `\\(` is a literal bracket; a bracket
    left open weights the rest of the prompt, a stray closing one is kept as text.
    """
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            fragments.append([piece[1], 1.0])
        elif piece == "(":
            round_open.append(len(fragments))
        elif piece == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, including brackets and ":1.3)" that close nothing
            fragments.append([piece, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    weights: list[float]

    @property
    def chunks(self) -> int:
        return max(1, -(-len(self.ids) // CHUNK_TOKENS))


def tokenize(tokenizer, text: str) -> Tokens:
    """Token ids (no BOS/EOS, never truncated) with each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse_weights(text):
        if fragment:
            found = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids
            ids += found
            weights += [weight] * len(found)
    return Tokens(ids, weights)


def plain_text(text: str) -> str:
    """The prompt with its emphasis syntax removed, as the text encoder should read it."""
    return "".join(fragment for fragment, _ in parse_weights(text))


def encoding_chunks(tokenizer, *texts: str) -> int:
    """0 if the pipeline can encode all of `texts` itself; else the number of 75-token chunks each
    must be encoded in (the same for all, so their embeddings line up)."""
    tokens = [tokenize(tokenizer, text) for text in texts]
    if all(len(t.ids) <= CHUNK_TOKENS and all(w == 1.0 for w in t.weights) for t in tokens):
        return 0
    return max(t.chunks for t in tokens)


def _chunk_inputs(tokenizer, tokens: Tokens, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks, 77) ids framed as the pipeline frames one prompt, and their weights."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, weights = [], []
    for c in range(chunks):
        part = tokens.ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        part_w = tokens.weights[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        fill = CHUNK_TOKENS - len(part)
        ids.append([bos, *part, eos] + [pad] * fill)
        weights.append([1.0, *part_w, 1.0] + [1.0] * fill)
    return torch.tensor(ids), torch.tensor(weights)


def _weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore each chunk's original mean.

    Where a chunk's mean is (close to) zero the ratio is meaningless, and that chunk is only scaled.
    """
    if bool((weights == 1.0).all()):
        return hidden
    weights = weights.to(hidden.device, torch.float32).unsqueeze(-1)
    scaled = hidden.float() * weights
    before = hidden.float().mean(dim=(-2, -1), keepdim=True)
    after = scaled.mean(dim=(-2, -1), keepdim=True)
    meaningful = after.abs() > 1e-4 * scaled.abs().mean(dim=(-2, -1), keepdim=True)
    ratio = torch.where(meaningful, before / torch.where(meaningful, after, torch.ones_like(after)), torch.ones_like(after))
    return (scaled * ratio).to(hidden.dtype)


def encode_sd(pipe, text: str, chunks: int) -> torch.Tensor:
    """SD1.5-style conditioning, (1, 77 * chunks, dim), as the pipeline's encoder output."""
    ids, weights = _chunk_inputs(pipe.tokenizer, tokenize(pipe.tokenizer, text), chunks)
    device = pipe.text_encoder.device
    hidden = pipe.text_encoder(ids.to(device))[0]
    return _weighted(hidden, weights).reshape(1, -1, hidden.shape[-1])


def encode_sdxl(pipe, text: str, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: both encoders' penultimate layers side by side, and the pooled output
    of the second encoder for the first chunk (as the pipeline pools a single 77-token prompt)."""
    per_encoder, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids, weights = _chunk_inputs(tokenizer, tokenize(tokenizer, text), chunks)
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if out[0].ndim == 2:  # the projection model: keep its pooled embedding
            pooled = out[0][:1]
        hidden = out.hidden_states[-2]
        per_encoder.append(_weighted(hidden, weights).reshape(1, -1, hidden.shape[-1]))
    return torch.cat(per_encoder, dim=-1), pooled
