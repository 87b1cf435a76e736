"""Where a cut-out product goes on a canvas: the rules every stage that places a product follows.

A product is the part of an RGBA cut-out whose alpha is over one half (`alpha_box`). `place`
centres it on a canvas of a solid colour (or a transparent one) and scales it so that it fills
`fill` of the frame: its limiting side spans `fill` of the canvas side it faces. On a square
canvas that is the product's longer side; on another shape it is whichever side reaches the
frame first, so a product never leaves the canvas. Marketplaces ask for this (e.g. a product
filling 85% of a white 1:1 main image); the style stage places products by the same rules.

    >>> canvas, box = place(cutout, canvas_size(1024, "1:1"), fill=0.85, color=(255, 255, 255))
    >>> round(fill_ratio(box, canvas.size), 2)  # to the pixel
    0.85
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageColor

OPAQUE = 128  # alpha at or above this (over one half of 255) is product
_ASPECT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive, as PIL's crop box


def alpha_box(alpha: np.ndarray, threshold: int = OPAQUE) -> Box | None:
    """The bounding box of the pixels whose alpha reaches `threshold`; None when there are none."""
    solid = alpha >= threshold
    rows = np.flatnonzero(solid.any(axis=1))
    cols = np.flatnonzero(solid.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def coverage(alpha: np.ndarray, threshold: int = OPAQUE) -> float:
    """The fraction of the image that is product (alpha at or over one half)."""
    return float(np.count_nonzero(alpha >= threshold)) / alpha.size


def parse_aspect(text: str) -> tuple[int, int]:
    """"4:5" -> (4, 5); raises ValueError for anything else."""
    match = _ASPECT.match(text)
    if not match or not int(match.group(1)) or not int(match.group(2)):
        raise ValueError(f"aspect must be two positive whole numbers as W:H (e.g. 1:1 or 4:5), not {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_color(text: str) -> tuple[int, int, int]:
    """A CSS colour ("#FFFFFF", "white", "rgb(250, 250, 250)") as RGB; raises ValueError otherwise."""
    red, green, blue, *_ = ImageColor.getrgb(text)
    return red, green, blue


def canvas_size(size: int, aspect: str) -> tuple[int, int]:
    """(width, height) of a canvas whose longer side is `size` pixels, at aspect "W:H"."""
    width, height = parse_aspect(aspect)
    if width >= height:
        return size, max(1, round(size * height / width))
    return max(1, round(size * width / height)), size


def fill_ratio(box: Box, size: tuple[int, int]) -> float:
    """How much of the frame a placed box fills: the larger of its width and height shares."""
    x0, y0, x1, y1 = box
    return max((x1 - x0) / size[0], (y1 - y0) / size[1])


def place(
    cutout: Image.Image,
    size: tuple[int, int],
    fill: float,
    color: tuple[int, int, int] | None = (255, 255, 255),
    box: Box | None = None,
) -> tuple[Image.Image, Box]:
    """The product of `cutout` centred on a `size` canvas, scaled to fill `fill` of the frame.

    Args:
        cutout (`PIL.Image.Image`): RGBA; the product is where alpha is over one half.
        size (`tuple[int, int]`): the canvas's width and height.
        fill (`float`): in (0, 1]; the share of the frame the product's limiting side spans.
        color (`tuple`, *optional*): the canvas's RGB colour (an RGB canvas), or None for a
            transparent RGBA canvas another stage composites onto a scene.
        box (`Box`, *optional*): the product's box in `cutout`; default `alpha_box` of its alpha.

    Returns:
        The canvas and the box the product occupies on it.
    """
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], not {fill}")
    cutout = cutout.convert("RGBA")
    box = box or alpha_box(np.asarray(cutout.getchannel("A")))
    if box is None:
        raise ValueError("nothing to place: no pixel of the cut-out is more than half opaque")
    product = cutout.crop(box)
    scale = fill * min(size[0] / product.width, size[1] / product.height)
    width = max(1, min(size[0], round(product.width * scale)))
    height = max(1, min(size[1], round(product.height * scale)))
    product = product.resize((width, height), Image.Resampling.LANCZOS)  # PIL resizes RGBA premultiplied
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    background = (0, 0, 0, 0) if color is None else (*color, 255)
    canvas = Image.new("RGBA", size, background)
    canvas.alpha_composite(product, (left, top))
    if color is not None:
        canvas = canvas.convert("RGB")
    return canvas, (left, top, left + width, top + height)
