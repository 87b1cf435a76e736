"""The shipped configurations run end to end on the demo catalogs, through the real CLI.

These are the commands the README shows; each runs here on two rows with fewer steps.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image
from typer.testing import CliRunner

from catalogen.cli import app

TINY_NOTE = ("profile tiny: real architectures, random weights: images and captions are noise; "
             "use --profile sd15 for real output")
FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


@pytest.mark.parametrize(
    "catalog, config, stages",
    [
        ("demo_products.parquet", "products.yaml", ["enhance", "generate", "remove_bg", "style", "upscale", "renditions"]),
        ("demo_photos.parquet", "photos.yaml", ["remove_bg", "style", "upscale", "renditions"]),
        ("demo_prompts.parquet", "dataset.yaml", ["generate", "caption"]),
    ],
)
def test_a_shipped_configuration_runs_its_demo(tmp_path: Path, monkeypatch, catalog: str, config: str, stages: list):
    monkeypatch.chdir(REPO)  # the configurations name files relative to the repository
    out = tmp_path / "out"
    args = ["run", f"catalogs/{catalog}", "--config", f"configs/{config}", "--out", str(out), "--limit", "2"]
    result = CliRunner().invoke(app, [*args, *(FEWER_STEPS if "style" in stages else ["--set", "generate.steps=2"])])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    df = pd.read_parquet(out / "results.parquet")
    # The tiny profile says what it is, once in the output and in the report's header.
    assert [line for line in result.output.splitlines() if "random weights" in line] == [TINY_NOTE]
    header = re.search(r'<p class="note" id="profile-note">(.*?)</p>', (out / "report.html").read_text())
    assert header is not None and html.unescape(header.group(1)) == TINY_NOTE
    # A degenerate count says why (tasks/caption.py: a caption useless as a label).
    degenerate = int((df.filter(like="_status") == "degenerate").any(axis=1).sum())
    outcome = next(line for line in result.output.splitlines() if line.startswith("2 rows: "))
    assert (f"2 ok ({degenerate} degenerate: captions flagged as useless)" in outcome) if degenerate else \
        "degenerate" not in outcome, outcome
    # The storefront gates (configs/products.yaml): a generated product is repainted, so its image waits
    # for a person, and its renditions until it is approved; a photo's product keeps its pixels: approved.
    gated = catalog == "demo_products.parquet"
    assert len(df) == 2 and (df.status == "ok").all() and (df.stage == stages[-2 if gated else -1]).all()
    assert json.loads((out / "run.json").read_text())["config"]["stages"] == stages
    for stage in stages:
        done = ["skipped"] if gated and stage == "renditions" else ["ok", "fallback", "degenerate"]
        assert df[f"{stage}_status"].isin(done).all(), stage
    assert (df.review_state == ("needs_review" if gated else "approved")).all()
    assert (f"2 row(s) need review: catalogen review {out}" in result.output) == gated, result.output
    if "upscale" in stages:
        for row in df.itertuples():
            with Image.open(out / row.upscale_image_path) as big, Image.open(out / row.style_image_path) as small:
                assert big.size == (row.upscale_factor * small.size[0], row.upscale_factor * small.size[1])
            assert row.style_product_identical
    if "remove_bg" in stages:
        for row in df.itertuples():
            with Image.open(out / row.remove_bg_canvas_path) as canvas:
                assert canvas.size == (128, 128) and canvas.getpixel((0, 0)) == (255, 255, 255)
            cutout = np.asarray(Image.open(out / row.remove_bg_image_path))
            assert cutout.shape[2] == 4 and 0 < (cutout[..., 3] > 127).mean() < 1
    if catalog == "demo_photos.parquet":
        assert df.generate_status.isna().all() if "generate_status" in df else True
        assert df.remove_bg_source_image.str.endswith(".png").all()
