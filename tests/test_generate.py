"""The generate stage on the tiny profile: determinism, parity with plain diffusers, SDXL, safety."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import context, fast_config, plan_table, run_stage
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from catalogen.config import RunConfig
from catalogen.storage.hashing import sha256_file
from catalogen.models.loading import resolve_model
from catalogen.media.pngmeta import parse_parameters, read_png_text
from catalogen.models.schedulers import SCHEDULERS
from tasks import generate

TARGET = {"id": "target", "prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "fog", "seed": 1234}


def prompts_columns(n: int) -> dict[str, list]:
    return {"id": [f"p{i}" for i in range(n)], "prompt": [f"object number {i}" for i in range(n)]}


def pixels(out: Path, table: pa.Table, row_id: str = "target") -> np.ndarray:
    row = table.filter(pa.compute.equal(table.column("id"), row_id)).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    return np.asarray(Image.open(out / row["image_path"]))


def as_columns(rows: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def test_image_depends_on_its_row_only(tmp_path: Path):
    others = [{"id": f"n{i}", "prompt": f"neighbour {i} " * (i + 1), "negative_prompt": f"blurry {i}", "seed": i} for i in range(6)]
    cfg = fast_config(**{"generate.batch_size": 4})
    alone = run_stage(pa.table(as_columns([TARGET])), cfg, tmp_path / "alone")
    in_four = run_stage(pa.table(as_columns([*others[:3], TARGET])), cfg, tmp_path / "four")
    mixed = run_stage(pa.table(as_columns([others[5], TARGET, *others[3:5], *others[:3]])), cfg, tmp_path / "mixed")
    assert set(in_four.column("batch_size").to_pylist()) == {4}  # really batched
    reference = pixels(tmp_path / "alone", alone)
    assert reference.std() > 1  # a real image, not a constant
    assert np.array_equal(reference, pixels(tmp_path / "four", in_four))
    assert np.array_equal(reference, pixels(tmp_path / "mixed", mixed))
    shas = {t.filter(pa.compute.equal(t.column("id"), "target")).column("image_sha256")[0].as_py() for t in (alone, in_four, mixed)}
    assert len(shas) == 1  # byte-identical files, provenance chunks included


def _plain_scheduler(name: str, config):
    # Written out as a diffusers user would, independently of catalogen's scheduler table.
    plain = {
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
        "dpm++_2m": lambda: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
        "dpm++_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", use_karras_sigmas=True),
        "ddim": lambda: DDIMScheduler.from_config(config),
        "pndm": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        "lms": lambda: LMSDiscreteScheduler.from_config(config),
        "heun": lambda: HeunDiscreteScheduler.from_config(config),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config),
    }
    return plain[name]()


def test_every_scheduler_matches_a_plain_diffusers_call(tmp_path: Path):
    # One row per scheduler, each set by the row's own override; batch size 1, since the plain
    # call makes one image and results are exact only at equal batch shapes.
    names = list(SCHEDULERS)
    rows = [{**TARGET, "id": name} for name in names]
    cfg = fast_config(**{"generate.guidance_scale": 6.0, "generate.steps": 4, "generate.batch_size": 1})
    table = run_stage(pa.table({**as_columns(rows), "scheduler": names}), cfg, tmp_path)
    identity = resolve_model(generate.model_spec(cfg), cfg)
    pipe = StableDiffusionPipeline.from_pretrained(identity.path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    default = pipe.scheduler.config
    seen = set()
    for name in names:
        pipe.scheduler = _plain_scheduler(name, default)
        image = pipe(
            TARGET["prompt"], negative_prompt=TARGET["negative_prompt"], width=32, height=32,
            num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(TARGET["seed"]),
        ).images[0]
        ours = pixels(tmp_path, table, name)
        assert np.array_equal(ours, np.asarray(image)), name
        seen.add(ours.tobytes())
    assert len(seen) == len(names)  # each scheduler really gives its own image


def test_provenance_records_each_rows_own_overrides(tmp_path: Path):
    # A column or PNG chunk that recorded the run's setting instead of the row's would fail here.
    own = {"id": "own", "prompt": "a red door", "negative_prompt": "grainy", "seed": 77, "steps": 3,
           "guidance_scale": 4.5, "width": 40, "height": 24, "scheduler": "Euler a"}
    plain = {"id": "plain", "prompt": "a blue boat"}
    columns = {k: [own.get(k), plain.get(k)] for k in own}
    cfg = fast_config(**{"generate.negative_prompt": "run negative", "generate.steps": 2})
    table = run_stage(pa.table(columns), cfg, tmp_path)
    rows = {r["id"]: r for r in table.to_pylist()}
    expected = {"own": (3, 4.5, 40, 24, "euler_a", "grainy", 77), "plain": (2, 7.5, 32, 32, "euler", "run negative", None)}
    for rid, (steps, guidance, width, height, scheduler, negative, seed) in expected.items():
        row = rows[rid]
        assert (row["steps"], row["guidance_scale"], row["width"], row["height"], row["scheduler"],
                row["negative_prompt"]) == (steps, guidance, width, height, scheduler, negative)
        assert (row["image_width"], row["image_height"]) == (width, height)
        with Image.open(tmp_path / row["image_path"]) as image:
            assert image.size == (width, height)
        text = read_png_text(str(tmp_path / row["image_path"]))
        parsed = parse_parameters(text["parameters"])
        assert (parsed["steps"], parsed["guidance_scale"], parsed["width"], parsed["height"], parsed["scheduler"],
                parsed["negative_prompt"], parsed["seed"]) == (steps, guidance, width, height, scheduler, negative, row["seed"])
        chunk = __import__("json").loads(text["catalogen"])
        assert (chunk["steps"], chunk["scheduler"], chunk["negative_prompt"], chunk["seed"]) == (steps, scheduler, negative, row["seed"])
        if seed is not None:
            assert row["seed"] == seed


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl"])
def test_the_negative_prompt_counts_on_the_long_and_weighted_path(tmp_path: Path, profile: str):
    # Prompts over 77 tokens or with weights are encoded by catalogen, not the pipeline: their
    # negative prompt must still reach the unconditional branch.
    rows = [{"id": f"{kind}-{neg}", "prompt": prompt, "negative_prompt": neg, "seed": 4}
            for kind, prompt in (("long", LONG + "with a red door"), ("weighted", "a (red:1.4) door"))
            for neg in ("fog", "grain")]
    table = run_stage(pa.table(as_columns(rows)), fast_config(profile=profile), tmp_path)
    for kind in ("long", "weighted"):
        assert not np.array_equal(pixels(tmp_path, table, f"{kind}-fog"), pixels(tmp_path, table, f"{kind}-grain"))


def test_a_short_batch_really_runs_padded_to_the_batch_size(tmp_path: Path):
    # Observed on the UNet itself (a forward hook on the real model), not read back from settings.
    from catalogen.models.diffusion import load_pipeline

    cfg = fast_config(**{"generate.batch_size": 4})
    plan = plan_table(pa.table(prompts_columns(3)), cfg, tmp_path / "out")
    pipe = load_pipeline(plan.models["generate"]["pipeline"], "cpu", torch.float32)
    shapes: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[0]))
    try:
        generate.process(plan.planned["generate"], context(plan, "generate"))
    finally:
        handle.remove()
    assert shapes and set(shapes) == {8}  # 4 rows (3 real, 1 filler) x 2 for classifier-free guidance


def test_png_parameters_round_trip(tmp_path: Path):
    row = {**TARGET, "prompt": 'a "quoted", comma: prompt\nover two lines'}
    cfg = fast_config(**{"generate.scheduler": "dpm++_2m_karras"})
    table = run_stage(pa.table(as_columns([row])), cfg, tmp_path)
    result = table.to_pylist()[0]
    path = tmp_path / result["image_path"]
    assert sha256_file(path) == result["image_sha256"]
    text = read_png_text(str(path))
    parsed = parse_parameters(text["parameters"])
    assert parsed["prompt"] == row["prompt"]
    assert parsed["negative_prompt"] == "fog"
    assert (parsed["seed"], parsed["steps"], parsed["width"], parsed["height"]) == (1234, 3, 32, 32)
    assert (parsed["sampler"], parsed["Schedule type"], parsed["scheduler"]) == ("DPM++ 2M", "Karras", "dpm++_2m_karras")
    assert parsed["guidance_scale"] == 7.5 and parsed["model"] == "tiny:sd15"
    provenance = __import__("json").loads(text["catalogen"])
    assert provenance["key"] == result["key"] and provenance["model_revision"] == result["model_revision"]


def test_sdxl_shaped_pipeline_runs_through_the_same_path(tmp_path: Path):
    cfg = fast_config(profile="tiny-sdxl", **{"generate.scheduler": "euler_a", "generate.batch_size": 1})
    table = run_stage(pa.table(as_columns([TARGET, {**TARGET, "id": "second", "seed": 9}])), cfg, tmp_path)
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert table.column("model").to_pylist()[0] == "tiny:sdxl"
    ours = pixels(tmp_path, table)
    identity = resolve_model(generate.model_spec(cfg), cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(identity.path, add_watermarker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    image = pipe(
        TARGET["prompt"], negative_prompt=TARGET["negative_prompt"], width=32, height=32, guidance_scale=7.5,
        num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(TARGET["seed"]),
    ).images[0]
    assert np.array_equal(ours, np.asarray(image))


def test_a_failing_row_fails_alone(tmp_path: Path):
    cfg = fast_config()
    plan = plan_table(pa.table(as_columns([TARGET, {**TARGET, "id": "other"}])), cfg, tmp_path / "out")
    planned = plan.planned["generate"]
    # A size the pipeline rejects (validation would have refused it): only that row may fail.
    planned = planned.set_column(planned.schema.get_field_index("width"), "width", pa.array([20, 32], pa.int32()))
    out = generate.process(planned, context(plan, "generate"))
    first, second = out.to_pylist()
    assert first["status"] == "failed" and "divisible by 8" in first["error"] and first["image_path"] is None
    assert second["status"] == "ok" and (tmp_path / "out" / second["image_path"]).exists()


@pytest.fixture(scope="module")
def flag_everything_model(tmp_path_factory) -> dict:
    """A copy of the tiny SD1.5 model whose safety checker flags every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    source = Path(resolve_model(generate.model_spec(fast_config()), fast_config()).path)
    folder = tmp_path_factory.mktemp("strict") / "sd15"
    shutil.copytree(source, folder)
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine similarity is always above -2
    checker.save_pretrained(folder / "safety_checker")
    return {"repo": str(folder), "kind": "sd15", "default_size": 64, "min_size": 16, "max_size": 512, "has_safety_checker": True}


