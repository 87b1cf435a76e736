"""Files a hostile trial brought: wide and odd image modes, file modes under a umask, a style image
setting outside the allowed folders, and a model file edited in place behind its size and mtime."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import BIN, REPO, cli_env, fast_config, plan_table, run_stage
from PIL import Image

from catalogen.config import ModelSpec
from catalogen.storage.hashing import sha256_file
from catalogen.media.images import ImageLoadError, ImageSettings, image_identity, open_input
from catalogen.models.loading import resolve_model
from tasks import style

MID_GREY_16 = 128 * 257  # 32896: mid-grey in 16 bits, 128 in 8


def _row(path: Path) -> dict:
    """A planned row that reads a catalog file, as an image stage's plan makes it."""
    return {"source_image": str(path), "source_identity": image_identity(str(path), None), "source_bytes": None}


def _grey(mode: str, value: float) -> Image.Image:
    dtype = {"I;16": np.uint16, "I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    pixels = np.full((6, 8), value, dtype=dtype)
    return Image.frombytes(mode, (8, 6), pixels.tobytes())


def _saved(folder: Path, name: str, image: Image.Image, fmt: str, **params) -> Path:
    path = folder / f"{name}.{fmt.lower()}"
    image.save(path, fmt, **params)
    return path


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 6), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((0, 0), 1)
    return image


def test_every_image_mode_reaches_a_stage_as_8_bit_rgb_or_rgba_with_its_values(tmp_path: Path):
    cases = {  # name: (file, expected mode, expected pixel at (0, 0), expected pixel at (1, 0))
        "png 16-bit grey": (_saved(tmp_path, "i16", _grey("I;16", MID_GREY_16), "PNG"), "RGB", (128,) * 3, None),
        "tiff 16-bit big-endian": (_saved(tmp_path, "i16b", _grey("I;16B", MID_GREY_16), "TIFF"), "RGB", (128,) * 3,
                                   None),
        "tiff 32-bit int": (_saved(tmp_path, "i32", _grey("I", MID_GREY_16), "TIFF"), "RGB", (128,) * 3, None),
        "tiff float 0..1": (_saved(tmp_path, "f1", _grey("F", 0.5), "TIFF"), "RGB", (128,) * 3, None),
        "tiff float 0..255": (_saved(tmp_path, "f255", _grey("F", 128.0), "TIFF"), "RGB", (128,) * 3, None),
        "tiff float 0..65535": (_saved(tmp_path, "f65535", _grey("F", MID_GREY_16), "TIFF"), "RGB", (128,) * 3, None),
        "grey + alpha": (_saved(tmp_path, "la", Image.new("LA", (8, 6), (128, 10)), "PNG"), "RGBA",
                         (128, 128, 128, 10), None),
        "palette + tRNS": (_saved(tmp_path, "p", _palette_with_transparency(), "PNG", transparency=0), "RGBA",
                           (0, 0, 255, 255), (255, 0, 0, 0)),
        "cmyk jpeg": (_saved(tmp_path, "cmyk", Image.new("CMYK", (8, 6), (0, 128, 128, 64)), "JPEG", quality=100),
                      "RGB", (191, 95, 95), None),
        "1-bit": (_saved(tmp_path, "one", Image.new("1", (8, 6), 1), "PNG"), "RGB", (255,) * 3, None),
    }
    for name, (path, mode, first, second) in cases.items():
        image = open_input(_row(path), tmp_path, ImageSettings())
        pixels = np.asarray(image).astype(int)
        assert image.mode == mode, name
        assert np.abs(pixels[0, 0] - first).max() <= (3 if "jpeg" in name else 1), (name, pixels[0, 0])
        if second is not None:
            assert tuple(pixels[0, 1]) == second, (name, pixels[0, 1])


def test_a_16_bit_transparency_key_becomes_alpha(tmp_path: Path):
    pixels = np.full((6, 8), MID_GREY_16, np.uint16)
    pixels[0, 0] = 0
    path = tmp_path / "keyed.png"
    Image.fromarray(pixels).save(path, transparency=0)
    image = open_input(_row(path), tmp_path, ImageSettings())
    assert image.mode == "RGBA"
    assert tuple(np.asarray(image)[0, 0]) == (0, 0, 0, 0) and tuple(np.asarray(image)[0, 1]) == (128, 128, 128, 255)


def test_a_16_bit_grey_product_photo_is_cut_out_grey_not_white(tmp_path: Path):
    pixels = np.full((80, 96), 240 * 257, np.uint16)  # an off-white background, a mid-grey product
    pixels[20:50, 30:70] = MID_GREY_16
    Image.fromarray(pixels).save(tmp_path / "product.png")
    cfg = fast_config(stages=["remove_bg"])
    table = pa.table({"id": ["grey"], "image": ["product.png"]})
    row = run_stage(table, cfg, tmp_path / "out", "remove_bg").to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    with Image.open(tmp_path / "out" / row["image_path"]) as cutout:
        product = np.asarray(cutout.convert("RGBA"))[25:45, 35:65]
    assert (product[..., 3] > 200).all()
    assert np.abs(product[..., :3].astype(int) - 128).max() <= 1


