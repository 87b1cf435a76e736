"""Draw one picture of a product run's stages, row by row, from a run folder (for the README).

    catalogen run catalogs/demo_photos.parquet --config configs/photos.yaml --out outputs/photos
    python docs/stages_picture.py outputs/photos docs/product-stages.png

Each row: the catalog's photo (or generate's image), remove_bg's cut-out (on a checkerboard, so
its transparency shows), the marketplace image, the styled scene and the upscaled result. On the
tiny profile (random weights) every generated pixel is noise; the product's own pixels are not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

CELL = 128
COLUMNS = [("input", "remove_bg_source_image"), ("cut-out", "remove_bg_image_path"),
           ("marketplace", "remove_bg_canvas_path"), ("styled", "style_image_path"), ("upscaled x2", "upscale_image_path")]


def checkerboard(size: int, square: int = 8) -> Image.Image:
    board = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(board)
    for y in range(0, size, square):
        for x in range((y // square) % 2 * square, size, 2 * square):
            draw.rectangle((x, y, x + square - 1, y + square - 1), fill=(222, 222, 222))
    return board


def cell(run: Path, value: str | None) -> Image.Image:
    tile = checkerboard(CELL)
    if not value:
        return tile
    path = Path(value) if Path(value).is_absolute() else run / value
    with Image.open(path) as image:
        image = image.convert("RGBA")
        scale = CELL / max(image.size)  # small images are enlarged (nearest), so their pixels show
        method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        image = image.resize((round(image.width * scale), round(image.height * scale)), method)
        tile.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2), image)
    return tile


def main(run: Path, target: Path, rows: int = 3) -> None:
    df = pd.read_parquet(run / "results.parquet").head(rows)
    header = 22
    sheet = Image.new("RGB", (CELL * len(COLUMNS) + 8 * (len(COLUMNS) + 1), header + (CELL + 8) * len(df) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (title, _) in enumerate(COLUMNS):
        draw.text((8 + index * (CELL + 8), 6), title, fill=(40, 40, 40))
    for row_number, row in enumerate(df.itertuples()):
        for index, (_, column) in enumerate(COLUMNS):
            sheet.paste(cell(run, getattr(row, column, None)), (8 + index * (CELL + 8), header + row_number * (CELL + 8)))
    sheet.save(target, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
