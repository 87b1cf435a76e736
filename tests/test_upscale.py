"""The upscale stage: exact sizes, tiles blended without seams, rows apart, alpha kept, and through the flow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import FAST, REPO, context, fast_config, plan_table, write_catalog
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
)
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from catalogen.models import loading as models
from catalogen.config import ConfigError, load_config
from catalogen.storage.hashing import sha256_file
from catalogen.models.loading import resolve_model
from catalogen.media.pngmeta import parse_parameters, read_png_text
from flows.run import catalogen_run, run_summary
from tasks import STAGES, upscale
from tasks.upscale import Blend, axis_starts, tile_grid, tile_seed, upscaled_input

# No classifier-free guidance and one denoising step (2 x 0.8): the cheapest real calls.
FAST_UPSCALE = {"stages": ["generate", "upscale"], "upscale.steps": 2, "upscale.guidance_scale": 1.0}


def noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode)


def upscaled(tmp_path: Path, rows: list[dict], **settings) -> tuple[pa.Table, Path]:
    """Plan `rows` (id, prompt, seed, image) and upscale their images, written into the run folder as
    an upstream stage's would be."""
    out = tmp_path / "run"
    catalog = pa.table({name: [row[name] for row in rows] for name in ("id", "prompt", "seed")})
    plan = plan_table(catalog, fast_config(**{**FAST_UPSCALE, **settings}), out)
    sources = []
    for row in rows:
        relative = f"inputs/{row['id']}.png"
        (out / "inputs").mkdir(parents=True, exist_ok=True)
        row["image"].save(out / relative)
        sources.append(relative)
    planned = plan.planned["upscale"]
    planned = planned.set_column(planned.schema.get_field_index("source_image"), "source_image", pa.array(sources))
    return upscale.process(planned, context(plan, "upscale")), out


def result(table: pa.Table, row_id: str) -> dict:
    found = [row for row in table.to_pylist() if row["id"] == row_id][0]
    assert found["status"] == "ok", found["error"]
    return found


def opened(out: Path, row: dict) -> Image.Image:
    with Image.open(out / row["image_path"]) as image:
        image.load()
        return image.copy()


# --- tiles, without a model ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [33, 64, 100, 129, 1000, 2048])
def test_tiles_cover_the_side_with_at_least_the_overlap(length: int):
    tile, overlap = 32, 4
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    gaps = np.diff(starts)
    assert (tile - gaps >= overlap).all()  # every neighbour shares at least `overlap` pixels
    if len(starts) > 2:  # and no fewer tiles would do: one less would leave less than `overlap` somewhere
        assert (length - tile) / (len(starts) - 2) > tile - overlap


def test_blend_weights_of_two_neighbours_sum_to_one():
    grid = tile_grid(100, 60, 32, 4)  # overlaps below half a tile: at most two tiles share a pixel per side
    total = np.zeros((60, 100))
    for index, (left, top, right, bottom) in enumerate(grid.boxes):
        weights = grid.weights(index)
        assert weights.min() > 0  # every pixel of a tile counts, none is dropped
        total[top:bottom, left:right] += weights
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_blending_is_seamless_where_tiles_disagree():
    # Tiles that are crops of one image give that image back exactly.
    grid = tile_grid(90, 70, 32, 6)
    image = np.random.default_rng(0).random((70, 90, 3))
    same, offset = Blend(grid), Blend(grid)
    shift = np.random.default_rng(1).uniform(-0.3, 0.3, len(grid.boxes))
    for index, (left, top, right, bottom) in enumerate(grid.boxes):
        same.add(index, image[top:bottom, left:right])
        offset.add(index, np.full((32, 32, 3), 0.5 + shift[index]))
    assert np.array_equal(same.result(), (image * 255).round().astype(np.uint8))

    # Flat tiles that disagree (as independently denoised tiles do) meet in ramps, never in a step:
    # a neighbour's jump is spread over its overlap, where pasting them would jump all at once.
    blended = offset.result().astype(float)[..., 0]
    steepest = max(np.abs(np.diff(blended, axis=0)).max(), np.abs(np.diff(blended, axis=1)).max())
    largest_step = np.ptp(shift) * 255
    assert steepest < largest_step / 3


