"""Renditions (tasks/renditions.py): the files each channel takes, made by real tiny-profile runs.

The presets' numbers are measured on the written files (size, white 255 around the product, the
product's fill, JPEG quality tables, the sRGB ICC profile); labels are read by exiftool and by an
sd-parsers-style reader (tests/test_labels.py), never by the code that wrote them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, write_catalog
from PIL import Image
from test_labels import CODES, assert_full_chroma, exif_read, sd_parsers_parameters
from typer.testing import CliRunner

from catalogen.media import labels
from catalogen.cli import app
from catalogen.config import ConfigError, load_config, parse_override
from catalogen.media.pngmeta import parse_parameters
from catalogen.run.plan import config_faults

FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def run(catalog: str, out: Path, *args: str) -> pd.DataFrame:
    cli("run", catalog, "--out", str(out), *args)
    return pd.read_parquet(out / "results.parquet")


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """configs/products.yaml on two demo products, as the README runs it (fewer steps)."""
    out = tmp_path_factory.mktemp("products") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return out, run("catalogs/demo_products.parquet", out, "--config", "configs/products.yaml", "--limit", "2",
                        "--set", "renditions.only=all", *FEWER_STEPS)  # every row, not only approved ones


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """configs/photos.yaml on one demo photo."""
    out = tmp_path_factory.mktemp("photos") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return out, run("catalogs/demo_photos.parquet", out, "--config", "configs/photos.yaml", "--limit", "1",
                        *FEWER_STEPS)


def recorded(out: Path, row, name: str) -> Path:
    """A rendition's file, checked against what the row records of it (sha256, bytes, size)."""
    path = out / row[f"renditions_{name}_path"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == row[f"renditions_{name}_sha256"]
    assert len(data) == row[f"renditions_{name}_bytes"]
    with Image.open(path) as image:
        assert image.size == (row[f"renditions_{name}_width"], row[f"renditions_{name}_height"])
    return path


# --- the shipped configurations -------------------------------------------------------------------


def test_products_get_a_labelled_marketplace_jpeg_and_shop_webp(products):
    out, df = products
    assert (df.status == "ok").all() and (df.renditions_status == "ok").all() and len(df) == 2
    for _, row in df.iterrows():
        main, square = recorded(out, row, "marketplace-main"), recorded(out, row, "shop-square")
        generated = out / row.generate_image_path
        found = dict(zip(("main", "square", "generated"), exif_read([main, square, generated])))
        assert (found["main"]["File:MIMEType"], found["square"]["File:MIMEType"]) == ("image/jpeg", "image/webp")
        stage_images = [out / row[f"{stage}_image_path"] for stage in ("remove_bg", "style", "upscale")]
        for name, item in [*found.items(), *zip(("remove_bg", "style", "upscale"), exif_read(stage_images))]:
            assert item["XMP:DigitalSourceType"] == CODES + labels.TRAINED, name  # a generated product
        # the parameters, where A1111 readers look: PNG text, and the EXIF UserComment of JPEG and WebP
        assert found["main"]["EXIF:UserComment"] == found["generated"]["PNG:Parameters"]  # the cut-out's photo
        assert parse_parameters(sd_parsers_parameters(generated))["seed"] == row.generate_seed
        assert parse_parameters(sd_parsers_parameters(main))["seed"] == row.generate_seed
        assert parse_parameters(sd_parsers_parameters(square))["seed"] == row.upscale_seed
        provenance = json.loads(found["square"]["XMP:Provenance"])
        assert provenance["stage"] == "upscale" and provenance["rendition"]["name"] == "shop-square"
        assert provenance["rendition"]["source_path"] == row.upscale_image_path


def test_photos_get_composite_labels(photos):
    out, df = photos
    row = df.iloc[0]
    assert row.renditions_status == "ok"
    files = [recorded(out, row, "marketplace-main"), recorded(out, row, "shop-square"),
             out / row.remove_bg_image_path, out / row.style_image_path, out / row.upscale_image_path]
    for path, found in zip(files, exif_read(files)):
        assert found["XMP:DigitalSourceType"] == CODES + labels.COMPOSITE, path


# --- the presets' numbers, measured on the files --------------------------------------------------


def product_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Where the image is clearly not white (JPEG's ringing at the edge stays under 24)."""
    ys, xs = np.nonzero((255 - pixels.astype(int)).max(axis=2) > 24)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pillow_q90_tables() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buffer, format="JPEG", quality=90, subsampling=0)
    with Image.open(buffer) as reference:
        return reference.quantization


@pytest.mark.parametrize("fixture", ["products", "photos"])
def test_marketplace_main_is_2000_px_white_255_product_85_percent_jpeg_q90_srgb(fixture, request):
    out, df = request.getfixturevalue(fixture)
    for _, row in df.iterrows():
        path = recorded(out, row, "marketplace-main")
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (2000, 2000))
            assert image.quantization == pillow_q90_tables()
            pixels = np.asarray(image)
        x0, y0, x1, y1 = product_box(pixels)
        assert max(x1 - x0, y1 - y0) / 2000 == pytest.approx(0.85, abs=0.005)  # the product's long side
        assert abs((x0 + x1) / 2 - 1000) <= 2 and abs((y0 + y1) / 2 - 1000) <= 2  # centred
        outside = np.ones((2000, 2000), dtype=bool)
        outside[max(0, y0 - 16):y1 + 16, max(0, x0 - 16):x1 + 16] = False
        assert outside.sum() > 0.2 * outside.size and (pixels[outside] == 255).all()  # white 255 wherever it is not
        found = exif_read([path])[0]
        assert found["ICC_Profile:ProfileDescription"] == "sRGB built-in"
        assert_full_chroma(path, found)  # the preset's 4:4:4, not 4:2:0


