"""What `catalogen review` costs on a big run: the first page of a 100,000-row run, and how long a
decision takes to be on disk (its POST answered: the file is written, synced and renamed first).

Writes a synthetic run folder (results.parquet of --rows rows, --variants per id, and a few real
PNGs; no model runs), starts `catalogen review` on it as a user does, then measures:
- start: from the command to its URL line (results read, products indexed);
- first page: GET / and GET /api/products?page=1 (100 products with every candidate), as the
  page asks, first and median of --repeats; with Chromium (Debian's), navigation to the page drawn;
- a filtered page (state=rejected) after the decisions;
- decisions: --decisions POSTs of /api/decide one after another, p50 and p95 of each answer.

    .venv/bin/python benchmarks/review.py [--rows 100000] [--variants 4] [--decisions 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from catalogen.storage.hashing import sha256_bytes  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IMAGES = 8  # distinct PNGs the rows share


def synthetic_run(folder: Path, rows: int, variants: int) -> Path:
    """A run folder with results.parquet as `catalogen run` writes its main columns, and run.json."""
    folder.mkdir(parents=True)
    paths, shas = [], []
    for i in range(IMAGES):
        path = f"images/generate/{i:02d}/bench-{i}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (256, 256), (30 * i, 100, 200)).save(folder / path)
        paths.append(path)
        shas.append(sha256_bytes((folder / path).read_bytes()))
    ids = [f"product-{i // variants:06d}" for i in range(rows)]
    pick = [i % IMAGES for i in range(rows)]
    table = pa.table({
        "id": ids, "prompt": [f"a product photo of item {i // variants}" for i in range(rows)],
        "variant": pa.array([i % variants for i in range(rows)], pa.int32()),
        "status": ["ok"] * rows, "error": pa.nulls(rows, pa.string()), "stage": ["generate"] * rows,
        "image_path": [paths[p] for p in pick], "image_sha256": [f"{shas[p][:48]}{i:016x}" for i, p in enumerate(pick)],
        "generate_source_prompt": [f"item {i // variants}" for i in range(rows)],
        "generate_prompt": [f"a product photo of item {i // variants}, studio light" for i in range(rows)],
        "generate_status": ["ok"] * rows, "generate_key": [f"{i:064x}" for i in range(rows)],
        "generate_image_path": [paths[p] for p in pick], "generate_image_sha256": [shas[p] for p in pick],
        "generate_image_width": pa.array([256] * rows, pa.int32()),
        "score_aesthetic": [4 + (i * 7919 % 600) / 100 for i in range(rows)],
        "score_clip": [20 + (i * 104729 % 1500) / 100 for i in range(rows)],
        "caption_caption": [f"a photo of item {i // variants}" for i in range(rows)],
    })
    pq.write_table(table, folder / "results.parquet")
    (folder / "run.json").write_text(json.dumps({"catalog": {"path": str(folder / "catalog.parquet")}}))
    return folder


class Client:
    def __init__(self, url: str) -> None:
        found = re.search(r"(http://[^/]+)/\?token=(\S+)", url)
        self.base, token = found.group(1), found.group(2)
        port = self.base.rsplit(":", 1)[1]
        self.cookie = f"catalogen_review_{port}={token}"

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base + path, headers={"Cookie": self.cookie})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers={"Cookie": self.cookie, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


def first_page(client: Client) -> tuple[float, dict]:
    started = time.perf_counter()
    client.get("/")
    page = json.loads(client.get("/api/products?page=1"))
    return time.perf_counter() - started, page


def in_chromium(url: str) -> list[float]:
    """Seconds from navigation to the first page drawn in a headless Chromium, in a fresh page of a
    just-started browser and then again (none without Chromium)."""
    if not Path(CHROMIUM).exists():
        return []
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(2):
            page = browser.new_page()
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("body[data-rendered]")
            times.append(time.perf_counter() - started)
            page.close()
        browser.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
        run = synthetic_run(Path(tmp) / "run", args.rows, args.variants)
        started = time.perf_counter()
        server = subprocess.Popen([str(Path(sys.executable).parent / "catalogen"), "review", str(run), "--port", "0",
                                   "--reviewer", "bench"], stdout=subprocess.PIPE, text=True, env=os.environ)
        try:
            url = server.stdout.readline().split(" at ", 1)[1].split()[0]
            start = time.perf_counter() - started
            client = Client(url)
            first, page = first_page(client)
            again = statistics.median(first_page(client)[0] for _ in range(args.repeats))
            drawn = in_chromium(url)
            items = page["items"]
            latencies = []
            for n in range(args.decisions):
                item = items[n % len(items)]
                kind = ("approve", "reject", "choose")[n % 3]
                variant = item["candidates"][-1]["variant"] if kind == "choose" else item["main"]
                key = next(c["key"] for c in item["candidates"] if c["variant"] == variant)
                sent = time.perf_counter()
                item = client.post("/api/decide", {"id": item["id"], "decision": kind, "variant": variant, "key": key,
                                                   "reason": "benchmark"})["product"]
                latencies.append(time.perf_counter() - sent)
                items[n % len(items)] = item
            filtered = time.perf_counter()
            client.get("/api/products?page=1&state=rejected")
            filtered = time.perf_counter() - filtered
        finally:
            server.terminate()
            server.wait()
    latencies.sort()
    p95 = latencies[max(0, int(0.95 * len(latencies)) - 1)]
    print(f"review page, {args.rows:,} rows ({args.rows // args.variants:,} products x {args.variants} variants)")
    print(f"  start (results read and indexed, URL printed): {start:.2f} s")
    print(f"  first page (GET / + 100 products as JSON):     {first * 1000:.0f} ms first, {again * 1000:.0f} ms median")
    if drawn:
        print(f"  first page drawn in Chromium:                  {drawn[0] * 1000:.0f} ms in a just-started browser, "
              f"{drawn[1] * 1000:.0f} ms again")
    print(f"  a filtered page (state=rejected):              {filtered * 1000:.0f} ms")
    print(f"  decision persisted ({len(latencies)} POSTs):              p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
