"""The style stage on the tiny profile: the product's pixels survive, rows stay apart, the key follows the style.

Until remove_bg is merged, the cut-outs are synthetic RGBA files written into the run folder and
handed to `process` as an upstream stage's `source_image` would be.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import REPO, context, fast_config, plan_table
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from catalogen.models import loading as models
from catalogen.config import ConfigError, load_config
from catalogen.storage.hashing import sha256_file
from catalogen.models.loading import ModelIdentity, resolve_model
from catalogen.media.placement import place
from catalogen.media.pngmeta import parse_parameters, read_png_text
from catalogen.run.plan import Selection, prepare
from tasks import generate, style

CANVAS = 32
FAST_STYLE = {"stages": ["generate", "style"], "style.steps": 2, "style.width": CANVAS, "style.height": CANVAS,
              "style.guidance_scale": 2.0, "style.scale": 1.0}
# Solid colours: references the tiny CLIP tells apart clearly (see tests/test_tiny_adapters.py).
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 60)}


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("styles")
    paths = {}
    for name, colour in COLOURS.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (32, 32), colour).save(paths[name])
    return paths


def cutout(seed: int, width: int = 20, height: int = 30) -> Image.Image:
    """A noisy product with an opaque core and a soft alpha edge, transparent around it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    radius = ((xx + 0.5 - width / 2) / (width / 2)) ** 2 + ((yy + 0.5 - height / 2) / (height / 2)) ** 2
    alpha = np.clip((1.0 - radius) * 4 * 255, 0, 255).astype(np.uint8)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def styled(tmp_path: Path, rows: list[dict], **settings) -> tuple[pa.Table, Path]:
    """Plan `rows` (id, prompt, seed, style_image, cutout seed) and style them from synthetic cut-outs."""
    out = tmp_path / "run"
    catalog = {name: [row.get(name) for row in rows] for name in ("id", "prompt", "seed")}
    catalog["style_image"] = [str(row["style_image"]) for row in rows]
    roots = sorted({str(Path(row["style_image"]).parent) for row in rows})  # style images live outside the catalog's folder
    plan = plan_table(pa.table(catalog), fast_config(**{**FAST_STYLE, "images.roots": roots, **settings}), out)
    sources = []
    for row in rows:
        relative = f"inputs/{row['id']}.png"
        (out / "inputs").mkdir(parents=True, exist_ok=True)
        cutout(row["cutout"]).save(out / relative)
        sources.append(relative)
    planned = plan.planned["style"]
    planned = planned.set_column(planned.schema.get_field_index("source_image"), "source_image", pa.array(sources))
    return style.process(planned, context(plan, "style")), out


def result(table: pa.Table, row_id: str) -> dict:
    found = [row for row in table.to_pylist() if row["id"] == row_id][0]
    assert found["status"] == "ok", found["error"]
    return found


def pixels(out: Path, row: dict) -> np.ndarray:
    with Image.open(out / row["image_path"]) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def placed(seed: int) -> np.ndarray:
    return np.asarray(place(cutout(seed), (CANVAS, CANVAS), 0.8, color=None)[0])


TARGET = {"id": "target", "prompt": "a ceramic mug on a table", "seed": 7, "cutout": 1}


def test_placement_centres_the_product_and_scales_it_to_fill():
    canvas, _ = place(cutout(0, 20, 30), (64, 48), 0.5, color=None)
    left, top, right, bottom = canvas.getchannel("A").getbbox()
    assert canvas.size == (64, 48) and bottom - top == 24  # the longer side (relative to the canvas): 0.5 x 48
    assert abs((left + right) / 2 - 32) <= 1 and abs((top + bottom) / 2 - 24) <= 1
    assert place(Image.new("RGB", (10, 10), (5, 6, 7)), (20, 20), 1.0, color=None)[0].getpixel((0, 0)) == (5, 6, 7, 255)
    with pytest.raises(ValueError, match="nothing to place"):
        place(Image.new("RGBA", (8, 8)), (16, 16), 0.8, color=None)


