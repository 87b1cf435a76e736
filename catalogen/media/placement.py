"""Where a cut-out product goes on a canvas: the rules every stage that places a product follows.

A product is the part of an RGBA cut-out whose alpha is over one half (`alpha_box`). `place`
centres it on a canvas of a solid colour (or a transparent one) and scales it so that it fills
`fill` of the frame: its limiting side spans `fill` of the canvas side it faces. On a square
canvas that is the product's longer side; on another shape it is whichever side reaches the
frame first, so a product never leaves the canvas. Marketplaces ask for this (e.g. a product
filling 85% of a white 1:1 main image); the style stage places products by the same rules.

Stages that keep a product's own pixels share the rest: `product_layer` resizes a cut-out's product
once into a given box (style places it there, upscale puts it back there at the output size),
`composite` lays that layer over a generated scene in exact integer arithmetic, and
`product_pixels_equal` checks a written file against the layer.

    >>> canvas, box = place(cutout, canvas_size(1024, "1:1"), fill=0.85, color=(255, 255, 255))
    >>> round(fill_ratio(box, canvas.size), 2)  # to the pixel
    0.85
"""

from __future__ import annotations

import io
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
    """A CSS colour ("#FFFFFF", "white", "rgb(250, 250, 250)", "hsl(40, 100%, 50%)") as RGB; raises
    ValueError otherwise. Settings are checked with this same function that paints them, because
    Pillow's parser passes channels out of 0..255 through (`rgb(300,0,0)`, `hsl(0,150%,50%)`), and
    an alpha the canvas would drop (`rgba(0,0,0,0)` painted black) is refused too."""
    try:
        channels = ImageColor.getrgb(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a colour: give #RRGGBB, #RGB, a CSS name, rgb(R, G, B) "
                         "or hsl(H, S%, L%)") from None
    wrong = [f"{name} {value}" for name, value in zip(("red", "green", "blue", "alpha"), channels)
             if not 0 <= value <= 255]
    if wrong:
        raise ValueError(f"{text!r} is not a colour: {', '.join(wrong)} (each channel is 0 to 255)")
    if len(channels) == 4 and channels[3] != 255:
        raise ValueError(f"{text!r} has alpha {channels[3]}, but the colour is painted opaque: give it without alpha")
    red, green, blue = channels[:3]
    return red, green, blue


def color_hex(text: str) -> str:
    """A colour setting as it is stored: `#RRGGBB` of `parse_color` (which refuses what it cannot paint)."""
    return "#{:02X}{:02X}{:02X}".format(*parse_color(text))


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
    product_width, product_height = box[2] - box[0], box[3] - box[1]
    scale = fill * min(size[0] / product_width, size[1] / product_height)
    width = max(1, min(size[0], round(product_width * scale)))
    height = max(1, min(size[1], round(product_height * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    placed = (left, top, left + width, top + height)
    background = (0, 0, 0, 0) if color is None else (*color, 255)
    canvas = product_layer(cutout, size, placed, box, background)
    if color is not None:
        canvas = canvas.convert("RGB")
    return canvas, placed


def product_layer(
    cutout: Image.Image,
    size: tuple[int, int],
    target: Box,
    box: Box | None = None,
    background: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> Image.Image:
    """An RGBA canvas of `size` (transparent by default) holding the product of `cutout` resized once
    (Lanczos) into `target`.

    Resizing from the cut-out itself, never from an earlier stage's smaller copy, is what keeps a
    catalog photo's detail at any output size. `box` is the product's box in `cutout` (default its
    `alpha_box`).
    """
    cutout = cutout.convert("RGBA")
    box = box or alpha_box(np.asarray(cutout.getchannel("A")))
    if box is None:
        raise ValueError("nothing to place: no pixel of the cut-out is more than half opaque")
    width, height = target[2] - target[0], target[3] - target[1]
    product = cutout.crop(box).resize((width, height), Image.Resampling.LANCZOS)  # PIL resizes RGBA premultiplied
    layer = Image.new("RGBA", size, background)
    layer.alpha_composite(product, (target[0], target[1]))
    return layer


def scale_box(box: Box, factor: int) -> Box:
    """A box in an image enlarged `factor` times: the same place, in the larger image's pixels."""
    x0, y0, x1, y1 = box
    return x0 * factor, y0 * factor, x1 * factor, y1 * factor


def composite(layer: Image.Image, scene: np.ndarray) -> np.ndarray:
    """The product layer (RGBA) over a generated scene (RGB uint8), weighted by its alpha, in exact
    integer arithmetic: where alpha is 255 the result is the layer's own pixel, bit for bit."""
    rgba = np.asarray(layer).astype(np.uint32)
    alpha = rgba[..., 3:4]
    blended = (rgba[..., :3] * alpha + scene.astype(np.uint32) * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def product_pixels_equal(png: bytes, layer: Image.Image) -> bool:
    """Whether the written file holds the product layer's own pixels wherever it is opaque."""
    with Image.open(io.BytesIO(png)) as image:
        written = np.asarray(image.convert("RGB"))
    rgba = np.asarray(layer)
    opaque = rgba[..., 3] == 255
    return bool(np.array_equal(written[opaque], rgba[..., :3][opaque]))