def test_tile_seeds_depend_on_the_row_seed_and_tile_index_only():
    seeds = {tile_seed(seed, index) for seed in (0, 1, 2**63 - 1) for index in range(20)}
    assert len(seeds) == 60 and tile_seed(5, 3) == tile_seed(5, 3)


# --- the stage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_output_size_is_exact_and_alpha_is_kept(tmp_path: Path, factor: int):
    rows = [
        {"id": "odd", "prompt": "a lamp", "seed": 1, "image": noise(11, 7, 1)},
        {"id": "cut-out", "prompt": "a mug", "seed": 2, "image": noise(9, 13, 2, "RGBA")},
    ]
    settings = {"upscale.factor": factor, "upscale.tile_size": 64, "upscale.batch_size": 1}
    table, out = upscaled(tmp_path, rows, **settings)
    for source in rows:
        row = result(table, source["id"])
        image = opened(out, row)
        expected = (source["image"].width * factor, source["image"].height * factor)
        assert image.size == expected == (row["image_width"], row["image_height"])
        assert (row["input_width"], row["input_height"]) == source["image"].size
        assert (row["factor"], row["tiles"]) == (factor, 1)
        assert sha256_file(out / row["image_path"]) == row["image_sha256"]
    rgba = opened(out, result(table, "cut-out"))
    assert rgba.mode == "RGBA" and opened(out, result(table, "odd")).mode == "RGB"
    lanczos = rows[1]["image"].getchannel("A").resize(rgba.size, Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(rgba.getchannel("A")), np.asarray(lanczos))


def test_a_tiled_row_depends_on_its_own_row_only(tmp_path: Path):
    # 24x16 x2 = 48x32 in tiles of 32: two tiles, padded with a copy to the batch of 3 whether the
    # row is alone or between neighbours (sharing calls with them moved a pixel by one level).
    target = {"id": "target", "prompt": "a brass lamp", "seed": 11, "image": noise(24, 16, 3)}
    settings = {"upscale.tile_size": 32, "upscale.tile_overlap": 4, "upscale.batch_size": 3}
    models.clear_cache()
    alone, out_alone = upscaled(tmp_path / "alone", [dict(target)], **settings)
    neighbours = [
        {"id": "before", "prompt": "a shoe", "seed": 1, "image": noise(24, 16, 4)},
        dict(target),
        {"id": "after", "prompt": "a long prompt about a scarf " * 3, "seed": 2, "image": noise(24, 16, 5)},
    ]
    batched, out_batched = upscaled(tmp_path / "batched", neighbours, **settings)
    row = result(batched, "target")
    assert (row["tiles"], row["batch_size"], row["tile_size"], row["tile_overlap"]) == (2, 3, 32, 4)
    assert np.array_equal(np.asarray(opened(out_alone, result(alone, "target"))), np.asarray(opened(out_batched, row)))
    assert result(alone, "target")["image_sha256"] == row["image_sha256"]
    loads = [event["what"] for event in models.load_events() if event["event"] == "load"]
    assert loads == ["pipeline", "controlnet"]  # once for both tables; the pipeline is generate's own


