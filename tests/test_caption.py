"""The caption stage on the tiny BLIP-2 and CLIP: every row captioned, alone or batched, degenerate
captions flagged, the CLIP score as CLIP computes it, and a chained run through the real flow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, context, fast_config, plan_table, write_catalog
from PIL import Image

from catalogen.models import loading as model_cache
from catalogen.models.clip import as_rgb
from catalogen.config import load_config
from catalogen.run.devices import Device
from catalogen.storage.hashing import sha256_bytes
from catalogen.run.plan import resolve_stage_models
from catalogen.stage import StageContext
from catalogen.storage.store import SUCCEEDED, RunStore
from flows.run import catalogen_run, run_summary
from tasks import caption
from tasks.caption import degenerate_reason

# --- degenerate captions (a pure function) ---------------------------------------------------------

GOOD_CAPTIONS = [
    "a red mug on a white table",
    "two dogs playing in the snow",
    "A close up of a cat.",
    "a man and a woman walking on a beach",
    "a living room with a couch and a table",
    "a train on train tracks",
    "mug",  # short, not degenerate
    "red mug",
    "a 3d render of a house",
    "un chat sur un tapis",
    "一只猫在桌子上",
    "arafed man in a suit",  # BLIP's odd word is still a caption
]


@pytest.mark.parametrize("text", GOOD_CAPTIONS)
def test_good_captions_are_not_flagged(text):
    assert degenerate_reason(text) is None
    assert degenerate_reason(text, prompt="a photo of") is None


@pytest.mark.parametrize(
    "text, prompt, reason",
    [
        ("", "", "empty caption"),
        ("   \n", "", "empty caption"),
        ("!!! ...", "", "no words"),
        ("1234 5678", "", "no words"),
        ("a photo of", "a photo of", "echoed back"),
        ("A photo of.", "a photo of", "echoed back"),
        ("counter counter counter", "", "'counter' repeated"),
        ("a mug on a table on a table on a table", "", "'on a table' repeated"),
        ("fou wind counter counter counter ceramic", "", "'counter' repeated"),
        ("a a dog", "", "'a' is more than half"),
        ("mug mug", "", "'mug' is more than half"),
        ("the red the blue the green the", "", "'the' is more than half"),
    ],
)
def test_degenerate_captions_are_flagged(text, prompt, reason):
    found = degenerate_reason(text, prompt)
    assert found is not None and reason in found


def test_a_caption_that_only_starts_like_the_prompt_is_fine():
    assert degenerate_reason("a photo of a red chair", prompt="a photo of") is None
    assert degenerate_reason("a photo of", prompt="") is None  # without a prompt it is a caption


# --- direct calls ----------------------------------------------------------------------------------


def _image(seed: int, size: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _saved(folder: Path, seeds: list[int]) -> list[str]:
    paths = []
    for seed in seeds:
        path = folder / f"image-{seed}.png"
        _image(seed).save(path)
        paths.append(str(path))
    return paths


def _rows(paths: list[str | None], image_bytes: list[bytes | None] | None = None,
          prompts: list[str] | None = None) -> pa.Table:
    """Rows as the pipeline hands them to `plan`, with the catalog's `image` (and `image_bytes`)."""
    n = len(paths)
    columns = {
        "id": pa.array([f"row-{i}" for i in range(n)]),
        "variant": pa.array([0] * n, pa.int32()),
        "seed": pa.array(range(n), pa.int64()),
        "prompt": pa.array(prompts or [f"a photo of object number {i}" for i in range(n)], pa.string()),
        "negative_prompt": pa.nulls(n, pa.string()),
        "image": pa.array(paths, pa.string()),
    }
    if image_bytes is not None:
        columns["image_bytes"] = pa.array(image_bytes, pa.binary())
    return pa.table(columns)


def _setup(tmp_path: Path, rows: pa.Table, **overrides):
    """Plan the caption stage over `rows` and return (planned, context) for a direct `process` call."""
    cfg = fast_config(stages=["caption"], **{"caption.max_new_tokens": 8, **overrides})
    identities = resolve_stage_models(cfg)["caption"]
    planned = caption.plan(rows, cfg, identities)
    ctx = StageContext(cfg, RunStore(tmp_path / "run"), identities, Device("cpu", "cpu"), torch.float32)
    return planned, ctx


def _captions(tmp_path: Path, paths: list[str], **overrides) -> pa.Table:
    planned, ctx = _setup(tmp_path, _rows(paths), **overrides)
    return caption.process(planned, ctx)


