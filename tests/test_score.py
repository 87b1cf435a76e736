"""The score stage on the tiny CLIP and aesthetic head: the head is the published formula, `score_clip`
is what CLIP computes, and a chained run (generate -> caption -> score) scores every row, loads CLIP
once for caption and score, records both models, resumes and re-keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import REPO, context, fast_config, plan_table, write_catalog
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from catalogen.config import load_config
from catalogen.models import loading as model_cache
from catalogen.models.aesthetic import weights_file
from catalogen.publish.report import read_run, run_stages, stage_summary
from catalogen.run.plan import resolve_stage_models
from catalogen.storage.store import RunStore
from flows.run import catalogen_run, run_summary
from tasks import score

N_ROWS = 3
RUN = {"stages": ["generate", "caption", "score"], "generate.steps": 2, "generate.width": 32,
       "generate.height": 32, "caption.max_new_tokens": 4, "caption.clip_score": True, "score.batch_size": 2,
       "rows_per_shard": 2}


# --- independent implementations ------------------------------------------------------------------


def _published_head(weights: dict[str, np.ndarray], embedding: np.ndarray) -> np.ndarray:
    """The LAION predictor as published: five affine layers (Dropout is the identity at inference),
    no activations, over the L2-normalised embedding; plain numpy matmuls of the saved weights."""
    x = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
    for layer in (0, 2, 4, 6, 7):
        x = x @ weights[f"layers.{layer}.weight"].T.astype(np.float64) + weights[f"layers.{layer}.bias"]
    return x[:, 0]


def _transformers_clip(folder: str, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings from a plain CLIPModel call, one pair at a time."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    image_rows, text_rows = [], []
    for image, text in zip(images, texts):
        with torch.no_grad():
            found = model(**processor(text=[text], images=[image], return_tensors="pt", padding=True))
        image_rows.append(found.image_embeds[0].numpy())
        text_rows.append(found.text_embeds[0].numpy())
    return np.array(image_rows, np.float64), np.array(text_rows, np.float64)


def _cosine_100(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.maximum(100 * (a * b).sum(axis=-1), 0)


# --- direct calls ----------------------------------------------------------------------------------


def _photos(folder: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo-{i}.png")
        names.append(f"photo-{i}.png")
    return names


def test_the_head_is_the_published_formula_on_the_same_embedding(tmp_path):
    cfg = fast_config(stages=["score"])
    identities = resolve_stage_models(cfg)["score"]
    head = score.load_head(identities["head"], "cpu")
    embedding = np.random.default_rng(0).normal(size=(5, head.input_size))
    normalised = torch.nn.functional.normalize(torch.tensor(embedding, dtype=torch.float32), dim=-1)
    with torch.no_grad():
        found = head(normalised).numpy()

    expected = _published_head(load_numpy(str(weights_file(identities["head"].path))), embedding)
    assert found == pytest.approx(expected, abs=1e-4)
    assert np.ptp(expected) > 0.1  # the embedding reaches the score


def test_a_bad_image_fails_its_row_alone_and_a_photo_without_a_prompt_gets_no_clip(tmp_path):
    names = _photos(tmp_path, 3)
    (tmp_path / "photo-1.png").write_bytes(b"not an image")
    cfg = fast_config(stages=["score"])
    plan = plan_table(pa.table({"id": ["a", "b", "c"], "image": names, "prompt": ["a red chair", "x", None]}), cfg,
                      tmp_path / "out")
    out = score.process(plan.planned["score"], context(plan, "score")).to_pylist()

    assert [r["status"] for r in out] == ["ok", "failed", "ok"]
    assert "cannot read the image" in out[1]["error"] and out[1]["aesthetic"] is None
    assert out[0]["clip"] is not None and out[0]["clip_text"] == "a red chair"
    assert out[2]["clip"] is None and out[2]["clip_text"] is None and out[2]["aesthetic"] is not None


def test_a_score_depends_on_its_row_alone_and_the_batch_size_is_not_in_the_key(tmp_path):
    names = _photos(tmp_path, 5)
    table = pa.table({"id": [f"r{i}" for i in range(5)], "image": names, "prompt": [f"a red chair {i}" for i in range(5)]})

    def planned(rows: pa.Table, batch_size: int):
        cfg = fast_config(stages=["score"], **{"score.batch_size": batch_size})
        return plan_table(rows, cfg, tmp_path / f"out-{batch_size}-{rows.num_rows}")

    def scored(rows: pa.Table) -> list[dict]:
        plan = planned(rows, 4)
        return score.process(plan.planned["score"], context(plan, "score")).to_pylist()

    batched, alone = scored(table), scored(table.slice(2, 1))  # 4 + a padded tail of 1; then row 2 alone
    # equal up to float rounding: the CPU kernels round a row differently by its place in the batch (~1e-8)
    assert batched[2]["aesthetic"] == pytest.approx(alone[0]["aesthetic"], abs=1e-4)
    assert batched[2]["clip"] == pytest.approx(alone[0]["clip"], abs=1e-4)
    assert len({r["aesthetic"] for r in batched}) == 5  # each image its own score
    assert planned(table, 1).planned["score"].column("key") == planned(table, 4).planned["score"].column("key")


def test_model_settings_take_a_plain_repo_id_and_refuse_the_wrong_kind():
    cfg = fast_config(**{"score.clip_model": "openai/clip-vit-base-patch32",
                         "score.aesthetic_model": {"repo": "x", "kind": "clip"}})

    assert (cfg.score.clip_model.repo, cfg.score.clip_model.kind) == ("openai/clip-vit-base-patch32", "clip")
    faults = score.config_faults(cfg)
    assert len(faults) == 1 and "score.aesthetic_model" in faults[0] and "expected 'aesthetic'" in faults[0]
    assert load_config(REPO / "configs" / "run.example.yaml").score == score.Settings()  # it shows the defaults


def test_a_head_for_another_clip_width_is_refused_before_any_row(tmp_path):
    weights = load_numpy(str(weights_file(resolve_stage_models(fast_config(stages=["score"]))["score"]["head"].path)))
    weights["layers.0.weight"] = np.zeros((weights["layers.0.weight"].shape[0], 768), np.float32)
    save_numpy(weights, str(tmp_path / "wide.safetensors"))
    cfg = fast_config(stages=["score"], **{"score.aesthetic_model": str(tmp_path / "wide.safetensors")})
    plan = plan_table(pa.table({"id": ["a"], "image": _photos(tmp_path, 1)}), cfg, tmp_path / "out")

    with pytest.raises(ValueError, match="takes 768-dim embeddings, but the CLIP model tiny:clip.* makes 32-dim"):
        score.process(plan.planned["score"], context(plan, "score"))


# --- through the flow ------------------------------------------------------------------------------


def _flow(catalog: Path, out: Path, **overrides) -> dict:
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides={**RUN, **overrides}, return_state=True)
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        raise summary
    return summary


def _parts(out: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (out / "stages" / stage).glob("part-*.parquet"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One chained run, the model loads it made, and its results."""
    root = tmp_path_factory.mktemp("score")
    catalog = write_catalog(root / "catalog.parquet", {"id": [f"row-{i}" for i in range(N_ROWS)],
                                                       "prompt": ["a red chair", "a green bottle", "blue shoes"]})
    out = root / "out"
    model_cache.clear_cache()
    summary = _flow(catalog, out)
    loads = model_cache.load_events()
    return root, catalog, out, summary, loads, pd.read_parquet(out / "results.parquet").set_index("id")


