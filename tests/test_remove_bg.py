"""The remove_bg stage: real rembg over the tiny ONNX segmenter, called directly and through the flow."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import context, fast_config, plan_table, run_stage, write_catalog
from PIL import Image

from catalogen.run.devices import Device
from catalogen.storage.hashing import sha256_file
from catalogen.models.loading import MissingModelsError, resolve_model
from catalogen.media.placement import alpha_box, coverage
from catalogen.media.pngmeta import read_png_text
from catalogen.stage import StageContext
from catalogen.models.tiny.profile import ensure_tiny
from catalogen.models.tiny.vision import REMBG_MODEL_FILE
from tasks import remove_bg

HEIGHT, WIDTH = 80, 96
RECT = (20, 50, 30, 70)  # rows 20-49, columns 30-69
EDGE = 2  # pixels either side of the outline left unchecked: the mask is resized from 320x320


def photo(colour=(30, 60, 200), rect=RECT, seed: int = 0) -> Image.Image:
    """A coloured rectangle on an off-white, slightly noisy background."""
    rng = np.random.default_rng(seed)
    pixels = (np.full((HEIGHT, WIDTH, 3), 240) + rng.integers(0, 10, (HEIGHT, WIDTH, 3))).astype(np.uint8)
    if rect is not None:
        top, bottom, left, right = rect
        pixels[top:bottom, left:right] = colour
    return Image.fromarray(pixels)


def photos(folder: Path, **images: Image.Image) -> dict[str, str]:
    """Write each image as <name>.png in `folder`; returns {name: relative path}."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    return {name: f"{folder.name}/{name}.png" for name in images}


def stage_run(tmp_path: Path, images: dict[str, str], out: str = "out", **overrides) -> pd.DataFrame:
    """remove_bg alone over a catalog of image paths (relative to tmp_path, where the catalog is written)."""
    cfg = fast_config(stages=["remove_bg"], **overrides)
    table = pa.table({"id": list(images), "image": list(images.values())})
    return run_stage(table, cfg, tmp_path / out, "remove_bg").to_pandas().set_index("id")


