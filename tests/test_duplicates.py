"""Near-duplicates: pHash per final image, `near_duplicate_of`, `export --dedupe`, the report's groups.

`group` is checked against the definition computed pair by pair (`group_brute_force`) on random
hashes with near-duplicates planted at exactly the distance and one bit beyond, through both of its
paths (all pairs for few distinct hashes, multi-index tables for more). One module-scoped run on the
tiny profile repeats prompts and seeds, which gives the same pixels under other ids.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_catalog
from PIL import Image
from typer.testing import CliRunner

from catalogen.media import duplicates
from catalogen.cli import app
from catalogen.config import ConfigError, load_config
from catalogen.media.duplicates import (
    BRUTE_FORCE_ROWS,
    DuplicatesError,
    add_duplicate_columns,
    first_of_each,
    group,
    group_brute_force,
    phash,
    previous_hashes,
)
from catalogen.publish.export import ExportError, ExportOptions, export_run
from catalogen.storage.store import RunStore
from flows.run import catalogen_run, run_summary

OVERRIDES = {"generate.steps": 2, "generate.width": 32, "generate.height": 32}


# --- grouping -----------------------------------------------------------------------------------------


def flip(value: int, bits) -> int:
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def planted(n: int, distance: int, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """n random hashes; rows copied from an earlier row with exactly `distance` bits flipped (must be
    found) and with `distance + 1` (must not, unless chance puts another row within reach)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    pairs = rng.permutation(n)[: 2 * (n // 20 + 5)].reshape(-1, 2)  # each row in one pair at most
    pairs.sort(axis=1)
    at, beyond = [], []
    for kind, (source, target) in enumerate(pairs[:-5]):
        bits = distance if kind % 2 == 0 else distance + 1
        values[target] = flip(int(values[source]), rng.choice(64, bits, replace=False))
        (at if bits == distance else beyond).append(int(target))
    for source, target in pairs[-5:]:  # a few exact copies
        values[target] = values[source]
    return values, at, beyond


@pytest.mark.parametrize("distance", [0, 1, 2, 3, 6, 8, 10])
@pytest.mark.parametrize("rows", [300, 6000])
def test_group_matches_the_definition(rows, distance):
    values, at, beyond = planted(rows, distance, seed=rows + distance)
    stats: dict[str, int] = {}
    found = group(values, distance, stats)
    expected = group_brute_force(values, distance)
    assert found.dtype == np.int64 and found.tolist() == expected.tolist()
    assert all(found[t] >= 0 for t in at)  # planted at exactly the distance: found
    assert any(expected[t] == -1 for t in beyond) or not beyond  # one bit beyond: (mostly) not
    for i in np.flatnonzero(found >= 0):
        assert found[i] < i and int(values[i] ^ values[found[i]]).bit_count() <= distance
    if distance and rows > BRUTE_FORCE_ROWS:
        assert stats["chunks"] >= 3 and stats["comparisons"] < rows * rows / 20  # the tables, not all pairs


@pytest.mark.parametrize("chunks", [3, 4, 5, 7, 11])
@pytest.mark.parametrize("distance", [1, 4, 6, 10])
def test_every_chunking_gives_the_same_answer(chunks, distance):
    values, at, _ = planted(1500, distance, seed=chunks * 100 + distance)
    values[700:800] = values[600]  # copies, and distinct hashes near them: crowded buckets in every chunk
    values[800:900] = [flip(int(values[600]), {i % 64, (7 * i + 3) % 64}) for i in range(100)]
    stats: dict[str, int] = {}
    assert group(values, distance, stats, chunks=chunks).tolist() == group_brute_force(values, distance).tolist()
    assert stats["chunks"] == chunks


def test_earliest_is_per_row_and_not_transitive():
    a = 0
    b = flip(a, np.arange(4))  # 4 bits from a
    c = flip(b, np.arange(4, 8))  # 4 from b, 8 from a
    d = flip(a, np.arange(60, 64))  # 4 from a, so a is its earliest even though b came first too
    values = np.array([a, b, c, d, b], dtype=np.uint64)
    assert group(values, 4).tolist() == [-1, 0, 1, 0, 0]
    assert duplicates.roots(group(values, 4)).tolist() == [0, 0, 0, 0, 0]
    assert group(values, 0).tolist() == [-1, -1, -1, -1, 1]
    assert group(np.array([], dtype=np.uint64), 6).tolist() == []


def test_all_identical_hashes_cost_no_comparison():
    values = np.full(100_000, 0x0123_4567_89AB_CDEF, dtype=np.uint64)
    stats: dict[str, int] = {}
    found = group(values, 6, stats)
    assert found[0] == -1 and (found[1:] == 0).all()
    assert stats["distinct"] == 1 and stats["comparisons"] == 0 and stats["lookups"] == 0


def test_many_distinct_hashes_are_not_compared_pairwise():
    values, _, _ = planted(100_000, 6, seed=1)
    stats: dict[str, int] = {}
    group(values, 6, stats)
    pairs = 100_000 * 99_999 // 2
    assert stats["comparisons"] < pairs / 100 and stats["lookups"] < pairs / 100


def near_identical(rows: int, kind: str, seed: int = 3) -> np.ndarray:
    """Distinct hashes crowded together: 3 bits flipped anywhere in one hash (41,664 possible), or
    one hash with random low 20 bits (they agree on every other chunk)."""
    rng = np.random.default_rng(seed)
    base = 0x0123_4567_89AB_CDEF
    if kind == "flips":
        return np.array([flip(base, rng.choice(64, 3, replace=False)) for _ in range(rows)], dtype=np.uint64)
    return np.uint64(base & ~((1 << 20) - 1)) | rng.choice(1 << 20, rows, replace=False).astype(np.uint64)


@pytest.mark.parametrize("kind", ["flips", "low-bits"])
def test_crowded_distinct_hashes_are_not_compared_pairwise(kind):
    values = near_identical(100_000, kind)
    stats: dict[str, int] = {}
    found = group(values, 6, stats)
    assert stats["distinct"] > 30_000 and stats["chunks"] >= 3
    assert stats["comparisons"] < 200 * len(values)  # pairwise would be 5e9
    assert found.tolist()[:6000] == group_brute_force(values[:6000], 6).tolist()  # the earliest is earlier still
    assert group(values[:6000], 6).tolist() == group_brute_force(values[:6000], 6).tolist()


@pytest.mark.parametrize("bad", [64, 11, -5, -1, 2.5, "six", True])
def test_a_distance_out_of_range_is_refused_naming_the_setting(bad):
    with pytest.raises(DuplicatesError, match="max_distance"):
        group(np.zeros(3, dtype=np.uint64), bad)
    with pytest.raises(ConfigError, match=r"duplicates\.max_distance: .*(out of range|not a whole number)"):
        load_config(None, {"duplicates.max_distance": bad})


def test_off_is_null_or_off():
    assert load_config(None, {}).duplicates.max_distance == 6
    assert load_config(None, {"duplicates.max_distance": False}).duplicates.max_distance is None  # YAML `off`
    assert load_config(None, {"duplicates.max_distance": "off"}).duplicates.max_distance is None
    assert load_config(None, {"duplicates.max_distance": 0}).duplicates.max_distance == 0


def test_the_cli_refuses_a_bad_distance_before_writing(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", {"id": ["a"], "prompt": ["x"]})
    result = CliRunner().invoke(app, ["validate", str(catalog), "--set", "duplicates.max_distance=64"])
    assert result.exit_code == 1 and "duplicates.max_distance" in result.output and "64" in result.output
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(out), "--set", "duplicates.max_distance=-5"])
    assert result.exit_code == 1 and "duplicates.max_distance" in result.output
    assert not out.exists()


# --- the hash -----------------------------------------------------------------------------------------


def test_phash_is_imagehash_as_an_integer():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    assert duplicates.to_hex(phash(image)) == str(imagehash.phash(image))
    other = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    assert (phash(image) ^ phash(other)).bit_count() == imagehash.phash(image) - imagehash.phash(other)


def test_a_cut_out_is_hashed_as_it_looks_on_white():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    pixels[..., 3] = 0
    pixels[16:48, 16:48, 3] = 255
    hidden = pixels.copy()
    hidden[:16, :, :3] = 0  # different pixels where nothing shows
    assert phash(Image.fromarray(pixels, "RGBA")) == phash(Image.fromarray(hidden, "RGBA"))
    shown = Image.fromarray(pixels, "RGBA")
    flat = Image.new("RGBA", shown.size, "white")
    flat.alpha_composite(shown)
    assert phash(Image.fromarray(pixels, "RGBA")) == phash(flat.convert("RGB"))


# --- a run ----------------------------------------------------------------------------------------------

PROMPTS = {"a": ("a red cube", 1), "b": ("a blue sphere", 2), "c": ("a green cone", 3), "d": ("a yellow torus", 4),
           "e": ("a white cup", 5)}
IDS = ["a", "b", "c", "d", "b-again", "e", "d-again", "d-third"]  # the same prompt and seed: the same pixels


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("duplicates")
    source = [PROMPTS[i.split("-")[0]] for i in IDS]
    catalog = write_catalog(base / "catalog.parquet", {"id": IDS, "prompt": [p for p, _ in source],
                                                         "seed": [s for _, s in source]})
    out = base / "run"
    summary = run_summary(catalogen_run(catalog=str(catalog), out=str(out), overrides=OVERRIDES, return_state=True))
    return SimpleNamespace(out=out, summary=summary, base=base)


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id")


def test_repeated_rows_name_the_earliest(run):
    assert run.summary["ok"] == len(IDS) and run.summary["near_duplicates"] == 3
    table = results(run.out)
    assert table.phash.str.fullmatch(r"[0-9a-f]{16}").all()
    named = {i: (r.near_duplicate_of, r.near_duplicate_of_variant, r.near_duplicate_distance)
             for i, r in table.iterrows() if isinstance(r.near_duplicate_of, str)}
    assert named == {"b-again": ("b", 0, 0), "d-again": ("d", 0, 0), "d-third": ("d", 0, 0)}
    # The same pixels in other files: provenance differs, so sha256 cannot tell, pHash can.
    assert table.loc["d", "image_sha256"] != table.loc["d-again", "image_sha256"]
    assert table.loc["d", "phash"] == table.loc["d-again", "phash"]
    for row_id, image in table.image_path.items():
        with Image.open(run.out / image) as opened:
            assert table.loc[row_id, "phash"] == str(imagehash.phash(opened.convert("RGB")))


def test_a_rerun_hashes_no_image_again(run):
    store = RunStore(run.out)
    table = pq.read_table(run.out / "results.parquet")
    read: list[str] = []

    def reading(path: str) -> bytes:
        read.append(path)
        return store.read_bytes(path)

    again, counts = add_duplicate_columns(table, reading, 6, previous=previous_hashes(run.out / "results.parquet"))
    assert read == [] and counts["hashed"] == 0 and counts["reused"] == len(IDS)
    assert again.column("near_duplicate_of").to_pylist() == table.column("near_duplicate_of").to_pylist()
    fresh, counts = add_duplicate_columns(table, reading, 6)
    assert counts["hashed"] == len(set(table.column("image_sha256").to_pylist())) == len(read)
    assert fresh.column("phash").to_pylist() == table.column("phash").to_pylist()
    # A stopped run hashes nothing new: what it does not know stays null, and is never named.
    partial, counts = add_duplicate_columns(table, reading, 6, previous=None, hash_new=False)
    assert counts["not_hashed"] == len(IDS) and partial.column("phash").null_count == len(IDS)
    assert partial.column("near_duplicate_of").null_count == len(IDS)
    # A stop asked while hashing (Ctrl-C at the end of a run): what is not reached stays null.
    asked = []

    def stop_now() -> bool:
        asked.append(True)
        return True

    stopped, counts = add_duplicate_columns(table, reading, 6, stop=stop_now)
    assert asked and counts["not_hashed"] == len(IDS) and counts["hashed"] == 0
    assert stopped.column("phash").null_count == len(IDS)


def test_runs_again_reuse_the_hashes_and_off_keeps_them(run, tmp_path, caplog):
    folder = tmp_path / "again"
    shutil.copytree(run.out, folder)
    catalog = str(run.base / "catalog.parquet")
    before = pq.read_table(folder / "results.parquet")
    with caplog.at_level(logging.INFO, logger="catalogen"):
        summary = run_summary(catalogen_run(catalog=catalog, out=str(folder), overrides=OVERRIDES, return_state=True))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("near-duplicates")]
    assert lines == [f"near-duplicates (pHash within 6 bits): 3 row(s); 0 image(s) hashed, {len(IDS)} reused"]
    again = pq.read_table(folder / "results.parquet")
    for name, _ in duplicates.COLUMNS:
        assert again.column(name).to_pylist() == before.column(name).to_pylist()
    assert summary["near_duplicates"] == 3
    off = {**OVERRIDES, "duplicates.max_distance": False}
    summary = run_summary(catalogen_run(catalog=catalog, out=str(folder), overrides=off, return_state=True))
    table = pq.read_table(folder / "results.parquet")
    assert summary["near_duplicates"] == 0 and table.column("near_duplicate_of").null_count == len(IDS)
    assert table.column("phash").to_pylist() == before.column("phash").to_pylist()  # known, not decoded again
    assert "Near-duplicate detection is off" in (folder / "report.html").read_text()
    with pytest.raises(ExportError, match="--dedupe: near-duplicate detection was off"):
        export_run(folder, tmp_path / "x", ExportOptions(format="hf", dedupe=True))