def test_shop_square_is_a_2048_px_webp_with_srgb(products):
    out, df = products
    for _, row in df.iterrows():
        path = recorded(out, row, "shop-square")
        with Image.open(path) as image:
            assert (image.format, image.size) == ("WEBP", (2048, 2048))
        found = exif_read([path])[0]
        assert (found["File:MIMEType"], found["ICC_Profile:ProfileDescription"]) == ("image/webp", "sRGB built-in")


# --- settings on catalog images (no model: renditions read the catalog's image) -------------------


def catalog_pictures(folder: Path) -> Path:
    """A 640x480 photo and a 300x500 cut-out (a transparent border around an opaque product)."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / "wide.png")
    cutout = np.zeros((500, 300, 4), dtype=np.uint8)
    cutout[100:400, 50:250] = (200, 30, 30, 255)
    Image.fromarray(cutout, "RGBA").save(folder / "tall.png")
    return write_catalog(folder / "pictures.parquet", {"id": ["wide", "tall"], "image": ["wide.png", "tall.png"]})


SETTINGS = ("renditions=[thumb, {name: cover, box: 300x100, fit: cover}, {name: contain, box: 300x100, fit: contain},"
            " {name: pad, box: 300x100, fit: pad, format: jpeg, background: black},"
            " {name: clear, size: 64, format: webp, background: transparent},"
            " {name: small, format: avif, size: 120, quality: 50}]")


def test_sizes_fits_backgrounds_and_formats(tmp_path: Path):
    out = tmp_path / "out"
    df = run(str(catalog_pictures(tmp_path)), out, "--stages", "renditions", "--set", SETTINGS).set_index("id")
    expected = {  # (wide 640x480, tall 300x500)
        "thumb": ((400, 300), (240, 400)), "cover": ((300, 100), (300, 100)), "contain": ((133, 100), (60, 100)),
        "pad": ((300, 100), (300, 100)), "clear": ((64, 48), (38, 64)), "small": ((120, 90), (72, 120)),
    }
    formats = {"thumb": "WEBP", "cover": "PNG", "contain": "PNG", "pad": "JPEG", "clear": "WEBP", "small": "AVIF"}
    for name, sizes in expected.items():
        for row_id, size in zip(("wide", "tall"), sizes):
            with Image.open(recorded(out, df.loc[row_id], name)) as image:
                assert (image.format, image.size) == (formats[name], size), (name, row_id)
    with Image.open(out / df.loc["tall", "renditions_clear_path"]) as clear:
        alpha = np.asarray(clear.convert("RGBA"))[..., 3]
        assert alpha[0, 0] == 0 and alpha[32, 19] == 255  # transparency kept where asked
    with Image.open(out / df.loc["tall", "renditions_pad_path"]) as pad:
        pixels = np.asarray(pad)
        assert (pixels[:, :100] < 8).all()  # black bars, and the cut-out's transparency on black
    pads = [out / df.loc[row_id, "renditions_pad_path"] for row_id in ("wide", "tall")]
    for path, found in zip(pads, exif_read(pads)):
        assert_full_chroma(path, found)  # every JPEG rendition, not the preset's alone
    with Image.open(out / df.loc["tall", "renditions_thumb_path"]) as thumb:
        assert np.asarray(thumb)[2, 2].min() >= 250  # the cut-out's transparency became white
    found = exif_read([out / df.loc["wide", "renditions_thumb_path"]])[0]
    assert "XMP:DigitalSourceType" not in found  # a catalog photo nobody generated is not labelled as AI
    assert found["XMP:CreatorTool"].startswith("catalogen ") and found["ICC_Profile:ProfileDescription"] == "sRGB built-in"


def test_a_change_of_rendition_settings_redoes_renditions_only_and_verify_export_see_them(tmp_path: Path,
                                                                                        monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    args = ["catalogs/demo_photos.parquet", "--stages", "remove_bg,renditions", "--limit", "1"]
    first = run(args[0], out, *args[1:], "--set", "renditions=[marketplace-main, thumb]").iloc[0]
    parts = {stage: sorted(p.name for p in (out / "stages" / stage).iterdir()) for stage in ("remove_bg", "renditions")}
    second = run(args[0], out, *args[1:], "--set", "renditions=[marketplace-main, {preset: thumb, size: 200}]").iloc[0]
    assert sorted(p.name for p in (out / "stages" / "remove_bg").iterdir()) == parts["remove_bg"]  # not redone
    assert len(list((out / "stages" / "renditions").iterdir())) == len(parts["renditions"]) + 1
    assert second.remove_bg_key == first.remove_bg_key and second.renditions_key != first.renditions_key
    assert (second.renditions_thumb_width, first.renditions_thumb_width) == (200, 400)
    # clean lists the renditions of the old settings, and none the results point at
    listed = cli("clean", str(out))
    assert first.renditions_thumb_path in listed and first["renditions_marketplace-main_path"] in listed
    assert second.renditions_thumb_path not in listed and second["renditions_marketplace-main_path"] not in listed
    # verify re-hashes renditions like any image: a changed file marks the row, --retry-failed redoes it
    shutil.copy(REPO / "catalogs" / "styles" / "sage-dots.png", out / second["renditions_marketplace-main_path"])
    assert "renditions" in cli("verify", str(out), code=3)
    again = run(args[0], out, *args[1:], "--retry-failed").iloc[0]
    assert again.renditions_status == "ok" and again.remove_bg_key == first.remove_bg_key
    cli("verify", str(out))
    # exported as the chosen image
    export = tmp_path / "export"
    cli("export", str(out), "--format", "imagefolder", "--image", "rendition:marketplace-main", "--out", str(export),
        "--text", "remove_bg_source_image")
    exported = [p for p in export.rglob("*") if p.suffix in (".jpg", ".png")]
    assert [p.suffix for p in exported] == [".jpg"]
    assert exported[0].read_bytes() == (out / again["renditions_marketplace-main_path"]).read_bytes()
    # the report shows them
    assert "renditions.marketplace-main" in (out / "report-data" / "index.js").read_text()


# --- hostile settings and inputs ------------------------------------------------------------------

# Colours Pillow's parser reads but no canvas can paint (or does not read at all), and what the refusal says.
BAD_COLOURS = [
    ("rgb(300,0,0)", "is not a colour: red 300 (each channel is 0 to 255)"),
    ("rgb(256,255,255)", "is not a colour: red 256 (each channel is 0 to 255)"),  # one level past the edge
    ("hsl(0,150%,50%)", "is not a colour: red 319, green -63, blue -63 (each channel is 0 to 255)"),
    ("rgb(-1,0,0)", "is not a colour: give #RRGGBB"),
    ("#12345", "is not a colour: give #RRGGBB"),
    ("#GGGGGG", "is not a colour: give #RRGGBB"),
    ("rgba(0,0,0,0)", "has alpha 0, but the colour is painted opaque"),
]


@pytest.mark.parametrize("item, setting, words", [
    *((f"{{name: c, background: '{value}'}}", "renditions.0.background", f"'{value}' {why}")
      for value, why in BAD_COLOURS),
    ("{name: huge, size: 1000000}", "renditions.0.size", "less than or equal to 8192"),
    ("{name: huge, box: 1000000x1000000}", "renditions.0.box", "16 to 8192"),
    ("{name: gif, format: gif}", "renditions.0.format", "'png', 'jpeg', 'webp' or 'avif'"),
    ("{name: q, quality: 0}", "renditions.0.quality", "greater than or equal to 1"),
    ("nope", "renditions.0", "unknown preset 'nope'"),
    ("{name: see-through, format: jpeg, background: transparent}", "renditions.0", "jpeg has no transparency"),
    ("{name: Bad Name}", "renditions.0.name", "lower-case letters"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path: Path, item: str, setting: str, words: str):
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"stages": ["renditions"], "renditions": yaml.safe_load(f"[{item}]")})
    assert f"{setting}: " in str(refused.value) and words in str(refused.value)
    out = tmp_path / "out"
    output = cli("run", str(catalog_pictures(tmp_path)), "--out", str(out), "--stages", "renditions",
                 "--set", f"renditions=[{item}]", code=1)
    assert setting in output and not out.exists()


@pytest.mark.parametrize("value, why", BAD_COLOURS)
def test_a_canvas_colour_that_cannot_be_painted_is_refused(value: str, why: str):
    """remove_bg's canvas colour goes through the same check: no run starts to crash in every shard."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"stages": ["remove_bg"], "remove_bg": {"canvas": {"enabled": True, "color": value}}})
    assert f"remove_bg.canvas.color: '{value}' {why}" in str(refused.value)