def alpha_of(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        return np.asarray(image.getchannel("A"))


def test_the_cut_out_recovers_a_known_shape(tmp_path: Path):
    source = photo()
    images = photos(tmp_path / "photos", mug=source)
    row = stage_run(tmp_path, images).loc["mug"]

    assert row.status == "ok", row.error
    written = tmp_path / "out" / row.image_path
    alpha = alpha_of(written)
    top, bottom, left, right = RECT
    assert alpha.shape == (HEIGHT, WIDTH) and (row.image_width, row.image_height) == (WIDTH, HEIGHT)
    assert alpha[top + EDGE:bottom - EDGE, left + EDGE:right - EDGE].min() > 200
    outside = np.ones_like(alpha, dtype=bool)
    outside[top - EDGE:bottom + EDGE, left - EDGE:right + EDGE] = False
    assert alpha[outside].max() < 50
    # The columns describe the written file.
    assert row.coverage == coverage(alpha)
    assert (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1) == alpha_box(alpha)
    assert abs(row.bbox_x0 - left) <= 1 and abs(row.bbox_x1 - right) <= 1 and abs(row.bbox_y0 - top) <= 1
    assert row.image_sha256 == sha256_file(written)
    assert row.source_sha256 == sha256_file(tmp_path / images["mug"])
    assert row.source_image == str((tmp_path / images["mug"]).resolve())
    assert (row.source_width, row.source_height) == (WIDTH, HEIGHT)
    assert (row.provider, row.requested_provider, row.device) == ("CPUExecutionProvider",) * 2 + ("cpu",)
    # The product's own pixels are kept, not blended towards black.
    with Image.open(written) as image:
        rgb = np.asarray(image.convert("RGBA"))[..., :3]
    assert np.array_equal(rgb[top:bottom, left:right], np.asarray(source)[top:bottom, left:right])
    assert '"model": "tiny:rembg"' in read_png_text(str(written))["catalogen"]


def test_a_mask_of_nothing_or_everything_fails_with_its_reason(tmp_path: Path):
    images = photos(tmp_path / "photos", plain=photo(rect=None, seed=1), big=photo(rect=(3, 77, 3, 93)))
    rows = stage_run(tmp_path, images, **{"remove_bg.max_coverage": 0.5})

    assert rows.loc["plain"].status == "failed"
    assert "no product was found" in rows.loc["plain"].error
    assert rows.loc["big"].status == "failed"
    assert "over remove_bg.max_coverage=50.00%" in rows.loc["big"].error
    assert rows.loc["big"].coverage > 0.5 and pd.isna(rows.loc["big"].image_path)


@pytest.mark.parametrize(("aspect", "size", "expected"), [("1:1", 128, (128, 128)), ("4:5", 96, (77, 96))])
def test_the_canvas_has_its_size_colour_and_fill(tmp_path: Path, aspect: str, size: int, expected: tuple):
    images = photos(tmp_path / "photos", wide=photo(rect=(30, 50, 10, 86)), tall=photo(rect=(5, 75, 40, 60)))
    canvas = {"enabled": True, "size": size, "aspect": aspect, "color": "#336699", "fill": 0.8}
    rows = stage_run(tmp_path, images, **{"remove_bg.canvas": canvas})

    for name, row in rows.iterrows():
        assert row.status == "ok", row.error
        path = tmp_path / "out" / row.canvas_path
        assert row.canvas_sha256 == sha256_file(path)
        assert Path(row.canvas_path).parent == Path(row.image_path).parent  # beside the cut-out
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == expected == (row.canvas_width, row.canvas_height)
            pixels = np.asarray(image).astype(int)
        background = np.all(np.abs(pixels - (0x33, 0x66, 0x99)) <= 2, axis=2)
        assert background[0, 0] and background[-1, -1] and background[0, -1] and background[-1, 0]
        x0, y0, x1, y1 = alpha_box(np.where(background, 0, 255))
        width, height = expected
        measured = max((x1 - x0) / width, (y1 - y0) / height)
        assert abs(measured - row.canvas_fill) <= 2 / min(expected)  # what the row says, measured on the file
        assert abs(row.canvas_fill - 0.8) <= 1 / min(expected)  # what was asked for, to the pixel
        assert abs(x0 - (width - x1)) <= 2 and abs(y0 - (height - y1)) <= 2  # centred
        assert ((x1 - x0) / width >= (y1 - y0) / height) == (name == "wide")  # the side that reaches the frame


def test_a_rows_output_does_not_depend_on_its_neighbours(tmp_path: Path):
    images = photos(tmp_path / "photos", a=photo(seed=2), b=photo(colour=(20, 150, 40), seed=3),
                    c=photo(rect=(10, 40, 10, 40), seed=4))
    alone = stage_run(tmp_path, {"b": images["b"]}, out="alone")
    together = stage_run(tmp_path, images, out="together")
    reversed_ = stage_run(tmp_path, dict(reversed(images.items())), out="reversed")
    assert alone.loc["b"].image_sha256 == together.loc["b"].image_sha256 == reversed_.loc["b"].image_sha256
    assert together.image_sha256.nunique() == 3


def test_provider_choice_names_the_leased_gpu():
    choose = remove_bg.choose_providers
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose("cuda:1", both) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert choose("cuda", both) == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert choose("cuda:1", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose("cpu", both) == ["CPUExecutionProvider"]


def test_a_gpu_lease_that_runs_on_the_cpu_says_so(tmp_path: Path, caplog):
    images = photos(tmp_path / "photos", mug=photo())
    cfg = fast_config(stages=["remove_bg"], model_memory_gb=1)
    plan = plan_table(pa.table({"id": ["mug"], "image": [images["mug"]]}), cfg, tmp_path / "out")
    identity = plan.models["remove_bg"]["segmenter"]

    # rembg 2.0.86 raises TypeError when a provider given with options falls back to the CPU.
    with caplog.at_level(logging.WARNING, logger="catalogen.remove_bg"):
        session = remove_bg._open_with_fallback(identity, remove_bg.choose_providers("cuda:0", ["CUDAExecutionProvider"]))
    assert session.inner_session.get_providers() == ["CPUExecutionProvider"]
    assert "running on the CPU" in caplog.text

    caplog.clear()
    ctx = StageContext(cfg, plan.store, plan.models["remove_bg"], Device("cuda:0", "gpu-test"), torch.float32)
    with caplog.at_level(logging.WARNING, logger="catalogen.remove_bg"):
        row = remove_bg.process(plan.planned["remove_bg"], ctx).to_pylist()[0]
    assert (row["status"], row["device"], row["requested_provider"], row["provider"]) == (
        "ok", "cuda:0", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert "the lease is on cuda:0" in caplog.text and "runs on CPUExecutionProvider" in caplog.text


def test_alpha_matting_is_applied_and_keyed(tmp_path: Path):
    images = photos(tmp_path / "photos", mug=photo())
    matting = {"remove_bg.alpha_matting.enabled": True, "remove_bg.alpha_matting.erode_size": 2}
    plain = stage_run(tmp_path, images, out="plain").loc["mug"]
    matted = stage_run(tmp_path, images, out="matted", **matting).loc["mug"]

    assert matted.status == "ok" and matted.alpha_matting and not plain.alpha_matting
    assert matted.key != plain.key
    alpha = alpha_of(tmp_path / "matted" / matted.image_path)
    top, bottom, left, right = RECT
    assert alpha[top + 4:bottom - 4, left + 4:right - 4].mean() > 200 and alpha[:10].mean() < 50


def test_a_named_model_is_read_from_the_project_folder_and_offline_names_what_is_missing(tmp_path: Path, monkeypatch):
    import pooch

    def refuse(*args, **kwargs):
        raise AssertionError(f"rembg tried to download: {args}")

    monkeypatch.setattr(pooch, "retrieve", refuse)
    cache = tmp_path / "cache"
    target = cache / "rembg" / "models" / "u2netp" / "u2netp.onnx"  # where rembg keeps (and downloads) it
    target.parent.mkdir(parents=True)
    # The tiny segmenter takes u2netp's input (320x320, ImageNet normalisation), so it stands in for its file.
    shutil.copy(ensure_tiny("rembg", fast_config().resolved_cache_dir()) / REMBG_MODEL_FILE, target)
    images = photos(tmp_path / "photos", mug=photo())
    row = stage_run(tmp_path, images, cache_dir=str(cache), **{"remove_bg.model": "u2netp"}).loc["mug"]
    assert row.status == "ok" and row.model == "u2netp"
    assert row.model_revision == "sha256:" + sha256_file(target)

    empty = fast_config(stages=["remove_bg"], cache_dir=str(tmp_path / "empty"), **{"remove_bg.model": "birefnet-general"})
    with pytest.raises(MissingModelsError) as info:
        resolve_model(remove_bg.models(empty)["segmenter"], empty)
    assert str(tmp_path / "empty" / "rembg" / "models" / "birefnet-general" / "birefnet-general.onnx") in str(info.value)


def test_settings_are_checked_where_they_are_declared():
    from catalogen.config import ConfigError

    for bad in ({"remove_bg.model": "u2net-v9"}, {"remove_bg.canvas.aspect": "wide"},
                {"remove_bg.canvas.color": "not-a-colour"}, {"remove_bg.min_coverage": 0.5, "remove_bg.max_coverage": 0.4}):
        with pytest.raises(ConfigError):
            fast_config(**bad)
    assert fast_config(**{"remove_bg.canvas.color": "white"}).remove_bg.canvas.color == "#FFFFFF"


# --- through the flow -----------------------------------------------------------------------------


def test_generated_and_own_images_chain_through_the_flow(tmp_path: Path):
    from flows.run import catalogen_run, run_summary

    own = photos(tmp_path / "photos", mug=photo())
    data = (tmp_path / own["mug"]).read_bytes()
    given = pa.array(
        [None, None, None, {"bytes": None, "path": own["mug"]}, {"bytes": data, "path": None}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),  # the Hugging Face datasets Image layout
    )
    ids = ["gen-0", "gen-1", "gen-2", "own-file", "own-bytes"]
    catalog = write_catalog(tmp_path / "catalog.parquet", pa.table(
        {"id": ids, "prompt": [f"a product photo number {i}" for i in range(5)], "image": given}))
    overrides = {"stages": ["generate", "remove_bg"], "generate.steps": 2, "generate.width": 32,
                 "generate.height": 32, "remove_bg.min_coverage": 0.0, "remove_bg.max_coverage": 1.0,
                 "rows_per_shard": 2}

    def run(**more) -> pd.DataFrame:
        state = catalogen_run(catalog=str(catalog), out=str(tmp_path / "out"), overrides={**overrides, **more},
                              return_state=True)
        summary = run_summary(state)
        assert not isinstance(summary, BaseException), summary
        return pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("id")

    first = run()
    generated, brought = first.loc[ids[:3]], first.loc[ids[3:]]
    assert set(first.generate_status) == {"ok", "skipped"} and set(brought.generate_status) == {"skipped"}
    assert set(first.remove_bg_status) <= {"ok", "failed"} and set(brought.remove_bg_status) == {"ok"}
    empty_masks = first.remove_bg_error.fillna("").str.contains("mask is empty")
    assert (first.remove_bg_status == "ok").equals(~empty_masks)  # a noise image may hold no product
    assert list(generated.remove_bg_source_image) == list(generated.generate_image_path)
    assert brought.remove_bg_source_image.fillna("(bytes)").tolist() == [str((tmp_path / own["mug"]).resolve()), "(bytes)"]
    assert brought.remove_bg_source_sha256.tolist() == [sha256_file(tmp_path / own["mug"])] * 2
    assert first.loc["own-file", "image_path"] == first.loc["own-file", "remove_bg_image_path"]
    assert pa.Table.from_pandas(first.reset_index()[["image"]]).column("image").to_pylist() == given.to_pylist()

    second = run(**{"generate.guidance_scale": 3.0})
    recomputed = first.remove_bg_finished_at != second.remove_bg_finished_at
    assert recomputed.to_dict() == {i: i.startswith("gen") for i in ids}
    assert (first.loc[ids[3:], "remove_bg_key"] == second.loc[ids[3:], "remove_bg_key"]).all()
    assert (first.loc[ids[3:], "generate_key"] == second.loc[ids[3:], "generate_key"]).all()


def test_a_catalog_file_changed_after_planning_fails_instead_of_lying(tmp_path: Path):
    images = photos(tmp_path / "photos", mug=photo())
    cfg = fast_config(stages=["remove_bg"])
    table = pa.table({"id": ["mug"], "image": [images["mug"]]})
    plan = plan_table(table, cfg, tmp_path / "out")
    path = tmp_path / images["mug"]
    before = path.stat().st_mtime_ns
    photo(colour=(200, 30, 25)).save(path)  # another product in the same file
    os.utime(path, ns=(before + 10**9, before + 10**9))
    row = remove_bg.process(plan.planned["remove_bg"], context(plan, "remove_bg")).to_pylist()[0]
    assert row["status"] == "failed" and "changed (size or time) since the run was planned" in row["error"]
    replanned = remove_bg.plan(plan.rows, cfg, plan.models["remove_bg"])  # a new plan sees a new image
    assert replanned.column("key")[0] != plan.planned["remove_bg"].column("key")[0]