def test_bad_cached_hashes_are_hashed_again_not_fatal(run, tmp_path, caplog):
    """A previous results.parquet whose `phash` was edited or damaged (not hex, a digit short, null):
    those images are hashed again; every other hash is reused and no row loses its columns."""
    folder = tmp_path / "tampered"
    shutil.copytree(run.out, folder)
    before = pq.read_table(folder / "results.parquet")
    hashes = before.column("phash").to_pylist()
    bad = {"d": "zz-not-hex", "a": hashes[IDS.index("a")][:15], "e": None}
    tampered = [bad.get(row_id, value) for row_id, value in zip(IDS, hashes)]
    index = before.schema.get_field_index("phash")
    pq.write_table(before.set_column(index, "phash", pa.array(tampered, pa.string())), folder / "results.parquet")
    known = previous_hashes(folder / "results.parquet")
    assert len(known) == len(IDS) - len(bad) and not set(known.values()) & set(bad.values())
    with caplog.at_level(logging.INFO, logger="catalogen"):  # its ERROR line named the bad hash
        summary = run_summary(catalogen_run(catalog=str(run.base / "catalog.parquet"), out=str(folder),
                                            overrides=OVERRIDES, return_state=True))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("near-duplicates")]
    assert lines == [f"near-duplicates (pHash within 6 bits): 3 row(s); {len(bad)} image(s) hashed, "
                     f"{len(IDS) - len(bad)} reused"]
    after = pq.read_table(folder / "results.parquet")
    for name, _ in duplicates.COLUMNS:  # present, and as they were before the tampering
        assert after.column(name).to_pylist() == before.column(name).to_pylist(), name
    assert summary["near_duplicates"] == 3