# --- file modes follow the umask --------------------------------------------------------------------------


def _catalogen(*args: str, api_url: str, umask: int, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "catalogen"), *args], env=cli_env(api_url), cwd=cwd, capture_output=True,
                          text=True, timeout=300, umask=umask)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_run_and_export_files_follow_the_umask(prefect_server: str, tmp_path: Path, umask: int):
    out, export = tmp_path / "run", tmp_path / "export"
    ran = _catalogen("run", "catalogs/demo_prompts.parquet", "--limit", "2", "--out", str(out), "--set",
                     "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32",
                     api_url=prefect_server, umask=umask)
    assert ran.returncode == 0, ran.stderr
    for fmt in ("imagefolder", "webdataset"):
        exported = _catalogen("export", str(out), "--format", fmt, "--out", str(export / fmt),
                              api_url=prefect_server, umask=umask)
        assert exported.returncode == 0, exported.stderr

    files, folders = 0o666 & ~umask, 0o777 & ~umask
    for root in (out, export):
        modes = _modes(root)
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (folders if (root / name).is_dir() else files)}
        assert not wrong, wrong
    written = set(_modes(out))
    assert {"results.parquet", "run.json", "report.html"} <= written
    assert any(name.startswith("stages/generate/part-") for name in written)
    assert any(name.startswith("images/generate/") and name.endswith(".png") for name in written)
    assert any(name.endswith(".tar") for name in _modes(export / "webdataset"))


# --- the style image setting ------------------------------------------------------------------------------


STYLE_RUN = ["--set", "stages=[generate,style]"]


def _refusal(result: subprocess.CompletedProcess, setting_value: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    named = [line for line in result.stderr.splitlines() if "style.style_image=" in line]
    assert len(named) == 1 and setting_value in named[0] and "--set style.style_image" in named[0], result.stderr


def test_a_style_image_setting_outside_the_allowed_folders_is_refused(tmp_path: Path):
    for command in (["validate"], ["run", "--out", str(tmp_path / "out")]):
        result = subprocess.run(
            [str(BIN / "catalogen"), *command, "catalogs/demo_prompts.parquet", *STYLE_RUN,
             "--set", "style.style_image=/etc/passwd"],
            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        _refusal(result, "/etc/passwd")
        assert "outside the working folder and images.roots" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_style_image_setting_that_is_no_image_is_refused_and_one_a_row_cannot_decode_names_its_file(
        tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not an image\n")
    pd.DataFrame({"id": ["a"], "prompt": ["a mug"]}).to_parquet(tmp_path / "catalog.parquet")
    result = subprocess.run(
        [str(BIN / "catalogen"), "validate", "catalog.parquet", *STYLE_RUN, "--set", "style.style_image=notes.txt"],
        env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    _refusal(result, "notes.txt")
    assert "not an image" in result.stderr

    # A row whose style image stops being one after the run was checked fails with the file's name.
    row = {"style_image": str(tmp_path / "notes.txt"), "style_image_sha256": sha256_file(tmp_path / "notes.txt")}
    with pytest.raises(ImageLoadError, match=f"{tmp_path / 'notes.txt'} is not an image"):
        style._style_image(row, tmp_path, ImageSettings())


# --- model identity ---------------------------------------------------------------------------------------


def _edit_in_place(path: Path) -> None:
    """Change one byte, keeping the size, and put the old mtime back (as `touch -r` or `rsync -t` would)."""
    info = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(info.st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)


def test_a_model_file_edited_in_place_behind_its_size_and_mtime_gets_a_new_identity_and_key(tmp_path: Path):
    cfg = fast_config()
    tiny = resolve_model(ModelSpec(repo="tiny:sd15", kind="sd15"), cfg).path
    folder = tmp_path / "my-sd15"
    shutil.copytree(tiny, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    local = fast_config(**{"generate.model": {"repo": str(folder), "kind": "sd15", "min_size": 8}})
    specs = ModelSpec(repo=str(folder), kind="sd15"), ModelSpec(repo=str(weights), kind="sd15")  # folder, one file
    table = pa.table({"id": ["a"], "prompt": ["a mug"], "seed": [1]})

    before = [resolve_model(spec, cfg).revision for spec in specs]
    key = plan_table(table, local, tmp_path / "before").planned["generate"]["key"][0].as_py()
    _edit_in_place(weights)
    after = [resolve_model(spec, cfg).revision for spec in specs]
    assert after[0] != before[0] and after[1] != before[1]
    assert plan_table(table, local, tmp_path / "after").planned["generate"]["key"][0].as_py() != key
    assert [resolve_model(spec, cfg).revision for spec in specs] == after  # and it holds while the file does