def test_validate_names_the_colour_in_one_line_and_a_hash_value_is_not_a_yaml_comment(tmp_path: Path):
    catalog = str(catalog_pictures(tmp_path))
    output = cli("validate", catalog, "--set", "stages=[renditions]",
                 "--set", "renditions=[{name: c, size: 64, background: 'rgb(300,0,0)'}]", code=1)
    assert "renditions.0.background: 'rgb(300,0,0)' is not a colour: red 300" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 2  # the heading and the setting
    # unquoted, `#12345` was a YAML comment, i.e. no value: validate passed and the canvas stayed white
    output = cli("validate", catalog, "--set", "stages=[remove_bg]", "--set", "remove_bg.canvas.color=#12345", code=1)
    assert "remove_bg.canvas.color: '#12345' is not a colour" in output
    cfg = load_config(None, dict([parse_override("remove_bg.canvas.color=#0a0b0c")]))
    assert cfg.remove_bg.canvas.color == "#0A0B0C"


# Every form a colour may take, and the exact RGB it must paint (worked out by hand, not by Pillow).
GOOD_COLOURS = {
    "#0A0B0C": (10, 11, 12), "#abc": (170, 187, 204), "rebeccapurple": (102, 51, 153), "rgb(1, 2, 3)": (1, 2, 3),
    "rgb(255,255,255)": (255, 255, 255), "rgb(0,0,0)": (0, 0, 0), "rgb(100%, 0%, 50%)": (255, 0, 128),
    "hsl(400, 100%, 50%)": (255, 170, 0), "hsv(120, 100%, 100%)": (0, 255, 0), "rgba(4, 5, 6, 255)": (4, 5, 6),
}