def test_safety_verdict_is_recorded_not_blacked_out(tmp_path: Path, flag_everything_model):
    flagged = run_stage(pa.table(as_columns([TARGET])), fast_config(**{"generate.model": flag_everything_model}), tmp_path / "flag")
    row = flagged.to_pylist()[0]
    assert row["status"] == "ok" and row["safety_flagged"] is True
    assert pixels(tmp_path / "flag", flagged).std() > 1  # not the pipeline's black square

    default = run_stage(pa.table(as_columns([TARGET])), fast_config(), tmp_path / "default")
    assert default.to_pylist()[0]["safety_flagged"] is False  # the tiny checker passes everything

    cfg = fast_config(**{"generate.model": flag_everything_model, "generate.safety_checker": "withhold"})
    withheld = run_stage(pa.table(as_columns([TARGET])), cfg, tmp_path / "withhold").to_pylist()[0]
    assert withheld["status"] == "failed" and "safety checker" in withheld["error"]
    assert withheld["image_path"] is None and not (tmp_path / "withhold" / "images").exists()

    off = run_stage(pa.table(as_columns([TARGET])), fast_config(**{"generate.safety_checker": "off"}), tmp_path / "off")
    assert off.to_pylist()[0]["safety_flagged"] is None


def test_safety_checker_on_a_model_without_one_is_refused(tmp_path: Path):
    from catalogen.config import ConfigError
    from tasks.generate import safety_mode

    assert safety_mode(fast_config(profile="tiny-sdxl")) == "off"
    assert safety_mode(fast_config(profile="tiny")) == "flag"
    with pytest.raises(ConfigError, match="has no safety checker"):
        plan_table(pa.table(as_columns([TARGET])), fast_config(profile="tiny-sdxl", **{"generate.safety_checker": "flag"}),
                   tmp_path / "out")


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl"])
def test_the_prompt_conditions_the_image(tmp_path: Path, profile: str):
    # The tiny tokenizer reads real text, so the prompt (not only the seed) decides the pixels.
    rows = [{"id": "a", "prompt": "a red door", "seed": 1}, {"id": "b", "prompt": "a blue boat", "seed": 1}]
    table = run_stage(pa.table(as_columns(rows)), fast_config(profile=profile), tmp_path)
    assert not np.array_equal(pixels(tmp_path, table, "a"), pixels(tmp_path, table, "b"))
    tokenizer = _load_plain(fast_config(profile=profile)).tokenizer
    assert tokenizer.decode(tokenizer("A red door!").input_ids, skip_special_tokens=True) == "a red door !"


