"""Provenance inside the image file.

Every PNG carries an A1111-style `parameters` text chunk, which existing tools (web UIs, image
browsers, metadata viewers) already read, a `catalogen` chunk with the full provenance as JSON, and
an XMP packet with the IPTC digital source type and the generator (catalogen.media.labels, which also
writes the other formats).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from PIL import Image

from catalogen.media import labels

# Our scheduler names -> A1111's sampler name and schedule type.
A1111_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "dpm++_2m": ("DPM++ 2M", None),
    "dpm++_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", None),
    "pndm": ("PLMS", None),
    "lms": ("LMS", None),
    "heun": ("Heun", None),
    "unipc": ("UniPC", None),
}
_FROM_A1111 = {v: k for k, v in A1111_SAMPLERS.items()}

NEGATIVE_PREFIX = "Negative prompt: "
# One `Key: value` item of the settings line; a value is either quoted JSON or runs to the next comma.
_ITEM = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def format_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The A1111 `parameters` text: prompt, negative prompt line, then one settings line."""
    sampler, schedule = A1111_SAMPLERS[scheduler]
    items: dict[str, Any] = {"Steps": steps, "Sampler": sampler}
    if schedule:
        items["Schedule type"] = schedule
    items.update({"CFG scale": guidance_scale, "Seed": seed, "Size": f"{width}x{height}"})
    if model_hash:
        items["Model hash"] = model_hash
    items["Model"] = model
    items.update(extra or {})
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in items.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 `parameters` text back into prompt, negative prompt and typed settings.

    Returns keys prompt, negative_prompt, steps, scheduler, sampler, guidance_scale, seed, width,
    height, model, plus every other setting under its own name.
    """
    *head, settings = text.rstrip("\n").split("\n")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith(NEGATIVE_PREFIX) and not in_negative:
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):]
        (negative_lines if in_negative else prompt_lines).append(line)
    items: dict[str, str] = {}
    for key, value in _ITEM.findall(settings):
        items[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    width, _, height = items.get("Size", "0x0").partition("x")
    sampler = items.get("Sampler", "")
    return {
        **items,
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "\n".join(negative_lines),
        "steps": int(items["Steps"]),
        "sampler": sampler,
        "scheduler": _FROM_A1111.get((sampler, items.get("Schedule type"))),
        "guidance_scale": float(items["CFG scale"]),
        "seed": int(items["Seed"]),
        "width": int(width),
        "height": int(height),
        "model": items.get("Model"),
    }


def encode_png(
    image: Image.Image, parameters: str | None, provenance: dict[str, Any], source_type: str = labels.TRAINED
) -> bytes:
    """PNG bytes with both text chunks (no `parameters` when None) and the XMP label; deterministic
    for the same pixels and provenance. `source_type`: labels.TRAINED for a generated image,
    labels.COMPOSITE for one that keeps a product photo's own pixels."""
    return labels.encode(image, "png", labels.Label(source_type, parameters, provenance))


def read_png_text(path_or_bytes: Any) -> dict[str, str]:
    """The text chunks of a PNG, by key."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        image.load()
        return dict(getattr(image, "text", {}))