def test_every_accepted_colour_form_paints_exactly_its_rgb(tmp_path: Path):
    """The bars of a pad rendition (PNG: lossless) are exactly the colour; a canvas gets it too."""
    from conftest import context, plan_table

    from catalogen.media.placement import parse_color, place
    from tasks import renditions

    catalog = pq.read_table(catalog_pictures(tmp_path)).slice(0, 1)  # the 640x480 photo: 64x48 in a 64x64 box
    items = [{"name": f"c{i}", "box": "64x64", "fit": "pad", "background": v} for i, v in enumerate(GOOD_COLOURS)]
    plan = plan_table(catalog, load_config(None, {"stages": ["renditions"], "renditions": items}), tmp_path / "run")
    row = renditions.process(plan.planned["renditions"], context(plan, "renditions")).to_pylist()[0]
    assert row["status"] == "ok" and len(row["renditions"]) == len(GOOD_COLOURS)
    for made, (value, rgb) in zip(row["renditions"], GOOD_COLOURS.items()):
        with Image.open(tmp_path / "run" / made["path"]) as image:
            pixels = np.asarray(image)
        assert pixels.shape == (64, 64, 3)
        assert (pixels[:8] == rgb).all() and (pixels[56:] == rgb).all(), value  # 8 rows above and below
        assert not (pixels[8:56] == rgb).all(), value  # the photo between them
        canvas = load_config(None, {"remove_bg": {"canvas": {"enabled": True, "color": value}}}).remove_bg.canvas
        cutout = Image.new("RGBA", (20, 20), (9, 9, 9, 255))
        painted, _ = place(cutout, (40, 40), 0.5, parse_color(canvas.color))  # as remove_bg paints its canvas
        assert painted.getpixel((0, 0)) == rgb and painted.getpixel((20, 20)) == (9, 9, 9), value


