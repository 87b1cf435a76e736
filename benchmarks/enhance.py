"""What the enhance stage costs: `enhance.process` against a bare transformers `generate` loop.

Both sides ask the same chat model (the profile's; tiny on a CPU here, Qwen2.5-1.5B-Instruct with
`--profile sd15` on a GPU) for the same prompts with the same system prompt, chat template, greedy
decoding, `max_new_tokens` and batch size, the model loaded and warmed up before the clock starts.
The stage adds the plan's rows, the answer cache (a fresh, empty one) and the parser; the bare loop
applies the chat template, calls `generate` and decodes the new tokens. Then the stage runs the
same rows again, every answer now in the cache: rows per second with no model call at all.

Each side runs in a fresh process, as benchmarks/overhead.py explains.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/enhance.py [--prompts 64] [--batch-size 8] [--repeats 3]
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

from catalogen.config import load_config  # noqa: E402
from catalogen.run.devices import default_dtype, visible_devices  # noqa: E402
from catalogen.run.plan import resolve_stage_models  # noqa: E402
from catalogen.stage import StageContext  # noqa: E402
from catalogen.storage.store import RunStore  # noqa: E402
from tasks import enhance  # noqa: E402
from tasks.llm import LocalBackend, system_prompt  # noqa: E402

SUBJECTS = ["stoneware mug", "cast iron teapot", "canvas tote", "trail shoe", "brass lamp", "oak chair",
            "field watch", "water bottle"]
FINISHES = ["sand", "black", "olive", "blue", "brass", "natural", "green", "orange"]


def prompts(count: int) -> list[str]:
    return [f"{SUBJECTS[i % 8]}, {FINISHES[(i // 8) % 8]}, product photo, variation {i}" for i in range(count)]


def rows(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table({"id": [f"bench-{i:05d}" for i in range(n)], "variant": pa.array([0] * n, pa.int32()),
                     "seed": pa.array(range(n), pa.int64()), "prompt": texts})


def stage_side(texts: list[str], overrides: dict, work: Path) -> dict:
    def context(cache: str) -> StageContext:
        cfg = load_config(None, {**overrides, "enhance.answer_cache": str(work / cache)})
        device = visible_devices(cfg.device)[0]
        return StageContext(cfg, RunStore(work / "run"), models, device, default_dtype(device, cfg.dtype))

    models = resolve_stage_models(load_config(None, overrides))["enhance"]
    warm = context("warm-up.sqlite")
    enhance.process(enhance.plan(rows(["a warm-up prompt"]), warm.config, models), warm)  # loads the model
    ctx = context("answers.sqlite")
    device = ctx.device
    planned = enhance.plan(rows(texts), ctx.config, models)
    started = time.perf_counter()
    first = enhance.process(planned, ctx)
    wall = time.perf_counter() - started
    started = time.perf_counter()
    again = enhance.process(planned, ctx)
    cached = time.perf_counter() - started
    assert all(again.column("cached").to_pylist())
    return {"wall": wall, "cached": cached, "answers": first.column("raw_answer").to_pylist(), "device": device.name}


def bare_side(texts: list[str], overrides: dict) -> dict:
    cfg = load_config(None, overrides)
    identity = resolve_stage_models(cfg)["enhance"]["llm"]
    settings = enhance.effective(cfg)
    device = visible_devices(cfg.device)[0]
    dtype = default_dtype(device, cfg.dtype)
    # The same model, tokenizer and generation config the stage's backend builds, called directly.
    backend = LocalBackend(identity.path, device.name, dtype, settings)
    tokenizer, model, config = backend.tokenizer, backend.model, backend.generation_config
    system = system_prompt(settings)

    def ask(batch: list[str]) -> list[str]:
        conversations = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in batch]
        inputs = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                               return_tensors="pt", return_dict=True).to(device.name)
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config)
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    ask(["a warm-up prompt"])
    answers: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(texts), settings.batch_size):
        answers += ask(texts[start:start + settings.batch_size])
    return {"wall": time.perf_counter() - started, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["stage", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {"profile": args.profile, "stages": ["enhance"], "enhance.batch_size": args.batch_size,
                 "enhance.max_new_tokens": args.max_new_tokens}
    texts = prompts(args.prompts)
    if args.side:
        side = stage_side(texts, overrides, args.work) if args.side == "stage" else bare_side(texts, overrides)
        print(json.dumps(side))
        return

    runs: dict[str, list[dict]] = {"stage": [], "bare": []}
    for repeat in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
        for side in ("bare", "stage"):
            work = Path(tempfile.mkdtemp(prefix=f"catalogen-enhance-bench-{repeat}-"))
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side, "--work", str(work)],
                                   capture_output=True, text=True, check=True)
            runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    walls = {side: statistics.median(r["wall"] for r in found) for side, found in runs.items()}
    cached = statistics.median(r["cached"] for r in runs["stage"])
    same = sum(a == b for a, b in zip(runs["stage"][0]["answers"], runs["bare"][0]["answers"]))
    print(f"device {runs['stage'][0]['device']}, profile {args.profile}, {args.prompts} prompts, batch "
          f"{args.batch_size}, max_new_tokens {args.max_new_tokens}, greedy, repeats {args.repeats}")
    for name, side in (("bare loop", "bare"), ("stage", "stage")):
        each = ", ".join(f"{r['wall']:.2f}" for r in runs[side])
        print(f"{name:10}: {walls[side]:7.2f} s  {args.prompts / walls[side]:8.1f} prompts/s   (runs: {each} s)")
    print(f"throughput ratio stage/bare: {walls['bare'] / walls['stage']:.3f}")
    print(f"stage, every answer cached: {cached:.3f} s  {args.prompts / cached:8.0f} rows/s")
    print(f"answers equal on both sides: {same}/{args.prompts}")


if __name__ == "__main__":
    main()