def test_a_missing_image_gets_no_hash_and_is_never_named(run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run.out, folder)
    table = pq.read_table(folder / "results.parquet")
    first_d = table.column("image_path").to_pylist()[IDS.index("d")]
    (folder / first_d).unlink()
    marked, counts = add_duplicate_columns(table, RunStore(folder).read_bytes, 6)
    assert counts["unreadable"] == 1
    of = dict(zip(IDS, marked.column("near_duplicate_of").to_pylist()))
    assert of["d"] is None and marked.column("phash").to_pylist()[IDS.index("d")] is None
    assert (of["d-again"], of["d-third"], of["b-again"]) == (None, "d-again", "b")


def test_export_dedupe_leaves_them_out(run, tmp_path):
    import datasets

    def keys(out: Path) -> set[str]:
        files = sorted(glob.glob(str(out / "data" / "train-*.parquet")))
        loaded = datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=str(tmp_path / "cache"))
        return set(loaded["train"]["id"])

    everything = export_run(run.out, tmp_path / "all", ExportOptions(format="hf"))
    assert keys(tmp_path / "all") == set(IDS) and everything["rows"] == len(IDS)
    deduped = export_run(run.out, tmp_path / "dedupe", ExportOptions(format="hf", dedupe=True))
    assert keys(tmp_path / "dedupe") == {"a", "b", "c", "d", "e"}
    assert deduped["excluded"]["near_duplicate"] == 3 and deduped["options"]["dedupe"] is True
    assert deduped["fingerprint"] != everything["fingerprint"]
    # Judged among the rows the export keeps: with `d` filtered out, its first repeat stands for it.
    filtered = export_run(run.out, tmp_path / "where", ExportOptions(format="hf", dedupe=True, where=("id!=d",)))
    assert keys(tmp_path / "where") == {"a", "b", "c", "d-again", "e"} and filtered["excluded"]["near_duplicate"] == 2