def test_product_pixels_are_byte_identical_in_the_written_file(tmp_path: Path, styles):
    table, out = styled(tmp_path, [{**TARGET, "style_image": styles["red"]}])
    row = result(table, "target")
    image = pixels(out, row)
    product = placed(TARGET["cutout"])
    opaque = product[..., 3] == 255
    assert opaque.sum() > 100 and (~opaque).sum() > 300
    assert np.array_equal(image[opaque], product[..., :3][opaque])
    assert row["product_identical"] is True
    background = image[product[..., 3] == 0]
    assert np.abs(background.astype(int) - 128).max() > 10  # a generated scene, not the grey canvas

    assert (row["image_width"], row["image_height"]) == (CANVAS, CANVAS)
    assert sha256_file(out / row["image_path"]) == row["image_sha256"]
    assert row["style_image"] == str(styles["red"]) and row["style_image_sha256"] == sha256_file(styles["red"])
    assert (row["scale"], row["seed"], row["canvas_width"], row["prompt"]) == (1.0, 7, CANVAS, TARGET["prompt"])
    assert (row["model"], row["ip_adapter"]) == ("tiny:sd15", "tiny:ip-adapter")
    text = read_png_text(str(out / row["image_path"]))
    provenance = json.loads(text["catalogen"])
    assert provenance["style_image_sha256"] == row["style_image_sha256"] and provenance["key"] == row["key"]
    assert provenance["ip_adapter_revision"] == row["ip_adapter_revision"]
    parsed = parse_parameters(text["parameters"])
    assert (parsed["seed"], parsed["prompt"], parsed["IP-Adapter scale"]) == (7, TARGET["prompt"], "1.0")


def test_a_row_depends_on_its_own_style_image_only(tmp_path: Path, styles):
    # Batches of 3: alone, the row is padded with copies of itself; in the batch its neighbours use
    # other style images (which diffusers would otherwise mix into every row, diffusers #9813).
    models.clear_cache()
    alone, out_alone = styled(tmp_path / "alone", [{**TARGET, "style_image": styles["red"]}], **{"style.batch_size": 3})
    rows = [
        {"id": "before", "prompt": "a shoe", "seed": 1, "cutout": 2, "style_image": styles["blue"]},
        {**TARGET, "style_image": styles["red"]},
        {**TARGET, "id": "green twin", "style_image": styles["green"]},
    ]
    batch, out_batch = styled(tmp_path / "batch", rows, **{"style.batch_size": 3})
    assert set(batch.column("batch_size").to_pylist()) == {3}
    reference = pixels(out_alone, result(alone, "target"))
    assert np.array_equal(reference, pixels(out_batch, result(batch, "target")))
    assert result(alone, "target")["image_sha256"] == result(batch, "target")["image_sha256"]
    loads = [event["what"] for event in models.load_events() if event["event"] == "load"]
    assert loads == ["pipeline+ip-adapter"]  # once for both tables, apart from the plain pipeline

    # The same row with another style image: another background, the same product.
    twin = pixels(out_batch, result(batch, "green twin"))
    product = placed(TARGET["cutout"])
    background, opaque = product[..., 3] == 0, product[..., 3] == 255
    assert np.abs(twin[background].astype(int) - reference[background]).max() > 5
    assert np.array_equal(twin[opaque], reference[opaque])


def plan_rows(styles: list[str], catalog_dir: Path | None = None, **settings) -> list[dict]:
    """The style stage's plan of rows that differ only in their `style_image`."""
    cfg = fast_config(**{**FAST_STYLE, **settings})
    identities = {role: resolve_model(spec, cfg) for role, spec in style.models(cfg).items()}
    n = len(styles)
    rows = pa.table({"id": ["row"] * n, "variant": pa.array([0] * n, pa.int32()), "seed": [3] * n,
                     "prompt": ["a mug"] * n, "negative_prompt": pa.nulls(n, pa.string()),
                     "style_image": pa.array(styles, pa.string())})
    return style.plan(rows, cfg, identities, catalog_dir=catalog_dir).to_pylist()