def test_tiles_are_plain_diffusers_calls_blended(tmp_path: Path):
    # The stage's output is, bit for bit, each tile run through diffusers on its own (its crop of
    # the Lanczos-resized input as image and control image, its own seed) and blended.
    source = noise(24, 16, 6)
    settings = {"upscale.tile_size": 32, "upscale.tile_overlap": 4, "upscale.batch_size": 1,
                "upscale.guidance_scale": 5.0, "upscale.prompt": "unused: the row has its own"}
    table, out = upscaled(tmp_path, [{"id": "t", "prompt": "a chair", "seed": 5, "image": source}], **settings)
    ours = np.asarray(opened(out, result(table, "t")))

    cfg = fast_config(**{**FAST_UPSCALE, **settings})
    pipeline = resolve_model(upscale.models(cfg)["pipeline"], cfg)
    controlnet = ControlNetModel.from_pretrained(resolve_model(upscale.models(cfg)["controlnet"], cfg).path)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(pipeline.path, controlnet=controlnet,
                                                                    safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the stage's default, "euler"
    pipe.set_progress_bar_config(disable=True)
    grid = tile_grid(48, 32, 32, 4)
    pixels = upscaled_input(source, grid)
    blend = Blend(grid)
    for index, (left, top, right, bottom) in enumerate(grid.boxes):
        crop = Image.fromarray(pixels[top:bottom, left:right])
        tile = pipe("a chair", image=crop, control_image=crop, strength=0.8, num_inference_steps=2, guidance_scale=5.0,
                    controlnet_conditioning_scale=1.0,  # the stage's default; diffusers' img2img default is 0.8
                    generator=torch.Generator("cpu").manual_seed(tile_seed(5, index)), output_type="np").images[0]
        blend.add(index, tile)
    assert len(grid.boxes) == 2
    assert np.array_equal(ours, blend.result())
    parsed = parse_parameters(read_png_text(str(out / result(table, "t")["image_path"]))["parameters"])
    assert (parsed["prompt"], parsed["seed"], parsed["Upscale factor"], parsed["width"]) == ("a chair", 5, "2", 48)


def test_sdxl_shaped_pipeline_upscales_the_same_way(tmp_path: Path):
    rows = [{"id": "x", "prompt": "a boat", "seed": 4, "image": noise(13, 16, 7, "RGBA")}]
    table, out = upscaled(tmp_path, rows, profile="tiny-sdxl", **{"upscale.batch_size": 1})
    row = result(table, "x")
    assert (row["model"], row["controlnet"]) == ("tiny:sdxl", "tiny:controlnet-sdxl")
    assert (row["tile_size"], row["tiles"]) == (64, 1)
    image = opened(out, row)
    assert image.size == (26, 32) and image.mode == "RGBA"


def test_settings_the_pipelines_cannot_use_are_refused(tmp_path: Path):
    catalog = pa.table({"id": ["a"], "prompt": ["a mug"]})
    for overrides, message in [
        ({"upscale.tile_size": 36}, r"upscale.tile_size=36: must be a multiple of 8"),
        ({"upscale.tile_size": 32, "upscale.tile_overlap": 16}, r"upscale.tile_overlap=16: must be less than half"),
        ({"upscale.strength": 0.1, "upscale.steps": 5}, r"leaves no denoising step"),
        ({"upscale.factor": 5}, r"upscale.factor: Input should be less than or equal to 4"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plan_table(catalog, fast_config(**{**FAST_UPSCALE, **overrides}), tmp_path / "out")


def test_the_example_configuration_lists_the_defaults():
    assert load_config(REPO / "configs" / "run.example.yaml").upscale == upscale.Settings()


def results_sha(out: Path, ids) -> list[str]:
    found = pd.read_parquet(out / "results.parquet").set_index("id")
    return [found.loc[row_id, "generate_image_sha256"] for row_id in ids]


def test_generate_style_and_upscale_chain_through_the_flow(tmp_path: Path):
    catalog = write_catalog(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": ["a red mug", "a blue boat"],
                                                           "scene_prompt": [None, "on a beach at dawn"]})
    out = tmp_path / "out"
    overrides = {**FAST, **FAST_UPSCALE, "rows_per_shard": 1}
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
    summary = run_summary(state)
    assert summary["stages"] == {"generate": {"ok": 2}, "upscale": {"ok": 2}} and not state.is_failed()
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.stage) == {"upscale"}  # the summary columns describe the last stage's image
    for row in df.itertuples():
        assert (row.image_width, row.image_height) == (64, 64)
        assert (row.upscale_input_width, row.upscale_input_height, row.upscale_tiles) == (32, 32, 1)
        assert row.upscale_source_image == row.generate_image_path
        assert row.upscale_prompt == row.prompt and row.upscale_model == "tiny:sd15"
        assert row.upscale_controlnet == "tiny:controlnet-sd15"
        assert sha256_file(out / row.image_path) == row.image_sha256
        with Image.open(out / row.generate_image_path) as generated:
            assert generated.size == (32, 32)

    # The product chain (remove_bg aside): style paints a scene around generate's image, upscale takes style's.
    # The scene's prompt is the row's scene_prompt, else style.prompt, not the product's own prompt.
    style_settings = {"style.style_image": str(REPO / "catalogs" / "styles" / "warm-gradient.png"), "style.steps": 2,
                      "style.width": 32, "style.height": 32, "stages": ["generate", "style", "upscale"],
                      "style.prompt": "on a marble counter"}
    chained = tmp_path / "chained"
    state = catalogen_run(catalog=str(catalog), out=str(chained), overrides={**overrides, **style_settings},
                          return_state=True)
    summary = run_summary(state)
    assert summary["stages"] == {"generate": {"ok": 2}, "style": {"ok": 2}, "upscale": {"ok": 2}}
    df = pd.read_parquet(chained / "results.parquet")
    assert df.style_source_image.tolist() == df.generate_image_path.tolist()
    assert df.upscale_source_image.tolist() == df.style_image_path.tolist()
    assert df.style_product_identical.all() and df.generate_prompt.tolist() == ["a red mug", "a blue boat"]
    assert df.style_prompt.tolist() == ["on a marble counter", "on a beach at dawn"]
    assert parse_parameters(read_png_text(str(chained / df.style_image_path[1]))["parameters"])["prompt"] == \
        "on a beach at dawn"
    assert df.generate_image_sha256.tolist() == results_sha(out, df.id)  # the same rows, the same generate images
    assert (df.image_width.tolist(), df.stage.tolist()) == ([64, 64], ["upscale", "upscale"])


# lllyasviel/control_v11f1e_sd15_tile as the Hub lists it (fp32 and fp16, each as a pickle and as safetensors),
# and a sharded repository's names.
TILE_FILES = ["README.md", "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.safetensors", "images/original.png"]
SHARDED = ["config.json", "diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors",
           "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"]


def test_only_the_weights_the_controlnet_loads_are_fetched_from_the_hub():
    def fetched(files: list[str], variant: str | None = None) -> set[str]:
        controlnet = {"repo": "lllyasviel/control_v11f1e_sd15_tile", "kind": "controlnet", "variant": variant}
        spec = upscale.controlnet_spec(load_config(None, {"profile": "sd15", "upscale.controlnet": controlnet}))
        return set(filter_repo_objects(files, allow_patterns=spec.files))

    assert fetched(TILE_FILES) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert fetched(TILE_FILES, "fp16") == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}
    assert fetched(SHARDED) == set(SHARDED[:4])
    default = upscale.controlnet_spec(load_config(None, {"profile": "sdxl"}))
    assert default.repo == "xinsir/controlnet-tile-sdxl-1.0" and "diffusion_pytorch_model.safetensors" in default.files


