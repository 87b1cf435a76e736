"""What the product stages cost: remove_bg, style and upscale against bare loops over the same library calls.

For each stage both sides read the same PNG files and write one PNG per row, with the same model,
settings, device and batch size, the models loaded and warmed up before the clock starts:

- remove_bg: `remove_bg.process` against `rembg.remove(image, session=session)` with one session;
- style: `style.process` against a plain diffusers IP-Adapter inpainting loop (the cut-out placed
  on the canvas, the background inpainted around it, the product pasted back);
- upscale: `upscale.process` against a plain `StableDiffusionControlNetImg2ImgPipeline` loop (the
  input Lanczos-resized as image and control image, seeded as the stage seeds a row's first tile).
  The inputs fit one tile, so both sides make the same call.

- paste: upscale putting the product back from its cut-out (`upscale.paste_product: auto` on rows
  whose product is a catalog photo) against today's upscale of the same rows (`never`), both the
  stage: the extra seconds per row and the ratio, from the medians and the fastest of N repeats.
  Each row is a scene with the product's box and a cut-out 4x the scene's side, as style hands them on.

The stage side adds the plan (keys, identities), the checks, the provenance chunks and the result
table. Every row of a benchmark uses one style image, so a plain batched call is correct there
(rows with different style images need the stage's row-wise embeddings, diffusers #9813). Prints
rows per second of each side, their ratio, and how many output images are pixel-equal.

Each side runs in a fresh process, as benchmarks/overhead.py explains.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/product.py [--stages remove_bg style upscale paste] [--rows 32] [--repeats 3]
    # on a GPU, seconds per 2048x2048 upscale with the real models, tiled:
    .venv/bin/python benchmarks/product.py --profile sd15 --stages upscale --rows 8 --size 1024 --tile-size 512 --steps 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from catalogen.config import RunConfig, load_config  # noqa: E402
from catalogen.run.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.media.placement import place  # noqa: E402
from catalogen.run.plan import prepare, resolve_stage_models  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.storage.store import RunStore  # noqa: E402
from tasks import STAGES  # noqa: E402

STAGE_NAMES = ("remove_bg", "style", "upscale", "paste")
PASTE_MODES = ("never", "auto")  # today's upscale, then the paste-back of a catalog photo's product


# --- inputs ---------------------------------------------------------------------------------------


def product_photo(size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured box on an off-white, slightly noisy background: what remove_bg cuts out."""
    pixels = (np.full((size, size, 3), 240) + rng.integers(0, 10, (size, size, 3))).astype(np.uint8)
    top, left = rng.integers(size // 8, size // 3, 2)
    pixels[top:size - top, left:size - left] = rng.integers(0, 200, 3)
    return Image.fromarray(pixels)


def cut_out(size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy product with an opaque core and a soft edge on transparency: what style places."""
    yy, xx = np.mgrid[0:size, 0:size]
    radius = ((xx + 0.5 - size / 2) / (size / 2.5)) ** 2 + ((yy + 0.5 - size / 2) / (size / 2.2)) ** 2
    alpha = np.clip((1.0 - radius) * 4 * 255, 0, 255).astype(np.uint8)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def scene(size: int, rng: np.random.Generator) -> Image.Image:
    """A smooth gradient with a little noise: what upscale enlarges."""
    ramp = np.linspace(0, 255, size)
    pixels = np.dstack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))])
    return Image.fromarray(np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8))


def make_inputs(work: Path, stage: str, rows: int, size: int) -> None:
    """`work/images/*.png`, a style image, and `work/catalog.parquet` naming them (relative paths);
    for paste also `work/cutouts/*.png` (4x the scene's side) and `work/products.json` (each row's
    cut-out and the product's box on its scene)."""
    rng = np.random.default_rng(0)
    if stage == "paste":
        (work / "cutouts").mkdir(parents=True, exist_ok=True)
        products = []
        for i in range(rows):
            cutout = cut_out(size * 4, rng)
            cutout.save(work / "cutouts" / f"{i:05d}.png")
            _, box = place(cutout, (size, size), 0.8, color=None)
            products.append({"product_source": str(work / "cutouts" / f"{i:05d}.png"), "input_product_bbox": list(box)})
        (work / "products.json").write_text(json.dumps(products))
    draw = {"remove_bg": product_photo, "style": cut_out, "upscale": scene, "paste": scene}[stage]
    (work / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(rows):
        draw(size, rng).save(work / "images" / f"{i:05d}.png")
        paths.append(f"images/{i:05d}.png")
    Image.new("RGB", (32, 32), (200, 90, 40)).save(work / "style.png")
    pq.write_table(pa.table({
        "id": [f"bench-{i:05d}" for i in range(rows)],
        "prompt": [f"a product photo, object {i}, on a wooden table" for i in range(rows)],
        "seed": pa.array(range(rows), pa.int64()),
        "image": paths,
    }), work / "catalog.parquet")


def config(args: argparse.Namespace, stage: str, work: Path) -> RunConfig:
    overrides = {"profile": args.profile, "stages": [stage]}
    if stage not in ("remove_bg", "paste"):  # rembg segments one image at a time; paste is upscale's
        overrides[f"{stage}.batch_size"] = args.batch_size
    if stage == "style":
        overrides |= {"style.steps": args.steps, "style.width": args.canvas, "style.height": args.canvas,
                      "style.style_image": str(work / "style.png")}
    if stage in ("upscale", "paste"):
        overrides |= {"stages": ["upscale"], "upscale.batch_size": args.batch_size, "upscale.steps": args.steps,
                      "upscale.tile_size": args.tile_size or args.size * 2}
    if stage == "paste":
        overrides["upscale.paste_product"] = args.side
    return load_config(None, overrides)


def png_pixels(path: Path) -> str:
    """A digest of the decoded pixels (the files' metadata chunks differ between the sides)."""
    with Image.open(path) as image:
        return hashlib.sha256(image.tobytes() + image.mode.encode()).hexdigest()


# --- the stage side -------------------------------------------------------------------------------


def stage_side(args: argparse.Namespace, stage: str, work: Path) -> dict:
    """`<stage>.process` over every planned row, after a warm-up batch written elsewhere."""
    cfg = config(args, stage, work)
    plan = prepare(work / "catalog.parquet", cfg, work / "stage-run")
    device = visible_devices(cfg.device)[0]
    dtype = default_dtype(device, cfg.dtype)
    stage = "upscale" if stage == "paste" else stage  # paste times the upscale stage itself
    planned = plan.planned[stage]
    module = STAGES[stage]
    if args.stage == "paste":  # as style hands a row on: the product's box on the scene and its cut-out
        products = json.loads((work / "products.json").read_text())
        for column in ("product_source", "input_product_bbox"):
            values = pa.array([p[column] for p in products], planned.schema.field(column).type)
            planned = planned.set_column(planned.schema.get_field_index(column), column, values)

    def ctx(folder: str) -> StageContext:
        return StageContext(cfg, RunStore(work / folder), plan.models[stage], device, dtype)

    module.process(planned.slice(0, args.batch_size), ctx("stage-warm"))  # load and warm up
    started = time.perf_counter()
    out = module.process(planned, ctx("stage-run"))
    wall = time.perf_counter() - started
    statuses = out.column("status").to_pylist()
    pixels = [png_pixels(work / "stage-run" / p) if p else None for p in out.column("image_path").to_pylist()]
    pasted = sum(bool(v) for v in out.column("product_pasted").to_pylist()) if args.stage == "paste" else None
    return {"wall": wall, "ok": statuses.count("ok"), "pixels": pixels, "device": device.name, "pasted": pasted}


# --- the bare sides -------------------------------------------------------------------------------


def _inputs(work: Path) -> tuple[list[Path], list[str], list[int]]:
    catalog = pq.read_table(work / "catalog.parquet").to_pydict()
    return [work / p for p in catalog["image"]], catalog["prompt"], catalog["seed"]


def bare_remove_bg(args: argparse.Namespace, cfg: RunConfig, work: Path, device, dtype):
    """rembg's own call with one session, the cut-out saved as a PNG."""
    from rembg import remove

    from tasks.remove_bg import load_session

    session = load_session(resolve_stage_models(cfg)["remove_bg"]["segmenter"], device.name)
    paths, _, _ = _inputs(work)

    def run(batch: list[int], out: Path) -> None:
        for i in batch:
            with Image.open(paths[i]) as image:
                cutout = remove(image.convert("RGB"), session=session, putalpha=True)
            cutout.convert("RGBA").save(out / f"{i:05d}.png")

    return run


def bare_style(args: argparse.Namespace, cfg: RunConfig, work: Path, device, dtype):
    """Plain diffusers: an inpainting pipeline with the IP-Adapter loaded, one call per batch."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    from catalogen.models.tiny.adapters import IP_ADAPTER_IMAGE_ENCODER, IP_ADAPTER_WEIGHTS

    models = resolve_stage_models(cfg)["style"]
    pipeline, adapter = models["pipeline"], models["ip_adapter"]
    pipe = StableDiffusionInpaintPipeline.from_pretrained(pipeline.path, dtype=dtype, use_safetensors=True,
                                                          safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device.name)
    subfolder, weight_name = IP_ADAPTER_WEIGHTS[pipeline.kind]
    pipe.load_ip_adapter(adapter.path, subfolder=subfolder, weight_name=weight_name,
                         image_encoder_folder=IP_ADAPTER_IMAGE_ENCODER)
    pipe.set_ip_adapter_scale(cfg.style.scale)
    with Image.open(work / "style.png") as image:
        style_image = image.convert("RGB")
    paths, prompts, seeds = _inputs(work)
    size = (args.canvas, args.canvas)

    def run(batch: list[int], out: Path) -> None:
        placed = []
        for i in batch:
            with Image.open(paths[i]) as image:
                placed.append(place(image.convert("RGBA"), size, cfg.style.fill, color=None)[0])
        starts = [Image.alpha_composite(Image.new("RGBA", size, (128, 128, 128, 255)), p).convert("RGB") for p in placed]
        masks = [p.getchannel("A").point(lambda a: 0 if a == 255 else 255) for p in placed]
        with torch.inference_mode():
            images = pipe([prompts[i] for i in batch], image=starts, mask_image=masks, ip_adapter_image=style_image,
                          width=size[0], height=size[1], strength=cfg.style.strength,
                          num_inference_steps=cfg.style.steps, guidance_scale=cfg.style.guidance_scale,
                          generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in batch]).images
        for i, p, generated in zip(batch, placed, images):
            Image.alpha_composite(generated.convert("RGBA"), p).convert("RGB").save(out / f"{i:05d}.png")

    return run


def bare_upscale(args: argparse.Namespace, cfg: RunConfig, work: Path, device, dtype):
    """Plain diffusers: ControlNet-tile img2img on the Lanczos-resized input, one call per batch."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetImg2ImgPipeline

    from tasks.upscale import tile_seed  # the stage seeds each tile from the row's seed and the tile's index

    models = resolve_stage_models(cfg)["upscale"]
    controlnet = ControlNetModel.from_pretrained(models["controlnet"].path, dtype=dtype, use_safetensors=True)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        models["pipeline"].path, controlnet=controlnet, dtype=dtype, use_safetensors=True,
        safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device.name)
    paths, prompts, seeds = _inputs(work)
    s = cfg.upscale

    def run(batch: list[int], out: Path) -> None:
        inputs = []
        for i in batch:
            with Image.open(paths[i]) as image:
                inputs.append(image.convert("RGB").resize((image.width * s.factor, image.height * s.factor),
                                                          Image.Resampling.LANCZOS))
        with torch.inference_mode():
            images = pipe([prompts[i] for i in batch], image=inputs, control_image=inputs, strength=s.strength,
                          num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                          controlnet_conditioning_scale=s.controlnet_conditioning_scale,
                          generator=[torch.Generator("cpu").manual_seed(tile_seed(seeds[i], 0)) for i in batch]).images
        for i, image in zip(batch, images):
            image.save(out / f"{i:05d}.png")

    return run


BARE = {"remove_bg": bare_remove_bg, "style": bare_style, "upscale": bare_upscale}


def bare_side(args: argparse.Namespace, stage: str, work: Path) -> dict:
    cfg = config(args, stage, work)
    device = visible_devices(cfg.device)[0]
    run = BARE[stage](args, cfg, work, device, default_dtype(device, cfg.dtype))
    batch_size = 1 if stage == "remove_bg" else args.batch_size
    batches = [list(range(i, min(i + batch_size, args.rows))) for i in range(0, args.rows, batch_size)]
    for folder in ("bare-warm", "bare-run"):
        (work / folder).mkdir(exist_ok=True)
    run(batches[0], work / "bare-warm")  # load and warm up
    started = time.perf_counter()
    for batch in batches:
        run(batch, work / "bare-run")
    wall = time.perf_counter() - started
    pixels = [png_pixels(work / "bare-run" / f"{i:05d}.png") for i in range(args.rows)]
    return {"wall": wall, "ok": args.rows, "pixels": pixels, "device": device.name}


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=list(STAGE_NAMES))
    parser.add_argument("--rows", type=int, default=32, help="rows per stage (a multiple of --batch-size)")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels for style and upscale "
                        "(remove_bg reads 8x larger photos); upscale's tile is 2x this, so one tile per row")
    parser.add_argument("--tile-size", type=int, help="upscale's tile (default 2 x --size: one tile, the same call "
                        "as the bare loop's); smaller tiles the stage's output, e.g. --profile sd15 --size 1024 "
                        "--tile-size 512 on a GPU times a 2048x2048 upscale in 25 tiles")
    parser.add_argument("--canvas", type=int, default=32, help="style's canvas side in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of style and upscale")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads per side (default: torch's choice)")
    parser.add_argument("--side", choices=["stage", "bare", *PASTE_MODES], help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows % args.batch_size:
        parser.error("--rows must be a multiple of --batch-size (a short last batch is padded by the stage only)")
    if args.side:
        if args.threads:
            torch.set_num_threads(args.threads)
        side = bare_side if args.side == "bare" else stage_side
        print(json.dumps(side(args, args.stage, args.work)))
        return

    print(f"profile {args.profile}, {args.rows} rows, batch {args.batch_size}, steps {args.steps}, "
          f"repeats {args.repeats}, threads {args.threads or 'default'}")
    for stage in args.stages:
        work = Path(tempfile.mkdtemp(prefix=f"catalogen-{stage}-bench-"))
        make_inputs(work, stage, args.rows, args.size * 8 if stage == "remove_bg" else args.size)
        sides = PASTE_MODES if stage == "paste" else ("bare", "stage")
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
            for side in sides:
                child = subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--side", side, "--stage", stage, "--work", str(work)],
                    capture_output=True, text=True,
                )
                if child.returncode:
                    sys.exit(f"{stage} {side} side failed:\n{child.stderr[-4000:]}")
                runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
        if stage == "paste":
            report_paste(args, runs)
            continue
        walls = {side: statistics.median(r["wall"] for r in found) for side, found in runs.items()}
        same = sum(a == b for a, b in zip(runs["stage"][0]["pixels"], runs["bare"][0]["pixels"]))
        print(f"\n{stage} on {runs['stage'][0]['device']}: {runs['stage'][0]['ok']}/{args.rows} rows ok in the stage")
        for name, side in (("bare loop", "bare"), ("stage", "stage")):
            each = ", ".join(f"{r['wall']:.2f}" for r in runs[side])
            print(f"  {name:10}: {walls[side]:7.2f} s  {args.rows / walls[side]:7.1f} rows/s  "
                  f"{walls[side] / args.rows:7.3f} s/row   (runs: {each} s)")
        fastest = {side: min(r["wall"] for r in found) for side, found in runs.items()}
        print(f"  throughput ratio stage/bare: {walls['bare'] / walls['stage']:.3f} (medians), "
              f"{fastest['bare'] / fastest['stage']:.3f} (fastest runs, less touched by other load)")
        print(f"  pixel-equal images on both sides: {same}/{args.rows}")


def report_paste(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    """The paste-back's extra seconds per row and its time ratio to today's upscale (never)."""
    today, pasting = runs["never"], runs["auto"]
    print(f"\npaste-back on {today[0]['device']}: {pasting[0]['pasted']}/{args.rows} rows pasted, "
          f"{pasting[0]['ok']}/{args.rows} ok; {args.repeats} repeats of each side, interleaved")
    for label, pick in (("medians", statistics.median), ("fastest", min)):
        never, auto = pick(r["wall"] for r in today), pick(r["wall"] for r in pasting)
        print(f"  {label:8}: upscale {never / args.rows:7.3f} s/row, with paste-back {auto / args.rows:7.3f} s/row, "
              f"extra {(auto - never) / args.rows * 1000:+8.1f} ms/row, ratio {auto / never:.3f}")


if __name__ == "__main__":
    main()