def test_key_follows_the_style_images_content_not_its_path(tmp_path: Path, styles):
    shutil.copy(styles["red"], tmp_path / "renamed.png")
    Image.new("RGB", (32, 32), (221, 30, 30)).save(tmp_path / "edited.png")
    names = [str(styles["red"]), "renamed.png", "edited.png", "missing.png"]
    planned = plan_rows(names, catalog_dir=tmp_path)
    keys = [row["key"] for row in planned]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    # A relative `style_image` starts from the catalog's folder.
    assert planned[1]["style_image"] == str(tmp_path / "renamed.png")
    assert planned[0]["style_image_sha256"] == planned[1]["style_image_sha256"] == sha256_file(styles["red"])
    assert planned[3]["style_image_sha256"] is None  # keyed by its path; the row fails in `process`

    # The run's style image serves rows without their own; the same file gives the same key.
    default = plan_rows([None], **{"style.style_image": str(tmp_path / "renamed.png")})
    assert default[0]["key"] == keys[0]
    assert plan_rows([None], **{"style.scale": 0.5, "style.style_image": str(styles["red"])})[0]["key"] != keys[0]

    # The scene's prompt: a row's own scene_prompt, else style.prompt; each is in the key.
    red = {"style.style_image": str(styles["red"])}
    scenes = [plan_rows([None], **red, **{"style.prompt": text})[0] for text in ("", "on marble", "on oak")]
    assert [row["scene_prompt"] for row in scenes] == [None, "on marble", "on oak"]
    assert scenes[0]["key"] == default[0]["key"] and len({row["key"] for row in scenes}) == 3


def test_a_missing_style_image_is_refused_up_front_and_one_lost_later_fails_its_row(tmp_path: Path, styles):
    from catalogen.catalog import CatalogError

    lost = tmp_path / "lost.png"
    shutil.copy(styles["red"], lost)
    with pytest.raises(CatalogError) as info:
        styled(tmp_path / "refused", [{**TARGET, "style_image": tmp_path / "missing.png"}])
    (fault,) = info.value.faults
    assert (fault.column, fault.rows) == ("style_image", ("target",)) and "does not exist" in fault.message

    rows = [{**TARGET, "style_image": lost}, {**TARGET, "id": "fine", "style_image": styles["blue"]}]
    out = tmp_path / "run"
    catalog = {"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows], "seed": [r["seed"] for r in rows],
               "style_image": [str(r["style_image"]) for r in rows]}
    cfg = fast_config(**{**FAST_STYLE, "images.roots": [str(tmp_path), str(styles["blue"].parent)]})
    plan = plan_table(pa.table(catalog), cfg, out)
    lost.unlink()  # gone between planning and processing
    (out / "inputs").mkdir(parents=True)
    for row in rows:
        cutout(row["cutout"]).save(out / "inputs" / f"{row['id']}.png")
    planned = plan.planned["style"]
    planned = planned.set_column(planned.schema.get_field_index("source_image"), "source_image",
                                 pa.array([f"inputs/{r['id']}.png" for r in rows]))
    table = style.process(planned, context(plan, "style"))
    first = table.to_pylist()[0]
    assert first["status"] == "failed" and "lost.png" in first["error"]
    assert result(table, "fine")["product_identical"] is True


def test_a_style_image_setting_that_does_not_exist_is_refused(tmp_path: Path):
    cfg = fast_config(**{**FAST_STYLE, "style.style_image": str(tmp_path / "nowhere.png"), "images.roots": [str(tmp_path)]})
    with pytest.raises(ConfigError, match=r"style.style_image=.*nowhere.png: file does not exist .*--set"):
        plan_table(pa.table({"id": ["a"], "prompt": ["a mug"]}), cfg, tmp_path / "out")


def test_sdxl_shaped_pipeline_styles_the_same_way(tmp_path: Path, styles):
    table, out = styled(tmp_path, [{**TARGET, "style_image": styles["green"]}], profile="tiny-sdxl")
    row = result(table, "target")
    assert (row["model"], row["product_identical"]) == ("tiny:sdxl", True)
    product = placed(TARGET["cutout"])
    opaque = product[..., 3] == 255
    assert np.array_equal(pixels(out, row)[opaque], product[..., :3][opaque])


