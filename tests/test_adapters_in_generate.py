"""The generate stage with LoRAs, textual-inversion embeddings and single-file checkpoints (tiny, offline).

Every add-on here is a tiny file in its real on-disk layout (catalogen/models/tiny/adapters.py), loaded
through diffusers' own loaders as a real one would be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import fast_config, plan_table, prompts, run_stage, write_catalog
from PIL import Image
from typer.testing import CliRunner

from catalogen.models.tiny import adapters as tiny_adapters
from catalogen.cli import app
from catalogen.storage.hashing import sha256_file
from catalogen.models.loading import ModelError
from catalogen.media.pngmeta import parse_parameters, read_png_text
from catalogen.models.tiny.profile import ensure_tiny
from tasks import generate

TARGET = {"id": "target", "prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "fog", "seed": 1234}
FIRST, SECOND = tiny_adapters.LORA_WEIGHTS
TOKEN = tiny_adapters.TI_TOKEN


def config(**overrides):
    """Small and fast: 2 steps, one image per pipeline call."""
    return fast_config(**{"generate.steps": 2, "generate.batch_size": 1, **overrides})


def lora(weight_name: str = FIRST, weight: float = 1.0, family: str = "sd15", **extra) -> dict:
    return {"path": f"tiny:lora-{family}", "weight_name": weight_name, "weight": weight, **extra}


def tiny_file(cfg, name: str, file: str) -> Path:
    return ensure_tiny(name, cfg.resolved_cache_dir()) / file


def table_of(rows: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({k: [row.get(k) for row in rows] for k in names})


def row_of(table: pa.Table, row_id: str = "target") -> dict:
    return table.filter(pa.compute.equal(table.column("id"), row_id)).to_pylist()[0]


def pixels(out: Path, table: pa.Table, row_id: str = "target") -> np.ndarray:
    row = row_of(table, row_id)
    assert row["status"] == "ok", row["error"]
    return np.asarray(Image.open(out / row["image_path"]), dtype=np.int16)


def generated(tmp_path: Path, name: str, cfg, rows: list[dict] = (TARGET,)) -> tuple[pa.Table, Path]:
    out = tmp_path / name
    return run_stage(table_of(list(rows)), cfg, out), out


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) > 2  # more than a rounding step apart


def planned_key(tmp_path: Path, name: str, cfg) -> str:
    return plan_table(table_of([TARGET]), cfg, tmp_path / name).planned["generate"].column("key")[0].as_py()


# --- LoRA -----------------------------------------------------------------------------------------


def test_loras_change_the_image_combine_and_weight_zero_is_no_lora(tmp_path: Path):
    runs = {
        "none": config(),
        "a": config(**{"generate.loras": [lora()]}),
        "a0": config(**{"generate.loras": [lora(weight=0.0)]}),
        "b": config(**{"generate.loras": [lora(SECOND)]}),
        "ab": config(**{"generate.loras": [lora(), lora(SECOND, 0.5)]}),
    }
    images, keys = {}, {}
    for name, cfg in runs.items():
        table, out = generated(tmp_path, name, cfg)
        images[name], keys[name] = pixels(out, table), row_of(table)["key"]
    assert images["none"].std() > 1  # a real image
    assert differ(images["a"], images["none"]) and differ(images["b"], images["none"])
    assert np.array_equal(images["a0"], images["none"])  # loaded at weight 0: exactly no LoRA
    assert differ(images["ab"], images["a"]) and differ(images["ab"], images["b"])
    assert len(set(keys.values())) == len(keys)  # weight 0 still records (and keys) the LoRA


def test_an_sdxl_lora_loads_into_both_text_encoders_and_changes_the_image(tmp_path: Path):
    plain, out_plain = generated(tmp_path, "plain", config(profile="tiny-sdxl"))
    cfg = config(profile="tiny-sdxl", **{"generate.loras": [lora(family="sdxl")]})
    styled, out_styled = generated(tmp_path, "styled", cfg)
    assert differ(pixels(out_styled, styled), pixels(out_plain, plain))
    from catalogen.models.diffusion import load_pipeline

    plan = plan_table(table_of([TARGET]), cfg, tmp_path / "again")
    extras = generate.resolve_extras(cfg, plan.models["generate"])
    pipe = load_pipeline(plan.models["generate"]["pipeline"], "cpu", torch.float32, adapters=extras.adapters)
    assert pipe.get_list_adapters() == {name: ["lora-sdxl"] for name in ("unet", "text_encoder", "text_encoder_2")}


def test_lora_provenance_in_results_and_png(tmp_path: Path):
    cfg = config(**{"generate.loras": [lora(weight=0.75), lora(SECOND, -0.5, name="second")]})
    table, out = generated(tmp_path, "out", cfg)
    row = row_of(table)
    files = [tiny_file(cfg, "lora-sd15", FIRST), tiny_file(cfg, "lora-sd15", SECOND)]
    expected = [
        {"name": "lora-sd15", "path": "tiny:lora-sd15", "weight_name": FIRST, "weight": 0.75,
         "sha256": sha256_file(files[0])},
        {"name": "second", "path": "tiny:lora-sd15", "weight_name": SECOND, "weight": -0.5,
         "sha256": sha256_file(files[1])},
    ]
    assert json.loads(row["loras"]) == expected
    assert row["embeddings"] is None and row["model_sha256"] is None and row["notes"] is None

    text = read_png_text(str(out / row["image_path"]))
    assert json.loads(text["catalogen"])["loras"] == expected
    parameters = parse_parameters(text["parameters"])
    assert parameters["prompt"] == f"{TARGET['prompt']} <lora:lora-sd15:0.75> <lora:second:-0.5>"
    # A1111's LoRA hash: sha256 of the tensor data after the safetensors header, 12 digits.
    short = []
    for file in files:
        data = file.read_bytes()
        header = int.from_bytes(data[:8], "little")
        short.append(hashlib.sha256(data[8 + header:]).hexdigest()[:12])
    assert parameters["Lora hashes"] == f"lora-sd15: {short[0]}, second: {short[1]}"


def test_the_key_follows_the_lora_weight_and_file_content(tmp_path: Path):
    folder = tmp_path / "my-lora"
    folder.mkdir()
    source = ensure_tiny("lora-sd15", config().resolved_cache_dir())
    shutil.copy(source / FIRST, folder / "detail.safetensors")
    with_file = config(**{"generate.loras": [{"path": str(folder / "detail.safetensors")}]})
    first = planned_key(tmp_path, "first", with_file)
    assert planned_key(tmp_path, "same", with_file) == first
    as_folder = config(**{"generate.loras": [{"path": str(folder), "name": "detail"}]})
    assert planned_key(tmp_path, "folder", as_folder) == first  # the same file, found through its folder
    heavier = config(**{"generate.loras": [{"path": str(folder / "detail.safetensors"), "weight": 0.9}]})
    assert planned_key(tmp_path, "weight", heavier) != first
    shutil.copy(source / SECOND, folder / "detail.safetensors")  # same name, other weights
    assert planned_key(tmp_path, "content", with_file) != first


def test_image_with_adapters_depends_on_its_row_only(tmp_path: Path):
    others = [{"id": f"n{i}", "prompt": f"neighbour {i} {TOKEN} " * (i + 1), "negative_prompt": f"blurry {i}",
               "seed": i} for i in range(6)]
    target = {**TARGET, "prompt": f"a {TOKEN} lighthouse on a cliff"}
    cfg = config(**{"generate.batch_size": 4, "generate.loras": [lora(weight=0.8), lora(SECOND, 0.5)],
                    "generate.embeddings": [{"path": "tiny:ti-sd15", "weight_name": tiny_adapters.TI_SD15_DIFFUSERS}]})
    alone, out_alone = generated(tmp_path, "alone", cfg, [target])
    in_four, out_four = generated(tmp_path, "four", cfg, [*others[:3], target])
    mixed, out_mixed = generated(tmp_path, "mixed", cfg, [others[4], target, others[5]])  # padded to 4
    assert set(in_four.column("batch_size").to_pylist()) == {4}  # really batched
    reference = pixels(out_alone, alone)
    assert np.array_equal(reference, pixels(out_four, in_four))
    assert np.array_equal(reference, pixels(out_mixed, mixed))
    assert len({row_of(t)["image_sha256"] for t in (alone, in_four, mixed)}) == 1


# --- textual inversion ----------------------------------------------------------------------------

EMBEDDINGS = {
    "sd15-diffusers": ("tiny", {"path": "tiny:ti-sd15", "weight_name": tiny_adapters.TI_SD15_DIFFUSERS}, TOKEN),
    "sd15-a1111": ("tiny", {"path": "tiny:ti-sd15", "weight_name": tiny_adapters.TI_SD15_A1111, "token": "<a1111>"},
                   "<a1111>"),
    "sdxl": ("tiny-sdxl", {"path": "tiny:ti-sdxl", "token": TOKEN}, TOKEN),
}


@pytest.mark.parametrize("case", list(EMBEDDINGS))
def test_an_embedding_changes_prompts_that_use_its_token(tmp_path: Path, case: str):
    profile, spec, token = EMBEDDINGS[case]
    rows = [{**TARGET, "prompt": f"a {token} lighthouse"}, {**TARGET, "id": "plain"},
            {**TARGET, "id": "weighted", "prompt": f"a ({token} lighthouse:1.3)"}]
    without, out_without = generated(tmp_path, "without", config(profile=profile), rows)
    cfg = config(profile=profile, **{"generate.embeddings": [spec]})
    with_it, out_with = generated(tmp_path, "with", cfg, rows)
    assert differ(pixels(out_with, with_it), pixels(out_without, without))
    assert differ(pixels(out_with, with_it, "weighted"), pixels(out_without, without, "weighted"))
    assert np.array_equal(pixels(out_with, with_it, "plain"), pixels(out_without, without, "plain"))

    # Without the embedding the token is just characters, and the row says so.
    assert f"prompt names embedding '{token}' which is not loaded" in row_of(without)["notes"]
    row = row_of(with_it)
    assert row["notes"] is None
    file = tiny_file(cfg, spec["path"].removeprefix("tiny:"), spec.get("weight_name", tiny_adapters.TI_SDXL))
    expected = [{"token": token, "path": spec["path"], "weight_name": spec.get("weight_name"),
                 "sha256": sha256_file(file)}]
    assert json.loads(row["embeddings"]) == expected
    text = read_png_text(str(out_with / row["image_path"]))
    assert json.loads(text["catalogen"])["embeddings"] == expected
    assert parse_parameters(text["parameters"])["TI hashes"] == f"{token}: {expected[0]['sha256'][:12]}"


def test_multi_vector_tokens_are_spelt_out_for_our_own_encoding(tmp_path: Path):
    # A1111 files hold 2 vectors: the pipeline reads "<a1111>" as "<a1111> <a1111>_1"; long and
    # weighted prompts, which catalogen encodes itself, must too.
    cfg = config(**{"generate.embeddings": [EMBEDDINGS["sd15-a1111"][1]]})
    plan = plan_table(table_of([TARGET]), cfg, tmp_path / "out")
    extras = generate.resolve_extras(cfg, plan.models["generate"])
    from catalogen.models.diffusion import load_pipeline

    pipe = load_pipeline(plan.models["generate"]["pipeline"], "cpu", torch.float32, adapters=extras.adapters)
    job = generate._job(0, {"prompt": "a (<a1111>:1.2) door", "negative_prompt": "<a1111>"}, pipe, extras)
    assert job.texts == ("a (<a1111> <a1111>_1:1.2) door", "<a1111> <a1111>_1")
    assert job.chunks == 1


def test_a1111_and_sdxl_files_need_a_token(tmp_path: Path):
    cfg = config(**{"generate.embeddings": [{"path": "tiny:ti-sd15", "weight_name": tiny_adapters.TI_SD15_A1111}]})
    with pytest.raises(ModelError, match="A1111 embedding .*set token"):
        plan_table(table_of([TARGET]), cfg, tmp_path / "a1111")
    cfg = config(profile="tiny-sdxl", **{"generate.embeddings": [{"path": "tiny:ti-sd15",
                                                                   "weight_name": tiny_adapters.TI_SD15_DIFFUSERS}]})
    assert any("made for sd15" in p for p in generate.config_faults(cfg))


def test_a_prompt_naming_an_unloaded_embedding_gets_a_note_and_one_warning(tmp_path: Path, caplog):
    rows = [
        {**TARGET, "prompt": f"a {TOKEN} lighthouse", "negative_prompt": "EasyNegative, (bad-hands-5:1.2)"},
        {**TARGET, "id": "second", "prompt": "a boat, <something>", "negative_prompt": "easynegative"},
        {**TARGET, "id": "clean", "negative_prompt": "bad-hands-50, uneasynegative"},  # not whole words
    ]
    cfg = config(**{"generate.embeddings": [EMBEDDINGS["sd15-diffusers"][1]]})
    with caplog.at_level(logging.WARNING, logger="catalogen.generate"):
        table, _ = generated(tmp_path, "out", cfg, rows)
    assert table.column("status").to_pylist() == ["ok", "ok", "ok"]
    notes = table.column("notes").to_pylist()
    assert notes[0] == ("negative prompt names embedding 'EasyNegative' which is not loaded; "
                        "negative prompt names embedding 'bad-hands-5' which is not loaded")
    assert notes[1] == ("prompt names embedding '<something>' which is not loaded; "
                        "negative prompt names embedding 'easynegative' which is not loaded")
    assert notes[2] is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "catalogen.generate"]
    assert len(warnings) == 4, warnings  # once per name in this shard: EasyNegative, bad-hands-5, <something>, easynegative
    assert not any(TOKEN in w for w in warnings)


# --- single-file checkpoints ----------------------------------------------------------------------


def test_a_single_file_checkpoint_makes_the_same_image_as_its_folder(tmp_path: Path):
    cfg = config()
    path = tiny_file(cfg, "single-file", tiny_adapters.SINGLE_FILE)
    model = {"repo": str(path), "kind": "sd15", "default_size": 64, "min_size": 16, "max_size": 512}
    single = config(**{"generate.model": model})
    assert generate.single_file_config(single) == "tiny:sd15"
    folder_table, folder_out = generated(tmp_path, "folder", cfg)
    file_table, file_out = generated(tmp_path, "file", single)
    assert np.array_equal(pixels(file_out, file_table), pixels(folder_out, folder_table))
    row = row_of(file_table)
    digest = sha256_file(path)
    assert row["model_sha256"] == digest and row["key"] != row_of(folder_table)["key"]
    text = read_png_text(str(file_out / row["image_path"]))
    assert json.loads(text["catalogen"])["model_sha256"] == digest
    assert parse_parameters(text["parameters"])["Model hash"] == digest[:10]  # as A1111 hashes a checkpoint


# --- pickles are refused before anything runs -----------------------------------------------------


def _pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2)}, path)  # a real pickle; never loaded
    return path


@pytest.mark.parametrize("what", ["lora", "embedding", "model", "lora-folder"])
def test_pickles_are_refused_by_the_cli_with_nothing_written(tmp_path: Path, what: str):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(2))
    ckpt = _pickle(tmp_path / "weights" / "thing.ckpt")
    setting = {
        "lora": f"generate.loras=[{{path: {ckpt}, weight: 0.5}}]",
        "embedding": f"generate.embeddings=[{{path: {ckpt}, token: thing}}]",
        "model": f"generate.model={{repo: {ckpt}, kind: sd15}}",
        "lora-folder": f"generate.loras=[{{path: {_pickle(tmp_path / 'folder' / 'lora.bin').parent}}}]",
    }[what]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(out), "--set", setting])
    assert result.exit_code == 1, result.output
    assert not out.exists()
    message = " ".join(result.output.split())
    assert "pickle" in message and "can run any code" in message and ".safetensors files only" in message
    assert "safetensors.torch.save_file" in message  # how to convert


# --- through the real flow ------------------------------------------------------------------------


def test_flow_records_adapters_in_results_and_run_json(tmp_path: Path):
    from flows.run import catalogen_run, run_summary

    catalog = write_catalog(tmp_path / "catalog.parquet", {**prompts(3), "negative_prompt": ["easynegative", "", ""]})
    out = tmp_path / "out"
    overrides = {"generate.steps": 2, "generate.width": 32, "generate.height": 32, "generate.loras": [lora(weight=0.5)],
                 "generate.embeddings": [EMBEDDINGS["sd15-diffusers"][1]]}
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
    summary = run_summary(state)
    assert summary["ok"] == 3, summary
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert [json.loads(r["generate_loras"])[0]["weight"] for r in results] == [0.5] * 3
    assert [json.loads(r["generate_embeddings"])[0]["token"] for r in results] == [TOKEN] * 3
    assert results[0]["generate_notes"] == "negative prompt names embedding 'easynegative' which is not loaded"
    roles = json.loads((out / "run.json").read_text())["models"]["generate"]
    assert set(roles) == {"pipeline", "lora.lora-sd15", "embedding.0"}


def test_from_a_hub_repo_only_the_named_adapter_files_are_fetched():
    cfg = config(**{"generate.loras": [{"path": "someone/loras", "weight_name": "style_v2.safetensors"},
                                       {"path": "someone/one-lora"}],
                    "generate.embeddings": [{"path": "someone/embeddings", "weight_name": "neg.safetensors",
                                             "token": "<neg>"}]})
    specs = generate.models(cfg)
    assert specs["lora.style_v2"].files == ["style_v2.safetensors"]
    assert specs["lora.one-lora"].files is None  # no name: the repo's safetensors (models.HUB_FILES)
    assert specs["embedding.0"].files == ["neg.safetensors"]
