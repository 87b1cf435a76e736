"""Labels and provenance in every format (catalogen.media.labels), read back by independent readers.

exiftool (through pyexiftool) reads the IPTC digital source type, the generator, the A1111
parameters and the ICC profile; an sd-parsers-style reader (Pillow's own metadata, decoded as
sd-parsers and A1111's `read_info_from_image` do) reads the parameters. Neither is the code that
wrote them. The stage images of real tiny-profile runs are checked the same way.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import exiftool
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_catalog
from PIL import Image, JpegImagePlugin
from typer.testing import CliRunner

from catalogen import __version__
from catalogen.media import labels
from catalogen.cli import app
from catalogen.media.pngmeta import format_parameters, parse_parameters

CODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
FULL_CHROMA = "1 1"  # exiftool's YCbCrSubSampling of a 4:4:4 JPEG ("YCbCr4:4:4 (1 1)"; -n prints the factors)
PARAMETERS = format_parameters("a mug, «blue» glaze: 100% \"quoted\"\nsecond line", "blurry",
                               steps=3, scheduler="euler_a", guidance_scale=7.5, seed=42, width=64, height=48,
                               model="tiny:sd15", extra={"Version": "catalogen test"})
PROVENANCE = {"stage": "generate", "seed": 42, "model": "tiny:sd15", "model_revision": "sha256:abc",
              "prompt": "a mug <b>&amp;</b> ünïcode"}


def exif_read(paths: list[Path]) -> list[dict]:
    """What exiftool reads (values as written, -n), by `Group:Tag`."""
    with exiftool.ExifToolHelper() as tool:
        return tool.get_metadata([str(p) for p in paths])


def assert_full_chroma(path: Path, found: dict) -> None:
    """A JPEG written 4:4:4, as labels.encode promises (no chroma subsampling: flat colours stay flat up
    to a product's edge), read back by Pillow (0 is 4:4:4, 2 is 4:2:0) and by exiftool (`found`)."""
    with Image.open(path) as image:
        assert JpegImagePlugin.get_sampling(image) == 0, path
    assert found["File:YCbCrSubSampling"] == FULL_CHROMA, path


def sd_parsers_parameters(path: Path) -> str | None:
    """The A1111 parameters as sd-parsers and A1111 find them: a PNG's `parameters` text, else the EXIF
    UserComment (b"UNICODE\\0" + UTF-16, or an 8-byte charset code and ASCII)."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(0x8769).get(0x9286)
    if comment is None:
        return None
    if comment.startswith(b"UNICODE\0"):  # piexif.helper.UserComment.load, which A1111 calls
        return comment[8:].decode("utf_16_be")
    return comment[8:].decode("ascii", errors="replace")


def picture(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.mark.parametrize("format", labels.FORMATS)
@pytest.mark.parametrize("kind", [labels.TRAINED, labels.COMPOSITE])
def test_every_format_carries_the_label_parameters_and_provenance(tmp_path: Path, format: str, kind: str):
    path = tmp_path / f"image.{labels.EXTENSIONS[format]}"
    path.write_bytes(labels.encode(picture(), format, labels.Label(kind, PARAMETERS, PROVENANCE), 90, icc=True))
    found = exif_read([path])[0]
    assert found["XMP:DigitalSourceType"] == CODES + kind
    assert found["XMP:CreatorTool"] == f"catalogen {__version__}"
    assert found["XMP:Models"] == "tiny:sd15@sha256:abc"
    assert json.loads(found["XMP:Provenance"]) == PROVENANCE
    assert found["ICC_Profile:ProfileDescription"] == "sRGB built-in"
    written = found["PNG:Parameters"] if format == "png" else found["EXIF:UserComment"]
    assert written == PARAMETERS
    if format == "png":
        assert json.loads(found["PNG:Catalogen"]) == PROVENANCE
    if format == "jpeg":
        assert_full_chroma(path, found)
    # existing readers of A1111 metadata still read it, and it parses back to the same settings
    assert sd_parsers_parameters(path) == PARAMETERS
    parsed = parse_parameters(sd_parsers_parameters(path))
    assert (parsed["prompt"], parsed["seed"], parsed["steps"], parsed["sampler"]) == (
        "a mug, «blue» glaze: 100% \"quoted\"\nsecond line", 42, 3, "Euler a")
    # and catalogen reads all of it back from any format (what `catalogen reproduce` needs)
    assert labels.read_label(path.read_bytes()) == labels.Label(kind, PARAMETERS, PROVENANCE)


def test_user_comment_is_written_as_a1111_writes_it():
    assert labels.user_comment("Steps: 3") == b"UNICODE\0" + "Steps: 3".encode("utf-16-be")


def test_encoding_is_deterministic_and_the_icc_profile_never_varies():
    label = labels.Label(labels.TRAINED, PARAMETERS, PROVENANCE)
    for format in labels.FORMATS:
        assert labels.encode(picture(), format, label, 80, True) == labels.encode(picture(), format, label, 80, True)
    assert labels.srgb_profile() == labels.srgb_profile() and len(labels.srgb_profile()) > 500


def test_a_png_without_parameters_keeps_its_alpha_and_label(tmp_path: Path):
    path = tmp_path / "cutout.png"
    path.write_bytes(labels.encode(picture("RGBA"), "png", labels.Label(labels.COMPOSITE, None, {"stage": "remove_bg"})))
    found = exif_read([path])[0]
    assert found["XMP:DigitalSourceType"] == CODES + labels.COMPOSITE and "PNG:Parameters" not in found
    with Image.open(path) as image:
        assert image.mode == "RGBA"


def run_cli(*args: str) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(Path(args[args.index("--out") + 1]) / "results.parquet")


def test_stage_images_say_generated_or_composite_of_a_photo(tmp_path: Path, monkeypatch):
    """generate -> remove_bg (with its canvas): generated (trainedAlgorithmicMedia), with generate's
    parameters kept on the cut-out; a catalog photo's cut-out: compositeWithTrainedAlgorithmicMedia."""
    monkeypatch.chdir(REPO)
    generated = tmp_path / "generated"
    write_catalog(tmp_path / "prompts.parquet", {"id": ["g"], "prompt": ["a blue mug"], "seed": [3]})
    df = run_cli(str(tmp_path / "prompts.parquet"), "--out", str(generated), "--stages", "generate,remove_bg",
                 "--set", "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32",
                 "--set", "remove_bg.canvas.enabled=true", "--set", "remove_bg.min_coverage=0")
    row = df.iloc[0]
    files = [generated / row.generate_image_path, generated / row.remove_bg_image_path,
             generated / row.remove_bg_canvas_path]
    for path, found in zip(files, exif_read(files)):
        assert found["XMP:DigitalSourceType"] == CODES + labels.TRAINED, path
        assert found["XMP:CreatorTool"] == f"catalogen {__version__}"
        assert parse_parameters(found["PNG:Parameters"])["seed"] == 3, path
        assert sd_parsers_parameters(path) == found["PNG:Parameters"]
    photos = tmp_path / "photos"
    df = run_cli("catalogs/demo_photos.parquet", "--out", str(photos), "--stages", "remove_bg", "--limit", "1",
                 "--set", "remove_bg.canvas.enabled=true")
    row = df.iloc[0]
    files = [photos / row.remove_bg_image_path, photos / row.remove_bg_canvas_path]
    for found in exif_read(files):
        assert found["XMP:DigitalSourceType"] == CODES + labels.COMPOSITE
        assert json.loads(found["XMP:Provenance"])["stage"] == "remove_bg"


def test_a_catalog_image_without_a_label_reads_as_unlabelled():
    buffer = io.BytesIO()
    picture().save(buffer, format="JPEG")
    assert labels.read_label(buffer.getvalue()) == labels.Label(None, None, {})
