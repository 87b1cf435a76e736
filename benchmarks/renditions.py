"""What the renditions stage costs: `renditions.process` against a bare Pillow loop.

Both sides make the same renditions (by default the presets marketplace-main, shop-square and
thumb) of the same RGBA cut-outs with the same settings: the product on a white 2000 px square
at 85% (Lanczos), the image padded into a 2048 px square, 400 px on the long side; JPEG q90 4:4:4
or WebP at the preset's quality, sRGB ICC profile embedded, one file per rendition written to disk.
The stage adds reading through the run folder's helpers (size limits, decoding to RGB/RGBA),
reading the source's label, the XMP, EXIF and provenance it writes, the sha256 of every file and
the result table; the bare loop opens each file, resizes, pastes and saves. No model, no device.

Prints renditions per second of each side (median of `--repeats`, each side alternately, after a
warm-up) and their ratio (stage / bare: 1.0 means the stage costs nothing extra), also on the
fastest run of each side (on a shared machine the medians swing).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/renditions.py [--images 16] [--size 768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from catalogen.config import load_config  # noqa: E402
from catalogen.run.devices import Device  # noqa: E402
from catalogen.media.labels import EXTENSIONS, PIL_FORMATS, srgb_profile  # noqa: E402
from catalogen.media.placement import alpha_box  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.storage.store import RunStore  # noqa: E402
from tasks import renditions  # noqa: E402

PRESETS = ["marketplace-main", "shop-square", "thumb"]


def make_cutouts(store: RunStore, count: int, size: int) -> list[str]:
    """RGBA cut-outs (an opaque, noisy product in a transparent frame), written into the run folder."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = np.zeros((size, size, 4), dtype=np.uint8)
        top, left = rng.integers(size // 10, size // 4, 2)
        bottom, right = size - rng.integers(size // 10, size // 4, 2)
        pixels[top:bottom, left:right, :3] = rng.integers(0, 256, (bottom - top, right - left, 3))
        pixels[top:bottom, left:right, 3] = 255
        relative = f"images/remove_bg/bench-{i:04d}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
        store.write_image(relative, buffer.getvalue())
        paths.append(relative)
    return paths


def planned_rows(paths: list[str]) -> pa.Table:
    """The stage's planned rows: every source (final and remove_bg) is the cut-out."""
    n = len(paths)
    columns = {field.name: pa.nulls(n, field.type) for field in renditions.PLAN_SCHEMA}
    columns.update({"id": pa.array([f"bench-{i:05d}" for i in range(n)]), "variant": pa.array([0] * n, pa.int32()),
                    "key": pa.array([f"{i:064x}" for i in range(n)]), "source_image": pa.array(paths),
                    "from_remove_bg": pa.array(paths)})
    return pa.table(columns, schema=renditions.PLAN_SCHEMA)


def stage_side(planned: pa.Table, ctx: StageContext) -> float:
    started = time.perf_counter()
    out = renditions.process(planned, ctx)
    wall = time.perf_counter() - started
    assert set(out.column("status").to_pylist()) == {"ok"}, out.column("error").to_pylist()
    return wall


def bare_one(image: Image.Image, item: renditions.Rendition) -> Image.Image:
    """The same pixels as `renditions.render`, written out with Pillow only."""
    lanczos = Image.Resampling.LANCZOS
    if item.fill is not None:
        width, height = renditions.parse_box(item.box)
        box = alpha_box(np.asarray(image.getchannel("A")))
        product = image.crop(box)
        scale = item.fill * min(width / product.width, height / product.height)
        product = product.resize((round(product.width * scale), round(product.height * scale)), lanczos)
        canvas = Image.new("RGB", (width, height), item.color())
        canvas.paste(product, ((width - product.width) // 2, (height - product.height) // 2), product)
        return canvas
    if item.box is not None:
        box = renditions.parse_box(item.box)
        resized = ImageOps.contain(image, box, lanczos)
        canvas = Image.new("RGBA", box, (*item.color(), 255))
        canvas.paste(resized, ((box[0] - resized.width) // 2, (box[1] - resized.height) // 2), resized)
        return canvas.convert("RGB")
    resized = ImageOps.contain(image, (item.size, item.size), lanczos)
    flat = Image.new("RGBA", resized.size, (*item.color(), 255))
    return Image.alpha_composite(flat, resized).convert("RGB")


def bare_side(paths: list[str], root: Path, items: list[renditions.Rendition], folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    icc = srgb_profile()
    started = time.perf_counter()
    for i, relative in enumerate(paths):
        with Image.open(root / relative) as opened:
            image = opened.convert("RGBA")
        for item in items:
            options = {"quality": item.quality, "icc_profile": icc}
            if item.format == "jpeg":
                options["subsampling"] = 0
            if item.format == "webp":
                options["method"] = 4
            bare_one(image, item).save(folder / f"{i}.{item.name}.{EXTENSIONS[item.format]}",
                                       format=PIL_FORMATS[item.format], **options)
    return time.perf_counter() - started


def bench_duplicates(rows: int = 1_000_000, max_distance: int = 6, repeats: int = 3) -> dict[str, float]:
    """Near-duplicates at the end of a run: `catalogen.media.duplicates.group` over `rows` synthetic pHashes
    (1% planted near-duplicates), median and fastest of `repeats`, against the 60 s goal for a million.
    The code lives in benchmarks/duplicates.py, which `make bench` also runs on its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_duplicates", Path(__file__).with_name("duplicates.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bench_grouping(rows, max_distance, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=768, help="the cut-outs' side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--renditions", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--duplicates", action="store_true",
                        help="also time near-duplicate grouping of 1,000,000 synthetic pHashes (bench_duplicates)")
    args = parser.parse_args()

    cfg = load_config(None, {"stages": ["remove_bg", "renditions"], "renditions": args.renditions.split(",")})
    items = cfg.renditions.items
    with tempfile.TemporaryDirectory(prefix="catalogen-bench-renditions-") as work:
        store = RunStore(Path(work) / "run")
        paths = make_cutouts(store, args.images, args.size)
        planned = planned_rows(paths)
        ctx = StageContext(cfg, store, {}, Device("cpu", "cpu"), torch.float32)
        stage_side(planned.slice(0, 1), ctx)  # warm up both sides (codecs, the ICC profile)
        root = Path(str(store.root))  # a local folder: the bare loop opens its files directly
        bare_side(paths[:1], root, items, Path(work) / "bare")
        stage_walls, bare_walls = [], []
        for repeat in range(args.repeats):
            stage_walls.append(stage_side(planned, ctx))
            bare_walls.append(bare_side(paths, root, items, Path(work) / f"bare-{repeat}"))
    made = args.images * len(items)
    stage_rate, bare_rate = made / statistics.median(stage_walls), made / statistics.median(bare_walls)
    print(f"renditions: {args.images} cut-outs of {args.size} px x {len(items)} renditions ({args.renditions}), "
          f"{args.repeats} repeats, medians")
    print(f"  stage   {stage_rate:7.2f} renditions/s   (walls {', '.join(f'{w:.2f}' for w in stage_walls)} s)")
    print(f"  bare    {bare_rate:7.2f} renditions/s   (walls {', '.join(f'{w:.2f}' for w in bare_walls)} s)")
    print(f"  ratio   {stage_rate / bare_rate:7.3f}   (stage / bare Pillow loop, medians; "
          f"{min(bare_walls) / min(stage_walls):.3f} on the fastest runs)")
    if args.duplicates:
        bench_duplicates(repeats=args.repeats)


if __name__ == "__main__":
    main()