def test_tiny_models_build_identically(tmp_path: Path):
    # Same weights on every machine: the same row gives the same image everywhere.
    first = resolve_model(generate.model_spec(fast_config()), fast_config())
    again = resolve_model(generate.model_spec(fast_config()), fast_config(cache_dir=str(tmp_path)))
    assert first.revision == again.revision and first.path != again.path


# --- long prompts and A1111 emphasis ---------------------------------------------------------------

LONG = "a very detailed scene " * 6  # well past 75 tokens of the tiny (character-level) tokenizer


def _load_plain(cfg: RunConfig):
    identity = resolve_model(generate.model_spec(cfg), cfg)
    if generate.model_spec(cfg).kind == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(identity.path, add_watermarker=False)
    return StableDiffusionPipeline.from_pretrained(identity.path, safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl"])
def test_own_encoding_of_a_plain_prompt_equals_the_pipelines(profile: str):
    from catalogen.models.prompts import encode_sd, encode_sdxl

    pipe = _load_plain(fast_config(profile=profile))
    with torch.inference_mode():
        if profile == "tiny":
            expected = pipe.encode_prompt("a red fox", "cpu", 1, False)[0]
            assert torch.equal(encode_sd(pipe, "a red fox", 1), expected)
        else:
            expected, _, pooled, _ = pipe.encode_prompt("a red fox", device="cpu", do_classifier_free_guidance=False)
            embeds, own_pooled = encode_sdxl(pipe, "a red fox", 1)
            assert torch.equal(embeds, expected) and torch.equal(own_pooled, pooled)


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl"])
def test_the_end_of_a_long_prompt_is_not_dropped(tmp_path: Path, profile: str):
    rows = [{"id": "a", "prompt": LONG + "with a red door"}, {"id": "b", "prompt": LONG + "with a blue boat"}]
    table = run_stage(pa.table(as_columns([{**r, "seed": 5} for r in rows])), fast_config(profile=profile), tmp_path)
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert not np.array_equal(pixels(tmp_path, table, "a"), pixels(tmp_path, table, "b"))
    # Plain diffusers truncates at 77 tokens, so for it the two prompts are one and the same.
    pipe = _load_plain(fast_config(profile=profile))
    a, b = (pipe(r["prompt"], width=32, height=32, num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
            for r in rows)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_emphasis_changes_the_image_and_weight_one_does_not(tmp_path: Path):
    rows = [{"id": i, "prompt": p, "seed": 3} for i, p in
            (("plain", "a cat on a mat"), ("one", "a (cat:1.0) on a mat"), ("strong", "a (cat:1.6) on a mat"),
             ("nested", "a ((cat)) on a [mat]"))]
    table = run_stage(pa.table(as_columns(rows)), fast_config(), tmp_path)
    plain = pixels(tmp_path, table, "plain")
    assert np.array_equal(plain, pixels(tmp_path, table, "one"))
    assert not np.array_equal(plain, pixels(tmp_path, table, "strong"))
    assert not np.array_equal(plain, pixels(tmp_path, table, "nested"))
    # The emphasised row on its own gives the same image: weights do not leak across a batch.
    alone = run_stage(pa.table(as_columns([rows[2]])), fast_config(), tmp_path / "alone")
    assert np.array_equal(pixels(tmp_path / "alone", alone, "strong"), pixels(tmp_path, table, "strong"))


def test_sdxl_without_negative_prompt_matches_a_plain_call(tmp_path: Path):
    cfg = fast_config(profile="tiny-sdxl", **{"generate.batch_size": 1})
    table = run_stage(pa.table(as_columns([{"id": "target", "prompt": "a lighthouse", "seed": 11}])), cfg, tmp_path)
    pipe = _load_plain(cfg)
    image = pipe("a lighthouse", width=32, height=32, guidance_scale=7.5, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(11)).images[0]
    assert np.array_equal(pixels(tmp_path, table), np.asarray(image))


def test_non_finite_pixels_fail_the_row_instead_of_shipping_garbage(tmp_path: Path):
    from diffusers import AutoencoderKL

    source = Path(resolve_model(generate.model_spec(fast_config()), fast_config()).path)
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))  # as an fp16 overflow would leave it
    vae.save_pretrained(folder / "vae")
    model = {"repo": str(folder), "kind": "sd15", "default_size": 64, "min_size": 16, "max_size": 512}
    table = run_stage(pa.table(as_columns([TARGET, {**TARGET, "id": "other"}])), fast_config(**{"generate.model": model}), tmp_path / "out")
    for row in table.to_pylist():
        assert row["status"] == "failed" and "NaN or infinite" in row["error"] and row["image_path"] is None
        assert "try dtype float32" not in row["error"]  # it ran in float32 already


def test_a_model_with_pickle_weights_is_refused_before_anything_is_written(tmp_path: Path):
    from typer.testing import CliRunner

    from catalogen.cli import app

    source = Path(resolve_model(generate.model_spec(fast_config()), fast_config()).path)
    folder = tmp_path / "pickled"
    shutil.copytree(source, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # as a pickle-only release ships it (never loaded here)
    catalog = tmp_path / "c.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "prompt": ["a red door"]}), catalog)
    out = tmp_path / "out"
    model = f"{{repo: {folder}, kind: sd15, default_size: 64, min_size: 16, max_size: 512}}"
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(out), "--set", f"generate.model={model}"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "(unet): only pickle weights (diffusion_pytorch_model.bin)" in text and "safetensors only" in text
    assert not out.exists()
