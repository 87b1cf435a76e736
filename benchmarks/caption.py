"""What the caption stage costs: `caption.process` against a bare transformers `generate` loop.

Both sides caption the same PNG files with the same BLIP-2 model, settings, device and batch
size, models loaded and warmed up before the clock starts. The stage adds the plan's rows, image
loading through its own helper, the fixed-size padding of a short last batch, the degenerate
check and the result table; the bare loop opens each batch's files, calls the processor and
`generate`, and decodes the new tokens. Prints captions per second of each side, their ratio, and
how many captions agree.

Each side runs in a fresh process, as benchmarks/overhead.py explains.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/caption.py [--images 64] [--batch-size 8] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
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
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from catalogen.config import load_config  # noqa: E402
from catalogen.run.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.run.plan import resolve_stage_models  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.storage.store import RunStore  # noqa: E402
from tasks import caption  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> list[str]:
    """Coloured rectangles on a light, noisy background: alike enough to be products, each different."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = (np.full((size, size, 3), 235) + rng.integers(0, 15, (size, size, 3))).astype(np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top:top + size // 3, left:left + size // 3] = rng.integers(0, 256, 3)
        path = folder / f"image-{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path.resolve()))
    return paths


def _rows(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table({
        "id": [f"bench-{i:05d}" for i in range(n)],
        "variant": pa.array([0] * n, pa.int32()),
        "seed": pa.array(range(n), pa.int64()),
        "prompt": pa.array([None] * n, pa.string()),
        "image": paths,
    })


def stage_side(paths: list[str], overrides: dict, work: Path) -> dict:
    """`caption.process` over every image, after a warm-up call that loads the model."""
    cfg = load_config(None, overrides)
    identities = resolve_stage_models(cfg)["caption"]
    device = visible_devices(cfg.device)[0]
    ctx = StageContext(cfg, RunStore(work), identities, device, default_dtype(device, cfg.dtype))
    planned = caption.plan(_rows(paths), cfg, identities)
    caption.process(planned.slice(0, cfg.caption.batch_size), ctx)  # load and warm up
    started = time.perf_counter()
    out = caption.process(planned, ctx)
    wall = time.perf_counter() - started
    return {"wall": wall, "captions": out.column("caption").to_pylist(), "device": device.name}


def bare_side(paths: list[str], overrides: dict) -> dict:
    """A plain loop: open a batch of files, run the processor and `generate`, decode the new tokens."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    cfg = load_config(None, overrides)
    identity = resolve_stage_models(cfg)["caption"]["captioner"]
    device = visible_devices(cfg.device)[0]
    dtype = default_dtype(device, cfg.dtype)
    model = Blip2ForConditionalGeneration.from_pretrained(identity.path, dtype=dtype, use_safetensors=True)
    model = model.to(device.name).eval()
    processor = Blip2Processor.from_pretrained(identity.path)
    s = cfg.caption

    def run(batch_paths: list[str]) -> list[str]:
        images = [Image.open(p).convert("RGB") for p in batch_paths]
        inputs = processor(images=images, text=[s.prompt] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(device.name)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]

    run(paths[:s.batch_size])  # warm up
    started = time.perf_counter()
    captions = []
    for start in range(0, len(paths), s.batch_size):
        captions += run(paths[start:start + s.batch_size])
    wall = time.perf_counter() - started
    return {"wall": wall, "captions": captions, "device": device.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads per side (default: torch's choice); "
                        "1 steadies the figures on a shared machine")
    parser.add_argument("--side", choices=["stage", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {
        "profile": args.profile,
        "stages": ["caption"],
        "caption.batch_size": args.batch_size,
        "caption.max_new_tokens": args.max_new_tokens,
    }
    if args.side:
        if args.threads:
            torch.set_num_threads(args.threads)
        paths = sorted(str(p) for p in (args.work / "images").glob("*.png"))
        side = stage_side(paths, overrides, args.work / "run") if args.side == "stage" else bare_side(paths, overrides)
        print(json.dumps(side))
        return

    work = Path(tempfile.mkdtemp(prefix="catalogen-caption-bench-"))
    make_images(work / "images", args.images, args.size)
    runs: dict[str, list[dict]] = {"stage": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
        for side in ("bare", "stage"):
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--side", side, "--work", str(work)],
                capture_output=True, text=True, check=True,
            )
            runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))

    walls = {side: statistics.median(r["wall"] for r in found) for side, found in runs.items()}
    same = sum(a == b for a, b in zip(runs["stage"][0]["captions"], runs["bare"][0]["captions"]))
    print(f"device {runs['stage'][0]['device']}, profile {args.profile}, {args.images} images of {args.size}px, "
          f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, repeats {args.repeats}, "
          f"threads {args.threads or 'default'}")
    for name, side in (("bare loop", "bare"), ("stage", "stage")):
        each = ", ".join(f"{r['wall']:.2f}" for r in runs[side])
        print(f"{name:10}: {walls[side]:7.2f} s  {args.images / walls[side]:7.1f} captions/s   (runs: {each} s)")
    print(f"throughput ratio stage/bare: {walls['bare'] / walls['stage']:.3f}")
    print(f"captions equal on both sides: {same}/{args.images}")


if __name__ == "__main__":
    main()
