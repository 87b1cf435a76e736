"""Opening the image an image-reading stage starts from (its planned `source_image` / `source_bytes`).

NOTE FOR THE MERGE: interim. `catalogen/images.py` (branch `removebg`) is the loader every image
stage should share; when it is merged, the style and upscale stages should call it instead and
this module can go. The rules are the stage contract's (notes/STAGES.md): a relative `source_image`
is an earlier stage's output inside the run folder, an absolute one a catalog file, and
`source_bytes` the image's bytes from the catalog.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, UnidentifiedImageError


class SourceImageError(ValueError):
    """A row's input image cannot be used; the message names the file."""


def open_source(row: Mapping[str, Any], run_folder: Path) -> Image.Image:
    """The row's input image, fully loaded, in its own mode (RGBA cut-outs keep their alpha)."""
    data = row.get("source_bytes")
    where = "the catalog's image bytes"
    if data is None:
        relative = row.get("source_image")
        if not relative:
            raise SourceImageError("the row has no input image (no upstream image and none in the catalog)")
        path = Path(relative) if Path(relative).is_absolute() else run_folder / relative
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SourceImageError(f"cannot read the input image {where}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _rgb_or_rgba(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise SourceImageError(f"{where} is not a readable image: {exc}") from None


def _rgb_or_rgba(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the file has transparency (a palette or grey image may carry it too)."""
    if image.mode in ("RGB", "RGBA"):
        return image.copy()
    has_alpha = image.mode in ("LA", "PA", "RGBa", "La") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")
