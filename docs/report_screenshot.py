"""docs/report.png: a screenshot of a run's report.html, for the README.

    catalogen run catalogs/demo_prompts.parquet --profile tiny --out outputs/demo
    python docs/report_screenshot.py outputs/demo docs/report.png

Uses the system's Chromium (Debian `chromium`), headless, as tests/test_report.py does.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

# Lazy images below the fold never load in a screenshot of the viewport: wait for the others only.
VISIBLE_IMAGES_LOADED = """Array.from(document.images)
  .filter(i => i.getBoundingClientRect().top < innerHeight)
  .every(i => i.complete && i.naturalWidth > 0)"""


def screenshot(run_dir: Path, target: Path, fragment: str = "", width: int = 1200, height: int = 1500) -> None:
    """The report's top `height` px (summary, then the first rows), saved as a small palette PNG."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=ARGS, viewport={"width": width, "height": height})
        page = context.new_page()
        page.goto((run_dir / "report.html").resolve().as_uri() + fragment)
        page.wait_for_selector("body[data-rendered]")
        page.wait_for_function(VISIBLE_IMAGES_LOADED)
        shot = page.screenshot()
        context.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=128)
    image.save(target, optimize=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