def test_a_source_that_does_not_run_first_is_refused():
    cfg = load_config(None, {"stages": ["generate", "renditions"], "renditions": ["marketplace-main"]})
    assert any("renditions.0.source=remove_bg" in fault and "does not run before" in fault
               for fault in config_faults(cfg))
    empty = load_config(None, {"stages": ["generate", "renditions"]})
    assert any("no rendition is configured" in fault for fault in config_faults(empty))


def test_a_decompression_bomb_fails_its_row_without_being_decoded(tmp_path: Path):
    Image.new("1", (8_000, 8_000)).save(tmp_path / "bomb.png")  # 64 megapixels (over images.max_pixels) in a few kB
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    catalog = write_catalog(tmp_path / "bomb.parquet", {"id": ["bomb"], "image": ["bomb.png"]})
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(tmp_path / "out"), "--stages", "renditions",
                                      "--set", "renditions=[thumb]"])
    assert result.exit_code in (1, 3), result.output
    if result.exit_code == 3:  # the row failed, with the reason
        row = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()[0]
        assert row["renditions_status"] == "failed" and "images.max_pixels" in row["renditions_error"]
    else:  # or the catalog was refused before anything was written
        assert "max_pixels" in result.output


def test_plan_and_process_directly_each_row_alone(tmp_path: Path):
    """The stage called as a benchmark would (plan, then process): a row's files depend on its row only."""
    from conftest import context, plan_table

    from tasks import renditions

    catalog = pq.read_table(catalog_pictures(tmp_path))
    cfg = load_config(None, {"stages": ["renditions"], "renditions": yaml.safe_load(SETTINGS.partition("=")[2])})
    plan = plan_table(catalog, cfg, tmp_path / "run")
    planned = plan.planned["renditions"]
    both = renditions.process(planned, context(plan, "renditions")).to_pylist()
    alone = renditions.process(planned.slice(1, 1), context(plan, "renditions")).to_pylist()
    assert [r["status"] for r in both] == ["ok", "ok"] and alone[0]["renditions"] == both[1]["renditions"]
    assert [r["name"] for r in both[0]["renditions"]] == ["thumb", "cover", "contain", "pad", "clear", "small"]
    assert renditions.needs_device(cfg) is False and renditions.models(cfg) == {}