def test_a_catalog_photo_edited_in_place_is_recomputed_and_one_edited_mid_run_fails(tmp_path: Path):
    # upscale (and style) may be the first image stage, reading the catalog's own file: its key must
    # follow the file (size and time), as remove_bg's and caption's do, not only its path.
    photo = tmp_path / "photo.png"
    noise(12, 10, 1).save(photo)
    table = pa.table({"id": ["p"], "prompt": ["a lamp"], "seed": [3], "image": ["photo.png"]})
    settings = {"stages": ["upscale"], "upscale.steps": 2, "upscale.guidance_scale": 1.0, "upscale.tile_size": 64}
    for stage_settings in ({}, {"stages": ["style"], "style.style_image": str(REPO / "catalogs/styles/sage-dots.png"),
                                "style.steps": 2, "style.width": 32, "style.height": 32}):
        cfg = fast_config(**{**settings, **stage_settings})
        stage = cfg.stages[0]
        noise(12, 10, 1).save(photo)
        before = plan_table(table, cfg, tmp_path / f"{stage}-a").planned[stage]
        noise(12, 10, 2).save(photo)  # the same path and size, other pixels, a later time
        os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
        plan = plan_table(table, cfg, tmp_path / f"{stage}-b")
        assert plan.planned[stage].column("key")[0] != before.column("key")[0], stage
        noise(12, 10, 3).save(photo)  # changed again after planning: the row fails rather than lie
        os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 2 * 10**9))
        row = STAGES[stage].process(plan.planned[stage], context(plan, stage)).to_pylist()[0]
        assert row["status"] == "failed" and "changed (size or time) since the run was planned" in row["error"], stage