def test_export_dedupe_from_the_command_line(run, tmp_path):
    out = tmp_path / "wds"
    result = CliRunner().invoke(app, ["export", str(run.out), "--format", "webdataset", "--out", str(out), "--dedupe"])
    assert result.exit_code == 0, result.output
    assert "3 near_duplicate" in result.output
    import webdataset as wds

    samples = list(wds.WebDataset(sorted(glob.glob(str(out / "train" / "*.tar"))), shardshuffle=False).decode())
    assert sorted(s["json"]["id"] for s in samples) == ["a", "b", "c", "d", "e"]


def test_export_dedupe_refuses_results_without_hashes(run, tmp_path):
    folder = tmp_path / "off"
    shutil.copytree(run.out, folder)
    table = pq.read_table(folder / "results.parquet")
    off, _ = add_duplicate_columns(table, RunStore(folder).read_bytes, None)
    assert off.column("phash").null_count == len(IDS) and off.column("near_duplicate_of").null_count == len(IDS)
    pq.write_table(off, folder / "results.parquet")
    with pytest.raises(ExportError, match=r"--dedupe: .*off.*duplicates\.max_distance"):
        export_run(folder, tmp_path / "x", ExportOptions(format="hf", dedupe=True))
    pq.write_table(table.drop_columns([name for name, _ in duplicates.COLUMNS]).replace_schema_metadata({}),
                   folder / "results.parquet")
    with pytest.raises(ExportError, match=r"--dedupe: .*no pHash column"):
        export_run(folder, tmp_path / "y", ExportOptions(format="hf", dedupe=True))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_first_of_each_over_all_ok_rows_is_near_duplicate_of_unset(run):
    table = pq.read_table(run.out / "results.parquet")
    keep = first_of_each(table, 6)
    assert keep.tolist() == [v is None for v in table.column("near_duplicate_of").to_pylist()]


