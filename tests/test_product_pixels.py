"""The product survives to the last pixel (#15): after style, upscale repaints the scene and puts the
product back from the catalog photo's own cut-out at the output size, resized once.

Checked through the CLI on the shipped configurations, on a photo with fine text (against
`upscale.paste_product=never`, today's repainting), and on the stage for generated products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, context, fast_config, plan_table, write_catalog
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.media.placement import alpha_box
from catalogen.publish.report import with_product_crops
from tasks import upscale

FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


def run_cli(catalog: str, config: str, out: Path, *extra: str) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["run", catalog, "--config", config, "--out", str(out), *FEWER_STEPS, *extra])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "results.parquet")


def expected_product(out: Path, row) -> tuple[np.ndarray, np.ndarray]:
    """The photo's cut-out resized once (Pillow Lanczos) to the final image's product box: RGB, and
    where its matte is opaque."""
    with Image.open(out / row.remove_bg_image_path) as cutout:
        cutout = cutout.convert("RGBA")
    x0, y0, x1, y1 = (int(v) for v in row.upscale_product_bbox)
    product = cutout.crop(alpha_box(np.asarray(cutout.getchannel("A"))))
    resized = np.asarray(product.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
    return resized[..., :3].astype(int), resized[..., 3] == 255


def final_crop(out: Path, row) -> np.ndarray:
    with Image.open(out / row.image_path) as final:
        return np.asarray(final.convert("RGB").crop(tuple(int(v) for v in row.upscale_product_bbox))).astype(int)


@pytest.mark.parametrize("config, limit", [("configs/photos.yaml", "3"), ("configs/products.yaml", "2")])
def test_the_final_product_is_the_photos_cut_out_resized_once(tmp_path: Path, monkeypatch, config: str, limit: str):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    df = run_cli("catalogs/demo_photos.parquet", config, out, "--limit", limit)
    assert (df.status == "ok").all() and (df.stage == "renditions").all()  # the shipped configurations end with renditions
    assert df.product_identical.all() and df.upscale_product_pasted.all() and df.upscale_product_identical.all()
    for row in df.itertuples():
        expected, opaque = expected_product(out, row)
        assert opaque.sum() > 100, row.id
        assert np.abs(final_crop(out, row)[opaque] - expected[opaque]).max() <= 1, row.id
        # the box is style's box at the output's scale, and the enlargement is said, not hidden
        assert list(row.upscale_product_bbox) == [v * row.upscale_factor for v in row.style_product_bbox]
        x0, y0, x1, y1 = row.upscale_product_bbox
        product = (row.remove_bg_bbox_x1 - row.remove_bg_bbox_x0, row.remove_bg_bbox_y1 - row.remove_bg_bbox_y0)
        assert row.upscale_product_source_scale == pytest.approx(max((x1 - x0) / product[0], (y1 - y0) / product[1]))
    if config == "configs/photos.yaml":  # factor: auto never leaves the product below its photo's resolution
        assert (df.upscale_product_source_scale >= 1).all() and (df.upscale_factor == 3).any()
        assert_report_shows_the_product_beside_its_photo(out, df)


def assert_report_shows_the_product_beside_its_photo(out: Path, df: pd.DataFrame) -> None:
    assert '"upscale.product","upscale.photo"' in (out / "report-data" / "index.js").read_text()
    table, names = with_product_crops(pq.read_table(out / "results.parquet"), out, ["remove_bg", "style", "upscale"])
    assert names == ["upscale.product", "upscale.photo"]
    for row, final, photo in zip(df.itertuples(), table.column("upscale_product_path").to_pylist(),
                                 table.column("upscale_photo_path").to_pylist()):
        with Image.open(out / final) as shown, Image.open(out / row.image_path) as image:
            assert np.array_equal(np.asarray(shown), np.asarray(image.convert("RGB").crop(tuple(row.upscale_product_bbox))))
        with Image.open(out / photo) as shown, Image.open(out / row.remove_bg_source_image) as source:
            box = (row.remove_bg_bbox_x0, row.remove_bg_bbox_y0, row.remove_bg_bbox_x1, row.remove_bg_bbox_y1)
            assert np.array_equal(np.asarray(shown), np.asarray(source.convert("RGB").crop(box)))  # the photo's own pixels


def text_photo(path: Path) -> None:
    """A label with fine black text on a light box, on an off-white background."""
    image = Image.new("RGB", (160, 160), (244, 244, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((24, 20, 136, 140), fill=(250, 226, 120))
    for line in range(9):
        draw.text((30, 26 + line * 12), f"LOT {line}7-X9 net 250g", fill=(0, 0, 0))
    image.save(path)


def test_fine_text_on_a_photo_keeps_its_pixels_where_repainting_loses_them(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    text_photo(tmp_path / "label.png")
    catalog = write_catalog(tmp_path / "catalog.parquet", {"id": ["label"], "title": ["a label"], "image": ["label.png"]})
    kept = run_cli(str(catalog), "configs/photos.yaml", tmp_path / "kept").iloc[0]
    repainted = run_cli(str(catalog), "configs/photos.yaml", tmp_path / "repainted",
                        "--set", "upscale.paste_product=never").iloc[0]
    assert kept.upscale_product_pasted and kept.product_identical
    assert not repainted.upscale_product_pasted and repainted.product_identical == False  # noqa: E712 - numpy bool
    expected, opaque = expected_product(tmp_path / "kept", kept)
    ink = opaque & (expected.sum(axis=2) < 200)  # the text's own pixels (dark), where the product is opaque
    assert ink.sum() > 50
    assert np.abs(final_crop(tmp_path / "kept", kept)[ink] - expected[ink]).max() <= 1
    assert list(repainted.upscale_product_bbox) == list(kept.upscale_product_bbox)
    lost = np.abs(final_crop(tmp_path / "repainted", repainted)[ink] - expected[ink])
    assert lost.mean() > 10  # repainted, the text is not the photo's


def cut_out_and_scene(out: Path) -> tuple[str, list[int]]:
    """A generated product's cut-out (64 px, soft edge) written in the run folder, and its box on a 32 px scene."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:64, 0:64]
    alpha = np.clip((1.0 - ((xx - 32) / 26) ** 2 - ((yy - 32) / 22) ** 2) * 4 * 255, 0, 255).astype(np.uint8)
    cutout = Image.fromarray(np.dstack([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), alpha]), "RGBA")
    (out / "cut").mkdir(parents=True, exist_ok=True)
    cutout.save(out / "cut" / "p.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / "cut" / "scene.png")
    return "cut/p.png", [4, 6, 28, 26]


@pytest.mark.parametrize("mode, pasted", [("auto", False), ("always", True), ("never", False)])
def test_a_generated_product_is_repainted_unless_paste_product_is_always(tmp_path: Path, mode: str, pasted: bool):
    out = tmp_path / "run"
    catalog = pa.table({"id": ["g"], "prompt": ["a mug"], "seed": [1]})  # no photo: a generated product
    cfg = fast_config(**{"stages": ["generate", "style", "upscale"], "upscale.steps": 2, "upscale.guidance_scale": 1.0,
                         "upscale.paste_product": mode, "upscale.factor": "auto",
                         "style.style_image": str(REPO / "catalogs" / "styles" / "sage-dots.png")})
    plan = plan_table(catalog, cfg, out)
    source, box = cut_out_and_scene(out)
    planned = plan.planned["upscale"]
    for column, value in (("source_image", "cut/scene.png"), ("product_source", source), ("input_product_bbox", box)):
        planned = planned.set_column(planned.schema.get_field_index(column), column,
                                     pa.array([value], planned.schema.field(column).type))
    # upscale called directly, its input as style would hand it off: a scene, the product's box and cut-out
    row = upscale.process(planned, context(plan, "upscale")).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    assert row["factor"] == 3  # the cut-out's product, 49 x 41 px, does not fit 2 x (24 x 20); it fits 3 x
    assert row["product_bbox"] == [v * 3 for v in box] and row["product_pasted"] is pasted
    assert row["product_identical"] is pasted  # False: a product was there, and was repainted


def test_auto_factor_reaches_the_cut_outs_size_within_2_to_4():
    assert upscale.auto_factor((0, 0, 50, 40), (0, 0, 99, 60)) == 2
    assert upscale.auto_factor((0, 0, 50, 40), (0, 0, 101, 60)) == 3
    assert upscale.auto_factor((0, 0, 10, 10), (0, 0, 100, 100)) == 4
    assert upscale.auto_factor((0, 0, 50, 50), (0, 0, 20, 20)) == 2