def _direct_blip2(ctx: StageContext, images: list[Image.Image], prompt: str, max_new_tokens: int,
                  num_beams: int) -> list[str]:
    """Captions from a plain transformers call, one image at a time (no batching, no padding)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    folder = ctx.models["captioner"].path
    model = Blip2ForConditionalGeneration.from_pretrained(folder, use_safetensors=True).eval()
    processor = Blip2Processor.from_pretrained(folder)
    captions = []
    for image in images:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        captions.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    return captions


def test_every_row_gets_a_caption_with_its_provenance(tmp_path):
    paths = _saved(tmp_path, list(range(7)))
    out = _captions(tmp_path, paths, **{"caption.batch_size": 3})  # 3 + 3 + a padded tail of 1
    rows = out.to_pylist()
    identity = resolve_stage_models(fast_config(stages=["caption"]))["caption"]["captioner"]

    assert out.schema == caption.OUTPUT_SCHEMA
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(7)]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in rows)
    assert len({r["caption"] for r in rows}) > 1  # the image reaches the caption
    for r in rows:
        reason = degenerate_reason(r["caption"])
        assert r["status"] == ("ok" if reason is None else "degenerate") and r["status"] in SUCCEEDED
        assert r["error"] == reason
        assert (r["model"], r["model_revision"]) == (identity.repo, identity.revision)
        assert (r["prompt"], r["max_new_tokens"], r["num_beams"], r["batch_size"]) == ("", 8, 1, 3)
        assert (r["device"], r["dtype"]) == ("cpu", "float32")
        assert r["clip_score"] is None and r["clip_model"] is None and r["clip_text"] is None
    assert [r["source_image"] for r in rows] == paths


@pytest.mark.parametrize("prompt, num_beams", [("", 1), ("a photo of", 2)])
def test_captions_are_what_transformers_generates_for_each_image_alone(tmp_path, prompt, num_beams):
    paths = _saved(tmp_path, [10, 11, 12, 13, 14])
    planned, ctx = _setup(tmp_path, _rows(paths), **{"caption.batch_size": 4, "caption.prompt": prompt,
                                                     "caption.num_beams": num_beams})
    out = caption.process(planned, ctx).to_pylist()

    expected = _direct_blip2(ctx, [Image.open(p).convert("RGB") for p in paths], prompt, 8, num_beams)
    assert [r["caption"] for r in out] == expected
    assert {r["prompt"] for r in out} == {prompt}
    assert {r["num_beams"] for r in out} == {num_beams}


def test_a_caption_does_not_depend_on_its_batch_neighbours(tmp_path):
    paths = _saved(tmp_path, [20, 21, 22, 23, 24])
    target = paths[2]
    settings = {"caption.batch_size": 4, "caption.clip_score": True, "caption.max_new_tokens": 12}
    prompts = ["a red chair"] * 5
    alone = caption.process(*_setup(tmp_path, _rows([target], prompts=prompts[:1]), **settings)).to_pylist()[0]
    mixes = [[paths[0], paths[1], target, paths[3]], [target, *paths[:2], *paths[3:]], [*paths[:2], *paths[3:], target]]
    for mix in mixes:
        out = caption.process(*_setup(tmp_path, _rows(mix, prompts=prompts[:len(mix)]), **settings)).to_pylist()
        found = out[mix.index(target)]
        assert found["caption"] == alone["caption"]
        assert found["clip_score"] == alone["clip_score"]


def test_images_come_from_paths_bytes_and_the_run_folder_and_bad_ones_fail_alone(tmp_path):
    run_folder = tmp_path / "run"
    (run_folder / "images").mkdir(parents=True)
    _image(30).save(run_folder / "images" / "upstream.png")  # an earlier stage's image, relative to the run
    absolute = _saved(tmp_path, [31])[0]
    paths = [absolute, str(tmp_path / "missing.png"), None, None, None]
    image_bytes = [None, None, b"not an image", _png(_image(32)), None]
    planned, ctx = _setup(tmp_path, _rows(paths, image_bytes), **{"caption.batch_size": 5})
    handed_over = pa.array([None, None, None, None, "images/upstream.png"], pa.string())  # as the pipeline fills it
    planned = planned.set_column(planned.schema.get_field_index("source_image"), "source_image",
                                 pc.coalesce(handed_over, planned.column("source_image")))
    out = caption.process(planned, ctx).to_pylist()

    assert [r["status"] in SUCCEEDED for r in out] == [True, False, False, True, True]
    assert "missing.png does not exist" in out[1]["error"]
    assert "the catalog's bytes is not an image" in out[2]["error"]
    direct = _direct_blip2(ctx, [_image(31), _image(32), _image(30)], "", 8, 1)
    assert [out[0]["caption"], out[3]["caption"], out[4]["caption"]] == direct
    read = [Path(absolute).read_bytes(), _png(_image(32)), (run_folder / "images" / "upstream.png").read_bytes()]
    assert [out[0]["source_sha256"], out[3]["source_sha256"], out[4]["source_sha256"]] == [sha256_bytes(b) for b in read]
    assert out[1]["source_sha256"] is None and out[1]["caption"] is None


def test_a_catalog_file_changed_since_planning_fails_its_row(tmp_path):
    paths = _saved(tmp_path, [33, 34])
    planned, ctx = _setup(tmp_path, _rows(paths))
    _image(35, size=48).save(paths[1])  # other content under the planned key
    out = caption.process(planned, ctx).to_pylist()

    assert out[0]["status"] in SUCCEEDED
    assert out[1]["status"] == "failed" and "changed (size or time) since the run was planned" in out[1]["error"]


def test_a_catalog_of_photos_needs_no_prompt_to_be_captioned(tmp_path):
    photos = _saved(tmp_path, [36, 37])
    cfg = fast_config(stages=["caption"], **{"caption.max_new_tokens": 8, "caption.clip_score": True})
    plan = plan_table(pa.table({"id": ["a", "b"], "image": [Path(p).name for p in photos]}), cfg, tmp_path / "out")
    out = caption.process(plan.planned["caption"], context(plan, "caption")).to_pylist()

    assert [r["status"] in SUCCEEDED for r in out] == [True, True]
    assert [r["source_image"] for r in out] == [str(Path(p).resolve()) for p in photos]
    assert [r["clip_score"] for r in out] == [None, None]  # no text to compare with


def test_a_transparent_image_is_captioned_on_white(tmp_path):
    cutout = _image(40, mode="RGBA")
    alpha = np.zeros((32, 32), np.uint8)
    alpha[8:24, 8:24] = 255
    cutout.putalpha(Image.fromarray(alpha))
    flat = Image.new("RGB", cutout.size, (255, 255, 255))
    flat.paste(cutout, mask=cutout.getchannel("A"))
    planned, ctx = _setup(tmp_path, _rows([None, None], [_png(cutout), _png(flat)]))
    out = caption.process(planned, ctx).to_pylist()

    assert np.asarray(as_rgb(cutout))[0, 0].tolist() == [255, 255, 255]
    assert out[0]["caption"] == out[1]["caption"]


def test_the_clip_score_is_clip_s_cosine_times_100(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    paths = _saved(tmp_path, [50, 51, 52])
    texts = ["a red chair", "a green glass bottle standing on a table", "shoes"]
    planned, ctx = _setup(tmp_path, _rows(paths, prompts=texts), **{"caption.clip_score": True, "caption.batch_size": 2})
    out = caption.process(planned, ctx).to_pylist()

    folder = ctx.models["clip"].path
    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        direct = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
    cosine = (direct.image_embeds * direct.text_embeds).sum(dim=-1)
    expected = (100 * cosine).clamp(min=0).tolist()

    assert [r["clip_score"] for r in out] == pytest.approx(expected, abs=1e-4)
    assert [r["clip_text"] for r in out] == texts
    identity = ctx.models["clip"]
    assert {(r["clip_model"], r["clip_model_revision"]) for r in out} == {(identity.repo, identity.revision)}


def test_the_clip_score_can_compare_the_image_with_its_own_caption(tmp_path):
    paths = _saved(tmp_path, [60, 61])
    out = _captions(tmp_path, paths, **{"caption.clip_score": True, "caption.clip_text": "caption"}).to_pylist()

    assert [r["clip_text"] for r in out] == [r["caption"] for r in out]
    assert all(r["clip_score"] is not None and r["clip_score"] >= 0 for r in out)


def test_clip_is_neither_resolved_nor_loaded_when_the_score_is_off(tmp_path):
    model_cache.clear_cache()
    out = _captions(tmp_path, _saved(tmp_path, [70]))

    assert set(caption.models(fast_config(stages=["caption"]))) == {"captioner"}
    assert [e["what"] for e in model_cache.load_events()] == ["blip2"]
    assert out.column("clip_score").null_count == 1


def test_the_key_holds_what_changes_the_output(tmp_path):
    paths = _saved(tmp_path, [80, 81])

    def keys(**overrides) -> list[str]:
        planned, _ = _setup(tmp_path, _rows(paths), **overrides)
        return planned.column("key").to_pylist()

    base = keys()
    assert len(set(base)) == 2
    assert keys(**{"caption.batch_size": 2}) == base  # throughput only
    assert keys(**{"caption.clip_text": "caption"}) == base  # scoring is off
    for change in ({"caption.prompt": "a photo of"}, {"caption.max_new_tokens": 9}, {"caption.num_beams": 2},
                   {"caption.clip_score": True}):
        assert set(keys(**change)).isdisjoint(base), change
    scored = keys(**{"caption.clip_score": True})
    assert set(keys(**{"caption.clip_score": True, "caption.clip_text": "caption"})).isdisjoint(scored)


def test_model_settings_take_a_plain_repo_id_and_refuse_the_wrong_kind():
    cfg = fast_config(**{"caption.model": "Salesforce/blip2-opt-6.7b", "caption.clip_model": {"repo": "x", "kind": "sd15"}})

    assert (cfg.caption.model.repo, cfg.caption.model.kind) == ("Salesforce/blip2-opt-6.7b", "blip2")
    faults = caption.config_faults(cfg)
    assert len(faults) == 1 and "caption.clip_model" in faults[0] and "'sd15'" in faults[0]


def test_the_shipped_configs_load():
    example = load_config(REPO / "configs" / "run.example.yaml")
    dataset = load_config(REPO / "configs" / "dataset.yaml")

    assert example.caption == caption.Settings()  # the example shows the defaults
    assert dataset.stages == ("generate", "caption") and dataset.template.preset == "dataset"
    assert dataset.caption.clip_score


# --- through the flow ------------------------------------------------------------------------------

CHAINED = {"stages": ["generate", "caption"], "generate.steps": 2, "generate.width": 32, "generate.height": 32,
           "caption.max_new_tokens": 8, "caption.clip_score": True, "rows_per_shard": 2}


def _flow(catalog: Path, out: Path) -> dict:
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=CHAINED, return_state=True)
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        raise summary
    return summary


def _parts(out: Path) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas().assign(part=p.name) for p in sorted((out / "stages" / "caption").glob("part-*.parquet"))]
    return pd.concat(frames)


def test_a_chained_run_captions_generated_images_and_recomputes_only_changed_rows(tmp_path):
    catalog = tmp_path / "catalog.parquet"
    columns = {"id": [f"row-{i}" for i in range(4)], "prompt": [f"a photo of object number {i}" for i in range(4)],
               "steps": pa.array([None] * 4, pa.int32())}
    write_catalog(catalog, columns)
    out = tmp_path / "out"

    summary = _flow(catalog, out)
    assert summary["failed"] == 0 and summary["stages"]["caption"].get("failed", 0) == 0
    first = pd.read_parquet(out / "results.parquet").set_index("id")
    parts = _parts(out).set_index("id")
    assert (first.caption_caption == parts.caption.loc[first.index]).all()
    assert (first.caption_key == parts.key.loc[first.index]).all()
    assert (first.caption_source_image == first.generate_image_path).all()  # it captioned generate's image
    assert (first.caption_clip_text == first.generate_prompt).all()  # scored against the prompt of the image

    columns["steps"] = pa.array([None, 3, None, None], pa.int32())
    write_catalog(catalog, columns)
    _flow(catalog, out)
    second = pd.read_parquet(out / "results.parquet").set_index("id")
    later = _parts(out)
    fresh = later[~later.part.isin(set(parts.part))]
    assert list(fresh.id) == ["row-1"]  # the only caption computed again
    changed = second.caption_key != first.caption_key
    assert changed.to_dict() == {"row-0": False, "row-1": True, "row-2": False, "row-3": False}
    assert (second.caption_finished_at[~changed] == first.caption_finished_at[~changed]).all()
    assert second.loc["row-1", "caption_caption"] == fresh.caption.iloc[0]
    assert second.loc["row-1", "caption_source_image"] == second.loc["row-1", "generate_image_path"]


def test_cut_outs_of_catalog_photos_are_captioned(tmp_path):
    # The rows bring their own photo files; remove_bg hands its cut-out on, and caption reads that
    # file of the run folder (not the catalog photo the plan's identity describes).
    for i in range(2):
        pixels = np.full((40, 48, 3), 240, np.uint8)
        pixels[10:30, 12 + i:36] = (30 * i, 60, 200)
        Image.fromarray(pixels).save(tmp_path / f"photo-{i}.png")
    catalog = write_catalog(tmp_path / "catalog.parquet", {"id": ["a", "b"], "image": ["photo-0.png", "photo-1.png"]})
    overrides = {"stages": ["remove_bg", "caption"], "caption.max_new_tokens": 8}
    state = catalogen_run(catalog=str(catalog), out=str(tmp_path / "out"), overrides=overrides, return_state=True)
    summary = run_summary(state)
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(df.remove_bg_status) == {"ok"} and set(df.caption_status) <= set(SUCCEEDED), df.caption_error.tolist()
    assert df.caption_source_image.tolist() == df.remove_bg_image_path.tolist() and not state.is_failed(), summary