def test_the_report_shows_the_groups(run):
    html = (run.out / "report.html").read_text()
    section = re.search(r'<div id="near-duplicates">(.*?)\n  </div>', html, re.S).group(1)
    assert '<span id="near-duplicate-rows">3</span>' in section and "in 2 group(s)" in section
    groups = re.findall(r'<div class="images dup-group" data-rows="(\d+)">(.*?)</div>', section, re.S)
    members = [(int(rows), re.findall(r'<span class="dup-id">([^<]+)</span>', body)) for rows, body in groups]
    assert members == [(3, ["d", "d-again", "d-third"]), (2, ["b", "b-again"])]
    for thumb in re.findall(r'src="(thumbs/[0-9a-f]{64}\.webp)"', section):
        assert (run.out / thumb).is_file()
    assert len(re.findall(r'src="thumbs/', section)) == 5
    # Each row of the gallery says which row it repeats.
    chunk = (run.out / "report-data" / "rows-00000.js").read_text().splitlines()[1]
    records = json.loads(chunk.removeprefix("window.catalogenChunks[0] = ").rstrip(";"))
    assert {r["id"]: r.get("dup") for r in records if r.get("dup")} == {
        "b-again": "b v0, 0 bits apart (pHash)", "d-again": "d v0, 0 bits apart (pHash)",
        "d-third": "d v0, 0 bits apart (pHash)"}
