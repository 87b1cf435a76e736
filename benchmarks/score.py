"""What the score stage costs: `score.process` against a bare transformers CLIP + aesthetic head loop.

Both sides score the same PNG files and prompts with the same CLIP model, head weights, device and
batch size, models loaded and warmed up before the clock starts. The stage adds the plan's rows,
image loading through its own helper, the fixed-size padding (of a short last batch, and of every
text to the model's 77 tokens), the hashes of what it read and the result table; the bare loop
opens each batch's files, calls the processor, `get_image_features` and `get_text_features`,
normalises, and runs the head as five `torch.nn.functional.linear` calls over the safetensors
weights. A second bare loop pads its texts to 77 tokens as the stage does (what makes a score
independent of its batch neighbours): the same work, to tell that cost from the stage's own.
Prints images per second of each side, the ratios, and how many scores agree (1e-3).

Each side runs in a fresh process, as benchmarks/overhead.py explains.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/score.py [--images 256] [--batch-size 16] [--repeats 3] [--threads 1]
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

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.caption import make_images  # noqa: E402
from catalogen.config import load_config  # noqa: E402
from catalogen.models.aesthetic import LINEAR_AT, weights_file  # noqa: E402
from catalogen.run.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.run.plan import resolve_stage_models  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.storage.store import RunStore  # noqa: E402
from tasks import score  # noqa: E402

SIDES = ("bare", "bare77", "stage")
WORDS = ["red", "blue", "ceramic", "mug", "chair", "leather", "bag", "on", "a", "white", "background", "lamp"]


def prompt_of(index: int) -> str:
    """A product-like prompt of varying length, different for every image (no text repeats)."""
    return " ".join([*(WORDS[(index * 7 + k) % len(WORDS)] for k in range(3 + index % 6)), "number", str(index)])


def _rows(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table({
        "id": [f"bench-{i:05d}" for i in range(n)],
        "variant": pa.array([0] * n, pa.int32()),
        "seed": pa.array(range(n), pa.int64()),
        "prompt": [prompt_of(i) for i in range(n)],
        "image": paths,
    })


def stage_side(paths: list[str], overrides: dict, work: Path) -> dict:
    """`score.process` over every image, after a warm-up call that loads the models."""
    cfg = load_config(None, overrides)
    identities = resolve_stage_models(cfg)["score"]
    device = visible_devices(cfg.device)[0]
    ctx = StageContext(cfg, RunStore(work), identities, device, default_dtype(device, cfg.dtype))
    planned = score.plan(_rows(paths), cfg, identities)
    score.process(planned.slice(0, cfg.score.batch_size), ctx)  # load and warm up
    started = time.perf_counter()
    out = score.process(planned, ctx)
    wall = time.perf_counter() - started
    return {"wall": wall, "aesthetic": out.column("aesthetic").to_pylist(), "clip": out.column("clip").to_pylist(),
            "device": device.name}


def bare_side(paths: list[str], overrides: dict, full_length: bool = False) -> dict:
    """A plain loop: open a batch of files, CLIP image and text features, the head's five matmuls;
    texts padded to the longest in the batch, or (`full_length`) to the model's 77 tokens."""
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    cfg = load_config(None, overrides)
    identities = resolve_stage_models(cfg)["score"]
    device = visible_devices(cfg.device)[0]
    dtype = default_dtype(device, cfg.dtype)
    model = CLIPModel.from_pretrained(identities["clip"].path, dtype=dtype, use_safetensors=True)
    model = model.to(device.name).eval()
    processor = CLIPProcessor.from_pretrained(identities["clip"].path)
    weights = {k: v.to(device.name) for k, v in load_file(str(weights_file(identities["head"].path))).items()}
    size = cfg.score.batch_size

    def run(start: int) -> tuple[list[float], list[float]]:
        batch = paths[start:start + size]
        images = [Image.open(p).convert("RGB") for p in batch]
        texts = [prompt_of(start + i) for i in range(len(batch))]
        padding = {"padding": "max_length", "max_length": 77} if full_length else {"padding": True}
        inputs = processor(text=texts, images=images, return_tensors="pt", truncation=True, **padding).to(device.name)
        with torch.inference_mode():
            image = model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output.float()
            text = model.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).pooler_output.float()
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            x = image
            for layer in LINEAR_AT:
                x = torch.nn.functional.linear(x, weights[f"layers.{layer}.weight"], weights[f"layers.{layer}.bias"])
        return x[:, 0].tolist(), (100 * (image * text).sum(-1)).clamp(min=0).tolist()

    run(0)  # warm up
    started = time.perf_counter()
    aesthetic, clip = [], []
    for start in range(0, len(paths), size):
        found = run(start)
        aesthetic += found[0]
        clip += found[1]
    wall = time.perf_counter() - started
    return {"wall": wall, "aesthetic": aesthetic, "clip": clip, "device": device.name}


def _agree(a: list[float], b: list[float], tolerance: float = 1e-3) -> int:
    return sum(abs(x - y) <= tolerance for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads per side (default: torch's choice); "
                        "1 steadies the figures on a shared machine")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {"profile": args.profile, "stages": ["score"], "score.batch_size": args.batch_size}
    if args.side:
        if args.threads:
            torch.set_num_threads(args.threads)
        paths = sorted(str(p) for p in (args.work / "images").glob("*.png"))
        if args.side == "stage":
            side = stage_side(paths, overrides, args.work / "run")
        else:
            side = bare_side(paths, overrides, full_length=args.side == "bare77")
        print(json.dumps(side))
        return

    work = Path(tempfile.mkdtemp(prefix="catalogen-score-bench-"))
    make_images(work / "images", args.images, args.size)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit every side alike
        for side in SIDES:
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--side", side, "--work", str(work)],
                capture_output=True, text=True, check=True,
            )
            runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))

    walls = {side: statistics.median(r["wall"] for r in found) for side, found in runs.items()}
    fastest = {side: min(r["wall"] for r in found) for side, found in runs.items()}
    stage, bare = runs["stage"][0], runs["bare"][0]
    print(f"device {stage['device']}, profile {args.profile}, {args.images} images of {args.size}px, "
          f"batch {args.batch_size}, repeats {args.repeats}, threads {args.threads or 'default'}")
    for name, side in (("bare loop", "bare"), ("bare, 77", "bare77"), ("stage", "stage")):
        each = ", ".join(f"{r['wall']:.2f}" for r in runs[side])
        print(f"{name:10}: {walls[side]:7.2f} s  {args.images / walls[side]:7.1f} images/s   (runs: {each} s)")
    for name, side in (("stage/bare", "bare"), ("stage/bare with 77-token texts (same work)", "bare77")):
        print(f"throughput ratio {name}: {walls[side] / walls['stage']:.3f} on medians, "
              f"{fastest[side] / fastest['stage']:.3f} on the fastest runs (target >= 0.95)")
    print(f"scores equal on both sides (1e-3): aesthetic {_agree(stage['aesthetic'], bare['aesthetic'])}/{args.images}, "
          f"clip {_agree(stage['clip'], bare['clip'])}/{args.images}")


if __name__ == "__main__":
    main()
