"""Placing a product cut-out on a canvas: the product centred and scaled to a share of the canvas.

NOTE FOR THE MERGE: written on branch `style` because `catalogen/placement.py` (branch `removebg`,
which uses it for the marketplace image) did not exist there yet. It is the style stage's only
need: `place(cutout_rgba, canvas_size, fill)`. When both branches merge, keep one `place` with this
signature and these rules (the alpha bounding box centred, scaled to `fill` of the canvas).
"""

from __future__ import annotations

from PIL import Image


def product_box(cutout: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box (left, top, right, bottom) of the cut-out's visible pixels (alpha > 0).

    An image without alpha is all product. A fully transparent cut-out has no product to place.
    """
    if cutout.mode != "RGBA":
        return (0, 0, cutout.width, cutout.height)
    box = cutout.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"the cut-out ({cutout.width}x{cutout.height}) is fully transparent: no product to place")
    return box


def place(cutout_rgba: Image.Image, canvas_size: tuple[int, int], fill: float = 0.8) -> Image.Image:
    """An RGBA canvas of `canvas_size` (width, height), transparent but for the product.

    The product's bounding box is scaled, keeping its aspect ratio, until its longer side (relative
    to the canvas) takes `fill` of the canvas, then centred. Resizing works on premultiplied alpha,
    so transparent pixels' colours never bleed into the product's edge.
    """
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], not {fill}")
    width, height = canvas_size
    product = cutout_rgba.convert("RGBA").crop(product_box(cutout_rgba))
    scale = fill * min(width / product.width, height / product.height)
    size = (max(1, round(product.width * scale)), max(1, round(product.height * scale)))
    if size != product.size:
        product = product.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    canvas.paste(product, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas
