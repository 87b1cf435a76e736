"""`catalogen export`: each format read back by its real reader, splits, filters, the output folder.

One module-scoped run (9 rows, one of them failed) is exported many ways; a second invocation on
the same folder adds rows to the catalog, for the split's stability.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import held_in_another_process, write_catalog
from PIL import Image

from catalogen.config import load_config
from catalogen.publish.export import (
    LOCK,
    ExportError,
    ExportOptions,
    export_run,
    parse_split,
    text_column,
)
from catalogen.storage.hashing import sha256_file
from catalogen.run.plan import prepare
from flows.run import catalogen_run, run_summary

OVERRIDES = {"generate.steps": 2, "generate.width": 32, "generate.height": 32}
SPLIT = "train=0.3,val=0.7"


def catalog_rows(n: int) -> dict[str, list]:
    """Ids row-0.. with row-1 in two variants; row-7 alone sets guidance_scale (null elsewhere)."""
    return {
        "id": [f"row-{i}" for i in range(n)],
        "prompt": [f"a photo of object number {i}" for i in range(n)],
        "num_variants": [2 if i == 1 else 1 for i in range(n)],
        "guidance_scale": [4.0 if i == 7 else None for i in range(n)],
        "quality": [i / 10 for i in range(n)],
        "category": ["odd" if i % 2 else "even" for i in range(n)],
        "text": [f"catalog text {i}" for i in range(n)],  # shadows the export's `text`: renamed results_text
    }


def run_flow(catalog: Path, out: Path) -> dict:
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=OVERRIDES, return_state=True)
    return run_summary(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("export")
    catalog = write_catalog(base / "catalog.parquet", catalog_rows(8))
    out = base / "run"
    # Make row-5's image impossible to write: a folder already sits at its path.
    plan = prepare(catalog, load_config(None, OVERRIDES), out)
    row = next(r for r in plan.planned["generate"].to_pylist() if r["id"] == "row-5")
    (out / plan.store.image_path("generate", row["id"], row["variant"], row["key"])).mkdir(parents=True)
    summary = run_flow(catalog, out)
    assert (summary["rows"], summary["ok"], summary["failed"]) == (9, 8, 1)
    before = base / "before"
    shutil.copytree(out, before)
    # The same catalog file, rewritten with three more rows, into the same run folder.
    write_catalog(catalog, catalog_rows(11))
    assert run_flow(catalog, out)["rows"] == 12
    return SimpleNamespace(before=before, after=out, cache=base / "hf-cache")


def ok_rows(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results.parquet")
    return df[df.status == "ok"].set_index(["id", "variant"])


def expected_split(row_id: str) -> str:
    """The documented rule, computed here on its own: SHA-256 of the id, first 8 bytes, as [0, 1)."""
    number = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") / 2**64
    return "train" if number < 0.3 else "val"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def export(run_dir: Path, out: Path, fmt: str, **options) -> dict:
    options = {"split": SPLIT, "shard_size": 2, **options}
    return export_run(run_dir, out, ExportOptions(format=fmt, **options))


def test_the_rows_cover_both_splits_and_a_failure(runs):
    rows = ok_rows(runs.before)
    assert len(rows) == 8 and ("row-5", 0) not in rows.index
    assert {expected_split(i) for i, _ in rows.index} == {"train", "val"}


def test_hf_shards_load_with_datasets(runs, tmp_path):
    import datasets

    out = tmp_path / "hf"
    manifest = export(runs.before, out, "hf")
    expected = ok_rows(runs.before)
    files = {split: sorted(glob.glob(str(out / "data" / f"{split}-*.parquet"))) for split in ("train", "val")}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(runs.cache))
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    seen = set()
    for split in ("train", "val"):
        raw = loaded[split].cast_column("image", datasets.Image(decode=False))
        for row, undecoded in zip(loaded[split], raw):
            source = expected.loc[(row["id"], row["variant"])]
            assert expected_split(row["id"]) == split
            assert pixels(row["image"]).tolist() == pixels(Image.open(runs.before / source.image_path)).tolist()
            assert undecoded["image"]["bytes"] == (runs.before / source.image_path).read_bytes()
            assert row["text"] == source.generate_prompt
            assert (row["generate_seed"], row["results_text"], row["quality"]) == (source.generate_seed, source.text, source.quality)
            assert "." not in row["key"]
            seen.add((row["id"], row["variant"]))
    assert seen == set(expected.index)
    columns = loaded["train"].column_names
    assert not {"image_path", "generate_image_path"} & set(columns)
    assert {"key", "text", "id", "variant", "generate_model", "generate_model_revision", "generate_key"} <= set(columns)
    # The Hub's sharded file names: the folder alone loads, splits found.
    whole = datasets.load_dataset(str(out), cache_dir=str(runs.cache))
    assert {s: whole[s].num_rows for s in whole} == {s: manifest["splits"][s]["rows"] for s in ("train", "val")}


def test_webdataset_shards_read_with_webdataset(runs, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    export(runs.before, out, "webdataset")
    expected = ok_rows(runs.before)
    seen = set()
    for split in ("train", "val"):
        urls = sorted(glob.glob(str(out / split / "*.tar")))
        decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
        raw = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["__key__"] for s in decoded] == [s["__key__"] for s in raw]
        for sample, undecoded in zip(decoded, raw):
            meta = sample["json"]
            source = expected.loc[(meta["id"], meta["variant"])]
            assert expected_split(meta["id"]) == split
            assert undecoded["png"] == (runs.before / source.image_path).read_bytes()
            assert pixels(sample["png"]).tolist() == pixels(Image.open(runs.before / source.image_path)).tolist()
            assert sample["txt"] == source.generate_prompt == meta["text"]
            assert (meta["generate_seed"], meta["guidance_scale"]) == (source.generate_seed, None if pd.isna(source.guidance_scale) else 4.0)
            assert sample["__key__"] == meta["key"] and "." not in meta["key"]
            seen.add((meta["id"], meta["variant"]))
        # Each tar's metadata Parquet lists the same samples, in order.
        for url in urls:
            tar_keys = [s["__key__"] for s in wds.WebDataset([url], shardshuffle=False)]
            assert pq.read_table(url.replace(".tar", ".parquet")).column("key").to_pylist() == tar_keys
    assert seen == set(expected.index)


def test_imagefolder_loads_with_datasets(runs, tmp_path):
    import datasets

    out = tmp_path / "folder"
    export(runs.before, out, "imagefolder")
    expected = ok_rows(runs.before)
    # Plain files, as LoRA trainers read them: <key>.png beside <key>.txt.
    images = sorted(out.glob("*/*/*.png"))
    assert len(images) == len(expected)
    for image in images:
        meta = next(json.loads(line) for line in (image.parent / "metadata.jsonl").read_text().splitlines()
                    if json.loads(line)["file_name"] == image.name)
        source = expected.loc[(meta["id"], meta["variant"])]
        assert image.read_bytes() == (runs.before / source.image_path).read_bytes()
        assert image.with_suffix(".txt").read_text() == source.generate_prompt
        assert image.parts[-3] == expected_split(meta["id"])
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(runs.cache))
    assert set(loaded) == {"train", "validation"}  # `datasets` reads a folder named val as "validation"
    seen = set()
    for split in ("train", "validation"):
        for row in loaded[split]:
            source = expected.loc[(row["id"], row["variant"])]
            assert pixels(row["image"]).tolist() == pixels(Image.open(runs.before / source.image_path)).tolist()
            assert (row["text"], row["generate_seed"]) == (source.generate_prompt, source.generate_seed)
            seen.add((row["id"], row["variant"]))
    assert seen == set(expected.index)
    # guidance_scale is null in most rows: it stays out of metadata.jsonl (a shard of nulls only would
    # read as another type, which `datasets` refuses) and is kept in each shard's Parquet.
    assert "guidance_scale" not in loaded["train"].column_names
    shard_values = pq.read_table(sorted(out.glob("*/*.parquet"))).column("guidance_scale").to_pylist()
    assert sorted(shard_values, key=str) == [4.0] + [None] * 7


def test_manifest_lists_every_file_and_is_written_last(runs, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    manifest = export(runs.before, out, "webdataset")
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 8 and manifest["excluded"] == {"not_ok": 1, "no_image": 0, "no_text": 0, "degenerate_text": 0}
    assert manifest["text_column"] == "generate_prompt" and manifest["image_column"] == "image_path"
    by_split = {"train": 0, "val": 0}
    for shard in manifest["shards"]:
        tar, meta = shard["files"]
        assert (tar["path"], meta["path"]) == (f"{shard['split']}/{shard['index']:05d}.tar", f"{shard['split']}/{shard['index']:05d}.parquet")
        for entry in shard["files"]:
            assert sha256_file(out / entry["path"]) == entry["sha256"] and entry["rows"] == shard["rows"]
        assert len(list(wds.WebDataset([str(out / tar["path"])], shardshuffle=False))) == shard["rows"]
        by_split[shard["split"]] += shard["rows"]
    assert {s: manifest["splits"][s]["rows"] for s in by_split} == by_split
    assert sum(by_split.values()) == 8
    assert not (out / "export.pending.json").exists() and not (out / ".tmp").exists()


def exported(out: Path) -> pd.DataFrame:
    """The rows of every shard's metadata Parquet."""
    return pq.read_table(sorted(out.glob("*/*.parquet"))).to_pandas()


def keys_by_split(out: Path) -> dict[str, str]:
    found = {}
    for path in out.glob("*/*.parquet"):
        for key in pq.read_table(path).column("key").to_pylist():
            found[key] = path.parent.name
    return found


def test_the_split_is_stable_across_exports_and_added_rows(runs, tmp_path):
    first = export(runs.before, tmp_path / "a", "webdataset")
    second = export(runs.before, tmp_path / "b", "webdataset")
    assert [f["sha256"] for s in first["shards"] for f in s["files"]] == [f["sha256"] for s in second["shards"] for f in s["files"]]
    grown = export(runs.after, tmp_path / "c", "webdataset")
    assert grown["rows"] == 11  # three new ids; row-5 still failed
    before, after = keys_by_split(tmp_path / "a"), keys_by_split(tmp_path / "c")
    assert len(before) == 8 and len(after) == 11
    for key, split in before.items():
        assert after[key] == split
    meta = exported(tmp_path / "c")
    for row in meta.itertuples():
        assert after[row.key] == expected_split(row.id)
    assert meta[meta.id == "row-1"].variant.tolist() in ([0, 1], [1, 0])  # both variants, one split


def test_filters_keep_the_rows_they_name(runs, tmp_path):
    manifest = export(runs.before, tmp_path / "f", "webdataset", where=("quality>=0.3", "category==odd"))
    assert set(exported(tmp_path / "f").id) == {"row-3", "row-7"}  # row-5 is odd and >= 0.3 but failed
    assert manifest["excluded"] == {"not_ok": 1, "where quality>=0.3": 4, "where category==odd": 2, "no_image": 0, "no_text": 0,
                                   "degenerate_text": 0}
    manifest = export(runs.before, tmp_path / "g", "dummy", where=("generate_guidance_scale!=7.5", "prompt != 'x'"))
    assert manifest["rows"] == 1  # row-7 sets 4.0
    with pytest.raises(ExportError, match=r"--where 'caption_clip_score>=25': .*results.parquet has no column 'caption_clip_score'"):
        export(runs.before, tmp_path / "h", "dummy", where=("caption_clip_score>=25",))
    with pytest.raises(ExportError, match=r"column quality holds numbers \(double\); 'high' is not one"):
        export(runs.before, tmp_path / "h", "dummy", where=("quality>=high",))
    with pytest.raises(ExportError, match="is not COLUMN<op>VALUE"):
        export(runs.before, tmp_path / "h", "dummy", where=("quality=>1",))
    assert not (tmp_path / "h").exists()  # refused before anything was written


def test_text_and_image_stage_options(runs, tmp_path):
    import webdataset as wds

    export(runs.before, tmp_path / "t", "webdataset", text="text", image_stage="generate")
    expected = ok_rows(runs.before)
    samples = list(wds.WebDataset(sorted(glob.glob(str(tmp_path / "t" / "*" / "*.tar"))), shardshuffle=False))
    assert len(samples) == 8
    for sample in samples:
        meta = json.loads(sample["json"])
        source = expected.loc[(meta["id"], meta["variant"])]
        assert sample["txt"].decode() == source.text
        assert sample["png"] == (runs.before / source.generate_image_path).read_bytes()
    with pytest.raises(ExportError, match=r"--image-stage upscale: no stage 'upscale' made images in .*before \(stages with images: generate\)"):
        export(runs.before, tmp_path / "x", "hf", image_stage="upscale")
    with pytest.raises(ExportError, match="--text caption_caption: .*has no such column"):
        export(runs.before, tmp_path / "x", "hf", text="caption_caption")
    with pytest.raises(ExportError, match="--text generate_seed: the column holds int64, not text"):
        export(runs.before, tmp_path / "x", "hf", text="generate_seed")


def test_the_default_text_is_the_caption_then_the_enhanced_prompt():
    table = pa.table({"prompt": ["p"], "generate_prompt": ["g"]})
    assert text_column(table, None, Path("run")) == "generate_prompt"
    assert text_column(table.append_column("enhance_prompt", pa.array(["e"])), None, Path("run")) == "enhance_prompt"
    assert text_column(table.append_column("caption_caption", pa.array(["c"])), None, Path("run")) == "caption_caption"
    with pytest.raises(ExportError, match="has none of caption_caption, enhance_prompt, generate_prompt, prompt"):
        text_column(pa.table({"id": ["a"]}), None, Path("run"))


def test_split_option_errors():
    assert parse_split("train=0.9, val=0.1") == {"train": 0.9, "val": 0.1}
    for spec, message in [("train=0.9,val=0.2", "add up to 1.1"), ("train=0.5,train=0.5", "named twice"),
                          ("train", "is not NAME=FRACTION"), ("tr-ain=1", "is not NAME=FRACTION"),
                          ("train=x", "is not a number"), ("train=1.5,val=-0.5", "must be in")]:
        with pytest.raises(ExportError, match=message):
            parse_split(spec)


def test_a_non_empty_folder_is_refused_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"notes.txt|no catalogen export wrote"):
            export(runs.before, out, "hf", overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()

    export(runs.before, out, "webdataset")
    with pytest.raises(ExportError, match=r"is not empty: it holds a finished webdataset export \(manifest.json\).*--overwrite"):
        export(runs.before, out, "imagefolder")
    manifest = export(runs.before, out, "imagefolder", overwrite=True)
    assert not list(out.rglob("*.tar")) and manifest["format"] == "imagefolder"
    assert len(list(out.rglob("*.png"))) == 8

    debris = tmp_path / "killed-before-it-began"
    (debris / ".tmp").mkdir(parents=True)
    (debris / ".tmp" / ".manifest.json.x.tmp").write_text("{")
    assert export(runs.before, debris, "hf")["rows"] == 8 and not (debris / ".tmp").exists()

    (out / "train" / "stray.png").write_bytes(b"not from an export")
    with pytest.raises(ExportError, match=r"holds 1 file\(s\) that no earlier export wrote \(train/stray.png\)"):
        export(runs.before, out, "hf", overwrite=True)
    assert (out / "manifest.json").exists()  # nothing was removed


class Interrupted(Exception):
    pass


def test_an_interrupted_export_resumes(runs, tmp_path):
    out = tmp_path / "out"

    def stop_after_five(done: int, total: int) -> None:
        if done == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        export_run(runs.before, out, ExportOptions(format="hf", split=SPLIT, shard_size=2), stop_after_five)
    assert (out / "export.pending.json").exists() and not (out / "manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    assert len(finished) == 2  # four rows in two shards; the fifth row's shard never landed

    with pytest.raises(ExportError, match="interrupted export of other rows or options"):
        export(runs.before, out, "hf", shard_size=3)
    manifest = export(runs.before, out, "hf")  # the same export: resumed
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime
    assert manifest["rows"] == 8 and len(list((out / "data").glob("*.parquet"))) == len(manifest["shards"])
    assert not (out / "export.pending.json").exists()


def test_a_changed_image_is_an_error(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs.before, run_dir)
    changed = run_dir / ok_rows(run_dir).image_path.iloc[0]
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    changed.write_bytes(buffer.getvalue())
    with pytest.raises(ExportError, match=rf"{changed.name} changed since the run recorded it.*catalogen verify"):
        export(run_dir, tmp_path / "out", "webdataset")
    with pytest.raises(ExportError, match="has no results.parquet"):
        export(tmp_path, tmp_path / "out2", "webdataset")


def test_hf_without_datasets_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ExportError, match=r"--format hf needs the `datasets` package: pip install 'catalogen\[export\]'"):
        export(runs.before, tmp_path / "out", "hf")


def test_cli_export(runs, tmp_path):
    from typer.testing import CliRunner

    from catalogen.cli import app

    out = tmp_path / "cli"
    args = ["export", str(runs.before), "--format", "imagefolder", "--out", str(out), "--split", SPLIT,
            "--where", "quality>=0.2", "--shard-size", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 5  # row-2 .. row-7 less the failed row-5
    assert f"5 rows exported (train {manifest['splits']['train']['rows']} rows" in result.output
    assert "1 not_ok" in result.output and "3 where quality>=0.2" in result.output
    assert result.output.splitlines()[-1] == f"manifest: {out.resolve() / 'manifest.json'}"
    # A finished export leaves what it wrote and nothing else: no lock file.
    owned = manifest["owned"]["files"] + manifest["owned"]["folders"]
    strangers = [p.relative_to(out) for p in out.rglob("*")
                 if p.is_file() and not any(p.is_relative_to(out / o) for o in owned)]
    assert strangers == [Path("manifest.json")]

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "is not empty" in again.output
    bad = CliRunner().invoke(app, [*args, "--overwrite", "--where", "clip>=3"])
    assert bad.exit_code == 1 and "has no column 'clip'" in bad.output
    assert CliRunner().invoke(app, ["export", str(runs.before), "--format", "tfrecord", "--out", str(tmp_path / "z")]).exit_code == 2


def test_a_second_export_into_a_folder_in_use_is_refused(runs, tmp_path):
    from typer.testing import CliRunner

    from catalogen.cli import app

    out = tmp_path / "out"
    imports = "from pathlib import Path; from catalogen.publish.export import LOCK; from catalogen.storage.store import hold_folder"
    with held_in_another_process(imports, f"hold_folder(Path({str(out)!r}) / LOCK, 'export')"):  # another export
        result = CliRunner().invoke(app, ["export", str(runs.before), "--format", "hf", "--out", str(out)])
        assert result.exit_code == 1 and re.search(r"in use by another export \(pid \d+", result.output), result.output
        assert [p.name for p in out.iterdir()] == [".export.lock"]  # nothing written
    assert export(runs.before, out, "hf")["rows"] == 8  # free again; the lock file is no stranger's file
    assert not (out / LOCK).exists()
    assert export(runs.before, out, "webdataset", overwrite=True)["rows"] == 8
    assert not (out / LOCK).exists()


def test_a_lock_file_its_holder_removes_as_it_finishes_is_never_held(tmp_path, monkeypatch):
    """A finished export removes its lock file: a second one that opened the file just before must
    not hold the removed file (a third would then take a new one at the same time)."""
    from catalogen.storage import store

    lock = tmp_path / "out" / LOCK
    real_open = store.os.open
    opened = []

    def open_as_the_holder_finishes(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened and Path(path) == lock:
            Path(path).unlink()  # the holder removes it right after we opened it
        opened.append(path)
        return fd

    monkeypatch.setattr(store.os, "open", open_as_the_holder_finishes)
    with store.hold_folder(lock, "export"):
        monkeypatch.undo()
        assert lock.exists() and store.lock_holder(lock).startswith("pid ")  # held, the file at the path
    assert opened == [lock, lock]


def test_exports_are_not_committed():
    import subprocess

    from conftest import REPO

    assert subprocess.run(["git", "check-ignore", "-q", "exports/demo/manifest.json"], cwd=REPO).returncode == 0