def test_the_products_configuration_plans_the_demo_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # its style image is relative to the folder a run starts from
    cfg = load_config(REPO / "configs" / "products.yaml")
    plan = prepare(REPO / "catalogs" / "demo_products.parquet", cfg, tmp_path / "out", Selection(limit=2))
    assert list(plan.planned) == ["enhance", "generate", "remove_bg", "style", "upscale", "renditions"]
    planned = plan.planned["style"].to_pylist()
    warm = REPO / "catalogs" / "styles" / "warm-gradient.png"
    assert {row["style_image_sha256"] for row in planned} == {sha256_file(warm)}
    assert planned[0]["prompt"].startswith("professional e-commerce studio product photo of Stoneware Coffee Mug")
    assert plan.in_scope().sum() == 2  # the trial's rows; the plan covers the whole catalog
    assert plan.planned["upscale"].filter(plan.in_scope()).column("factor").to_pylist() == [2, 2]


def test_the_example_configuration_lists_the_defaults():
    assert load_config(REPO / "configs" / "run.example.yaml").style == style.Settings()


def test_committed_style_images_are_what_make_demo_draws():
    style_images = runpy.run_path(str(REPO / "catalogs" / "make_demo.py"))["style_images"]
    for name, image in style_images().items():
        with Image.open(REPO / "catalogs" / "styles" / f"{name}.png") as committed:
            assert committed.size == (64, 64)
            assert np.array_equal(np.asarray(committed.convert("RGB")), np.asarray(image)), name


# Part of h94/IP-Adapter as the Hub lists it: a dozen adapters (and pickles beside each) and two image encoders.
H94_FILES = [
    "README.md", "models/image_encoder/config.json", "models/image_encoder/model.safetensors",
    "models/image_encoder/pytorch_model.bin", "models/ip-adapter_sd15.bin", "models/ip-adapter_sd15.safetensors",
    "models/ip-adapter-plus_sd15.safetensors", "models/ip-adapter_sd15_light.safetensors",
    "models/ip-adapter_sd15_vit-G.safetensors", "sdxl_models/image_encoder/config.json",
    "sdxl_models/image_encoder/model.safetensors", "sdxl_models/ip-adapter_sdxl.safetensors",
    "sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
]
ENCODER = {"models/image_encoder/config.json", "models/image_encoder/model.safetensors"}


@pytest.mark.parametrize("profile, adapter", [("sd15", "models/ip-adapter_sd15.safetensors"),
                                              ("sdxl", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors")])
def test_only_the_files_a_family_loads_are_fetched_from_the_hub(profile: str, adapter: str):
    spec = style.ip_adapter_spec(load_config(None, {"profile": profile}))
    assert set(filter_repo_objects(H94_FILES, allow_patterns=spec.files)) == ENCODER | {adapter}
    named = load_config(None, {"profile": profile, "style.ip_adapter": {"repo": "me/adapters", "kind": "ip-adapter",
                                                                        "files": ["x/*.safetensors"]}})
    assert style.ip_adapter_spec(named).files == ["x/*.safetensors"]  # the user's choice stands


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl"])
def test_the_files_fetched_are_enough_to_load_the_styled_pipeline(tmp_path: Path, profile: str):
    cfg = fast_config(profile=profile, stages=["style"])
    spec = style.ip_adapter_spec(cfg)
    full = Path(resolve_model(spec, cfg).path)  # laid out like h94/IP-Adapter, both families
    files = [str(p.relative_to(full)) for p in full.rglob("*") if p.is_file()]
    kept = list(filter_repo_objects(files, allow_patterns=spec.files))
    assert 0 < len(kept) < len(files)
    for name in kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / name, tmp_path / name)
    copy = ModelIdentity(f"fetched-{profile}", "copy", str(tmp_path), "ip-adapter")
    pipe = style.load_styled_pipeline(resolve_model(generate.model_spec(cfg), cfg), copy, "cpu", torch.float32)
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None
