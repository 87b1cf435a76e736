"""`catalogen reproduce IMAGE` (#5): an image made again from the provenance in its own file.

Real tiny-profile runs through the CLI (configs/products.yaml for generate, configs/photos.yaml for
remove_bg, style, upscale and a JPEG rendition), then each image re-made in a temporary folder and
compared pixel for pixel; a tampered image, foreign files, a missing model revision or input file,
and hostile provenance chunks are refused or reported as the README says.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.reproduce import MAX_PROVENANCE_BYTES, Unusable, read_provenance

FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


def run_cli(catalog: str, config: str, out: Path) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["run", catalog, "--config", config, "--out", str(out), "--limit", "1", *FEWER_STEPS])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "results.parquet")


def reproduce(path: Path):
    return CliRunner().invoke(app, ["reproduce", str(path)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, pd.Series]:
    out = tmp_path_factory.mktemp("photos") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        df = run_cli("catalogs/demo_photos.parquet", "configs/photos.yaml", out)
    assert (df.status == "ok").all()
    return out, df.iloc[0]


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> tuple[Path, pd.Series]:
    out = tmp_path_factory.mktemp("products") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        df = run_cli("catalogs/demo_products.parquet", "configs/products.yaml", out)
    assert (df.generate_status == "ok").all()
    return out, df.iloc[0]


def rewrite_png(source: Path, target: Path, provenance: dict | None = None, pixel: tuple[int, int] | None = None) -> Path:
    """The PNG again with its text chunks (the provenance replaced when given), a pixel changed when given."""
    with Image.open(source) as image:
        image.load()
        texts = dict(image.text)
        copy = image.copy()
    if provenance is not None:
        texts["catalogen"] = json.dumps(provenance)
    if pixel is not None:
        value = copy.getpixel(pixel)
        copy.putpixel(pixel, tuple((v + 7) % 256 for v in value[:3]) + tuple(value[3:]))
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    copy.save(target, format="PNG", pnginfo=info)
    return target


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A valid 1x1 PNG with one extra chunk right after IHDR (any size: written by hand, not by Pillow)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


# --- every stage's image, made again ----------------------------------------------------------------


@pytest.mark.parametrize("column, said", [
    ("remove_bg_image_path", "remove_bg image of row 'MUG-001' v0 (remove_bg)"),
    ("remove_bg_canvas_path", "remove_bg canvas image of row 'MUG-001' v0 (remove_bg)"),
    ("style_image_path", "style image of row 'MUG-001' v0 (remove_bg -> style)"),
    ("upscale_image_path", "upscale image of row 'MUG-001' v0 (remove_bg -> style -> upscale)"),
    # a JPEG rendition: its source made again, then rendered and encoded as the renditions stage does
    ("renditions_marketplace-main_path", "rendition marketplace-main of the remove_bg"),
])
def test_photo_stage_images_are_identical_when_made_again(photos, column: str, said: str):
    out, row = photos
    result = reproduce(out / row[column])
    assert result.exit_code == 0, result.output
    assert f"identical: {said}" in result.output


def test_a_generated_image_is_identical_when_made_again(products):
    out, row = products
    provenance = read_provenance(out / row.generate_image_path)
    assert provenance["recipe"]["stages"] == ["enhance", "generate"]
    assert provenance["recipe"]["row"]["prompt"]  # the template's prompt, before enhancement
    result = reproduce(out / row.generate_image_path)
    assert result.exit_code == 0, result.output
    assert "identical: generate image of row 'MUG-001' v0 (enhance -> generate)" in result.output


def test_a_later_variant_is_made_again_from_its_own_seed(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "variants"
    small = ["--set", "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32"]
    result = CliRunner().invoke(app, ["run", "catalogs/demo_prompts.parquet", "--out", str(out), "--limit", "1",
                                      "--set", "num_variants=2", *small])
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out / "results.parquet")
    second = df[df.variant == 1].iloc[0]
    result = reproduce(out / second.image_path)
    assert result.exit_code == 0, result.output
    assert f"identical: generate image of row {second.id!r} v1 (generate)" in result.output


def test_a_photo_given_as_bytes_and_a_rows_own_style_image_are_found_again(tmp_path: Path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copyfile(REPO / "catalogs" / "styles" / "cool-stripes.png", tmp_path / "stripes.png")
    photo = (REPO / "catalogs" / "photos" / "TEA-002.png").read_bytes()
    catalog = tmp_path / "own.parquet"
    pq.write_table(pa.table({"id": ["P1"], "image": [photo], "style_image": ["stripes.png"]}), catalog)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(out), "--stages", "remove_bg,style",
                                      "--set", "style.steps=2"])
    assert result.exit_code == 0, result.output
    styled = out / pd.read_parquet(out / "results.parquet").style_image_path[0]
    inputs = read_provenance(styled)["recipe"]["inputs"]
    assert inputs["image"] == {"catalog": str(catalog), "id": "P1", "sha256": __import__("hashlib").sha256(photo).hexdigest()}
    assert inputs["style_image"]["path"] == str(tmp_path / "stripes.png")
    result = reproduce(styled)
    assert result.exit_code == 0, result.output
    assert "identical: style image of row 'P1' v0 (remove_bg -> style)" in result.output
    (tmp_path / "stripes.png").write_bytes((REPO / "catalogs" / "styles" / "sage-dots.png").read_bytes())
    result = reproduce(styled)
    assert result.exit_code == 2 and f"needs its style_image file {tmp_path / 'stripes.png'}, which changed" in result.output


def test_the_recipe_holds_what_makes_the_row_and_references_its_photo(photos):
    out, row = photos
    recipe = read_provenance(out / row.upscale_image_path)["recipe"]
    assert recipe["stages"] == ["remove_bg", "style", "upscale"]
    assert set(recipe["models"]) == {"remove_bg", "style", "upscale"}
    assert recipe["models"]["style"]["pipeline"]["revision"].startswith("sha256:")
    photo = recipe["inputs"]["image"]
    assert Path(photo["path"]).is_file() and len(photo["sha256"]) == 64
    assert recipe["inputs"]["style.style_image"]["path"].endswith("catalogs/styles/sage-dots.png")
    assert "batch_size" not in recipe["settings"]["style"]  # throughput only: the same bytes whatever it is
    assert recipe["row"]["id"] == "MUG-001" and isinstance(recipe["row"]["seed"], int)


# --- what does not reproduce ------------------------------------------------------------------------


def test_a_tampered_image_reports_its_largest_difference(photos, tmp_path: Path):
    out, row = photos
    tampered = rewrite_png(out / row.remove_bg_image_path, tmp_path / "tampered.png", pixel=(5, 3))
    result = reproduce(tampered)
    assert result.exit_code == 1, result.output
    assert "max pixel difference 7 at (5, 3), 1 pixels differ" in result.output


def test_a_png_catalogen_did_not_write_is_refused_in_one_line(tmp_path: Path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "red").save(plain)
    result = reproduce(plain)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "carries no catalogen provenance" in result.output
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = reproduce(text)
    assert result.exit_code == 2 and "not a PNG, JPEG or WebP image" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = reproduce(tmp_path / "absent.png")
    assert result.exit_code == 2 and "cannot be read" in result.output


def test_provenance_without_a_recipe_is_refused(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.style_image_path)
    del provenance["recipe"]
    result = reproduce(rewrite_png(out / row.style_image_path, tmp_path / "old.png", provenance))
    assert result.exit_code == 2 and "without a recipe" in result.output


def test_a_model_revision_not_present_is_named(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    provenance["recipe"]["models"]["remove_bg"]["segmenter"]["revision"] = "sha256:00000000000000000000000000000000"
    result = reproduce(rewrite_png(out / row.remove_bg_image_path, tmp_path / "other-model.png", provenance))
    assert result.exit_code == 2, result.output
    assert "remove_bg.segmenter: tiny:rembg @ sha256:00000000000000000000000000000000 is not present" in result.output


def test_a_hub_model_is_pinned_to_its_recorded_commit_and_named_when_absent(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.style_image_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    provenance["recipe"]["settings"]["profile"] = "sd15"
    provenance["recipe"]["models"]["style"]["pipeline"] = {"repo": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                           "revision": commit, "kind": "sd15"}
    result = reproduce(rewrite_png(out / row.style_image_path, tmp_path / "hub.png", provenance))
    assert result.exit_code == 2, result.output
    assert f"style.pipeline: stable-diffusion-v1-5/stable-diffusion-v1-5 @ {commit} is not present" in result.output


def test_a_missing_or_changed_photo_is_named(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    moved = tmp_path / "moved" / "MUG-001.png"
    provenance["recipe"]["inputs"]["image"]["path"] = str(moved)
    result = reproduce(rewrite_png(out / row.remove_bg_image_path, tmp_path / "moved.png", provenance))
    assert result.exit_code == 2 and f"needs its catalog image {moved}, which is missing" in result.output
    moved.parent.mkdir()
    moved.write_bytes(b"\x89PNG other bytes")
    result = reproduce(tmp_path / "moved.png")
    assert result.exit_code == 2 and "which changed since the image was made" in result.output


# --- hostile files ----------------------------------------------------------------------------------


def refused_quickly(data: bytes, tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    del data
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(Unusable) as refused:
        read_provenance(path)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2.0, seconds
    assert peak < 4 * MAX_PROVENANCE_BYTES, peak  # a few times the cap, not the 50-64 MB the file holds
    result = reproduce(path)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    return str(refused.value)


def test_a_huge_provenance_chunk_is_refused_unread(tmp_path: Path):
    body = b"catalogen\0" + b'{"stage": "generate", "x": "' + b"a" * (50 * 2**20) + b'"}'
    reason = refused_quickly(png_with_chunk(b"tEXt", body), tmp_path, "huge.png")
    assert "refused unread" in reason


def test_a_compressed_provenance_bomb_is_refused(tmp_path: Path):
    body = b"catalogen\0\0" + zlib.compress(b"[" * (64 * 2**20), 9)
    reason = refused_quickly(png_with_chunk(b"zTXt", body), tmp_path, "bomb.png")
    assert "inflates past" in reason


def test_deeply_nested_provenance_is_refused(tmp_path: Path):
    body = b"catalogen\0" + b"[" * (2**20) + b"]" * (2**20)
    reason = refused_quickly(png_with_chunk(b"tEXt", body), tmp_path, "nested.png")
    assert "too deeply nested" in reason


def test_renditions_without_provenance_or_with_a_huge_xmp_chunk_are_refused(tmp_path: Path):
    plain = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(plain, format="JPEG")
    path = tmp_path / "plain.jpg"
    path.write_bytes(plain.getvalue())
    with pytest.raises(Unusable, match="carries no catalogen provenance"):
        read_provenance(path)
    webp = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(webp, format="WEBP")
    data = webp.getvalue()
    chunk = b"XMP " + struct.pack("<I", 50 * 2**20) + b"<x>" * (50 * 2**20 // 3) + b"ab"
    riff = data[12:] + chunk
    reason = refused_quickly(b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WEBP" + riff, tmp_path, "huge.webp")
    assert "refused unread" in reason