def test_every_row_gets_both_scores_as_clip_and_the_published_head_compute_them(scored):
    root, _, out, summary, _, df = scored
    assert summary["failed"] == 0 and set(df.score_status) == {"ok"}, df.score_error.tolist()
    assert {"score_aesthetic", "score_clip"} <= set(df.columns)
    assert df.score_aesthetic.notna().all() and df.score_clip.notna().all()
    assert (df.score_source_image == df.generate_image_path).all()  # the final image
    assert (df.score_clip_text == df.generate_prompt).all()  # against the prompt it was made from

    identities = RunStore(out).read_run_json()["models"]["score"]
    images = [Image.open(out / path).convert("RGB") for path in df.score_source_image]
    image_embeds, text_embeds = _transformers_clip(identities["clip"]["path"], images, list(df.score_clip_text))
    weights = load_numpy(str(weights_file(identities["head"]["path"])))
    assert df.score_aesthetic.tolist() == pytest.approx(_published_head(weights, image_embeds).tolist(), abs=1e-4)
    assert df.score_clip.tolist() == pytest.approx(_cosine_100(image_embeds, text_embeds).tolist(), abs=1e-4)
    assert df.score_clip.tolist() == pytest.approx(df.caption_clip_score.tolist(), abs=1e-5)  # one CLIP, one number
    results, info = read_run(out)
    assert "score" in run_stages(results, info) and stage_summary(results, "score")["counts"]["ok"] == N_ROWS


def test_clip_is_loaded_once_for_caption_and_score(scored):
    _, _, _, _, events, df = scored
    loaded = [e["what"] for e in events if e["event"] == "load"]
    assert loaded.count("clip") == 1 and loaded.count("aesthetic") == 1, loaded
    assert df.caption_clip_score.notna().all() and df.score_clip.notna().all()  # both stages used it


def test_both_models_are_pinned_in_run_json_and_on_every_row(scored):
    _, _, out, _, _, df = scored
    recorded = RunStore(out).read_run_json()["models"]["score"]
    assert {role: (m["repo"], m["kind"]) for role, m in recorded.items()} == {
        "clip": ("tiny:clip", "clip"), "head": ("tiny:aesthetic", "aesthetic")}
    assert recorded["head"]["revision"].startswith("sha256:")  # a tiny model's revision: its files' hash
    assert set(zip(df.score_aesthetic_model, df.score_aesthetic_model_revision)) == {
        (recorded["head"]["repo"], recorded["head"]["revision"])}
    assert set(zip(df.score_clip_model, df.score_clip_model_revision)) == {
        (recorded["clip"]["repo"], recorded["clip"]["revision"])}


def test_a_second_run_resumes_and_a_new_head_re_keys_only_the_scores(scored):
    root, catalog, out, _, _, first = scored
    before = {stage: _parts(out, stage) for stage in ("generate", "score")}
    _flow(catalog, out)
    assert {stage: _parts(out, stage) for stage in before} == before  # nothing scored again

    # The same head with its output shifted by one point: a new model, so new keys and new scores.
    head = RunStore(out).read_run_json()["models"]["score"]["head"]["path"]
    weights = load_numpy(str(weights_file(head)))
    weights["layers.7.bias"] = weights["layers.7.bias"] + 1
    shifted = root / "shifted-head"
    shifted.mkdir()
    save_numpy(weights, str(shifted / "model.safetensors"))
    _flow(catalog, out, **{"score.aesthetic_model": str(shifted)})
    second = pd.read_parquet(out / "results.parquet").set_index("id")

    assert _parts(out, "generate") == before["generate"]
    assert len(_parts(out, "score")) > len(before["score"])
    assert set(second.score_key).isdisjoint(first.score_key)
    assert (second.generate_key == first.generate_key).all()
    assert second.score_aesthetic.tolist() == pytest.approx((first.score_aesthetic + 1).tolist(), abs=1e-4)
    assert second.score_clip.tolist() == first.score_clip.tolist()
    assert set(second.score_aesthetic_model) == {str(shifted)}
