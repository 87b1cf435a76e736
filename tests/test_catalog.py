"""Catalog validation: every fault is refused with its column and rows, before anything is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fast_config
from typer.testing import CliRunner

from catalogen.catalog import CatalogError, expand_rows, read_catalog
from catalogen.cli import app
from catalogen.storage.hashing import derive_seed
from catalogen.run.plan import load_checked_catalog, validate_for_run

GOOD = {"id": ["a", "b", "c"], "prompt": ["x", "y", "z"]}


def faults_of(columns: dict, **cfg) -> list[str]:
    with pytest.raises(CatalogError) as info:
        validate_for_run(pa.table(columns), fast_config(**cfg))
    return [str(f) for f in info.value.faults]


# (columns, the fault's column, words its message must hold, exactly the rows it must list)
FAULTS = {
    "missing id column": ({"prompt": ["x"]}, "id", ["missing"], ()),
    "blank id": ({"id": ["a", " ", None], "prompt": ["x", "y", "z"]}, "id", ["null or blank"], ("#1", "#2")),
    "duplicate id": ({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]}, "id", ["unique"], ("a",)),
    "id of wrong type": ({"id": [1.5, 2.5], "prompt": ["x", "y"]}, "id", ["double"], ()),
    "missing prompt column": ({"id": ["a"]}, "prompt", ["missing", "template"], ()),
    "blank prompt": ({"id": ["a", "b"], "prompt": ["x", "  "]}, "prompt", ["blank"], ("b",)),
    "NaN prompt": ({"id": ["a", "b", "c"], "prompt": ["nan bread", "nan", " NaN"]}, "prompt", ["NaN"], ("b", "c")),
    "prompt not text": ({"id": ["a"], "prompt": [3]}, "prompt", ["strings", "int64"], ()),
    "width not multiple of 8": ({**GOOD, "width": [32, 36, None]}, "width", ["multiple of 8"], ("b",)),
    "height outside model limits": ({**GOOD, "height": [32, 1024, 8]}, "height", ["between 16 and 512", "tiny:sd15"], ("b", "c")),
    "steps out of range": ({**GOOD, "steps": [0, 151, 20]}, "steps", ["between 1 and 150"], ("a", "b")),
    "steps not whole": ({**GOOD, "steps": [2.5, None, 3.0]}, "steps", ["whole numbers"], ("a",)),
    "guidance out of range": ({**GOOD, "guidance_scale": [7.5, -1.0, 31.0]}, "guidance_scale", ["between 0 and 30"], ("b", "c")),
    "negative seed": ({**GOOD, "seed": [1, -5, 2]}, "seed", ["between 0"], ("b",)),
    "seed as lossy float": ({**GOOD, "seed": [1.0, 2.0**60, None]}, "seed", ["int64"], ("b",)),
    "unknown scheduler": ({**GOOD, "scheduler": ["euler", "k_magic", None]}, "scheduler", ["unknown scheduler"], ("b",)),
    "num_variants out of range": ({**GOOD, "num_variants": [1, 0, 65]}, "num_variants", ["between 1 and 64"], ("b", "c")),
    "column of wrong type": ({**GOOD, "steps": [b"ten", b"20", None]}, "steps", ["integers", "binary"], ()),
    "text that is not a number": ({**GOOD, "steps": ["ten", "20", None]}, "steps", ["not numbers"], ("a",)),
    "reserved column": ({**GOOD, "status": ["live", "live", "draft"]}, "status", ["results use"], ()),
    "stage-prefixed column": ({**GOOD, "generate_seed": [1, 2, 3]}, "generate_seed", ["results use"], ()),
}


@pytest.mark.parametrize("name", FAULTS)
def test_each_fault_is_refused_and_names_exactly_its_rows(name):
    columns, column, words, rows = FAULTS[name]
    with pytest.raises(CatalogError) as info:
        validate_for_run(pa.table(columns), fast_config())
    mine = [f for f in info.value.faults if f.column == column]
    assert len(mine) == 1, info.value.faults
    for word in words:
        assert word in mine[0].message, f"{name}: {word!r} not in {mine[0].message!r}"
    assert mine[0].rows == rows


def test_all_faults_are_reported_together():
    columns = {"id": ["a", "a", None], "prompt": ["x", None, "z"], "steps": [0, 5, 5], "scheduler": ["nope", None, None]}
    text = "\n".join(faults_of(columns))
    for word in ("unique", "'prompt'", "'steps'", "'scheduler'", "#2"):
        assert word in text


def test_size_limits_follow_the_profile():
    columns = {**GOOD, "width": [64, 64, 64]}
    validate_for_run(pa.table(columns), fast_config(profile="tiny"))
    text = "\n".join(faults_of(columns, profile="sd15"))
    assert "between 256 and 1024" in text and "stable-diffusion-v1-5" in text


def test_long_fault_lists_are_shortened():
    n = 40
    text = faults_of({"id": [f"r{i}" for i in range(n)], "prompt": ["x"] * n, "steps": [0] * n})[0]
    assert "r0, r1, r2, r3, r4 and 35 more" in text


def test_empty_and_unreadable_files(tmp_path: Path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(CatalogError, match="no rows"):
        load_checked_catalog(empty, fast_config())
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet at all")
    with pytest.raises(CatalogError, match="cannot read as Parquet"):
        read_catalog(garbage)
    with pytest.raises(CatalogError) as info:
        read_catalog(tmp_path / "absent.parquet")
    assert str(info.value) == f"{tmp_path / 'absent.parquet'}: file not found"  # the file itself: one line


def test_csv_and_jsonl_catalogs(tmp_path: Path):
    (tmp_path / "c.csv").write_text("id,prompt,steps\na,a cat,4\nb,a dog,\n")
    (tmp_path / "c.jsonl").write_text('{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog", "seed": 7}\n')
    for name in ("c.csv", "c.jsonl"):
        table = load_checked_catalog(tmp_path / name, fast_config())
        assert table.column("id").to_pylist() == ["a", "b"]


def test_integer_ids_keep_their_type_and_unknown_columns_pass():
    from catalogen.catalog import string_ids

    table = validate_for_run(pa.table({"id": [10, 11], "prompt": ["x", "y"], "sku_note": ["p", "q"]}), fast_config())
    assert table.column("id").to_pylist() == [10, 11]  # results join back to the catalog on its own type
    assert string_ids(table).to_pylist() == ["10", "11"]  # keys, seeds and file names use the text
    assert table.column("sku_note").to_pylist() == ["p", "q"]


def test_expansion_gives_stable_seeds_per_variant():
    cfg = fast_config(seed=5, num_variants=2)
    table = validate_for_run(pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "seed": [100, None], "num_variants": [3, None]}), cfg)
    rows = expand_rows(table, cfg.num_variants, cfg.seed)
    got = list(zip(rows.column("id").to_pylist(), rows.column("variant").to_pylist(), rows.column("seed").to_pylist()))
    assert got == [
        ("a", 0, 100), ("a", 1, 101), ("a", 2, 102),
        ("b", 0, derive_seed(5, "b", 0)), ("b", 1, derive_seed(5, "b", 1)),
    ]
    # Reordering the catalog changes no seed: seeds depend on the row, not its position.
    flipped = expand_rows(table.take([1, 0]), cfg.num_variants, cfg.seed)
    assert dict(zip(zip(flipped.column("id").to_pylist(), flipped.column("variant").to_pylist()), flipped.column("seed").to_pylist())) == {
        (i, v): s for i, v, s in got
    }


def test_derived_seeds_are_pinned():
    # A change to the derivation would silently change every image ever made from a catalog.
    assert derive_seed(0, "prompt-000", 0) == derive_seed(0, "prompt-000", 0)
    assert derive_seed(0, "a", 0) != derive_seed(0, "a", 1) != derive_seed(1, "a", 0)
    # The documented derivation: SHA-256 of the JSON ["seed", run_seed, id, variant], first 8 bytes, 63 bits.
    expected = int.from_bytes(hashlib.sha256(b'["seed",0,"a",0]').digest()[:8], "big") & (2**63 - 1)
    assert derive_seed(0, "a", 0) == expected
    assert 0 <= derive_seed(2**63 - 1, "x" * 1000, 63) < 2**63


def test_cli_refuses_bad_catalog_and_writes_nothing(tmp_path: Path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["x", None], "steps": [2, 999]}), bad)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "unique" in result.output and "'steps'" in result.output
    result = runner.invoke(app, ["run", str(bad), "--out", str(out)])
    assert result.exit_code == 1
    assert "3 problem(s)" in result.output
    assert not out.exists()


def test_cli_validate_accepts_the_demo_catalog():
    result = CliRunner().invoke(app, ["validate", "catalogs/demo_prompts.parquet"])
    assert result.exit_code == 0, result.output
    assert "24 ids, 25 rows" in result.output


def test_a_catalog_url_is_read_once_within_its_deadline_and_the_deadline_is_a_setting(monkeypatch, tmp_path: Path):
    """A server slower than nothing but within the deadline is read (one request); an unusable deadline is
    refused by name (the silent server's side: tests/test_cli_faults.py)."""
    import gzip
    import http.server
    import threading
    import time

    body = gzip.compress(b"id,prompt\n0012,a cat\nb,a dog\n")
    requests = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requests.append(self.path)
            time.sleep(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CATALOGEN_CATALOG_TIMEOUT_S", "20")
        table = read_catalog(f"http://127.0.0.1:{server.server_port}/catalog.csv.gz")
        assert table.column("id").to_pylist() == ["0012", "b"]
        assert requests == ["/catalog.csv.gz"]  # one download, though CSV is parsed twice (header, then rows)
    finally:
        server.shutdown()
        server.server_close()
    for value in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("CATALOGEN_CATALOG_TIMEOUT_S", value)
        with pytest.raises(CatalogError) as info:
            read_catalog("http://127.0.0.1:9/catalog.csv")
        assert str(info.value) == f"CATALOGEN_CATALOG_TIMEOUT_S={value}: is not a positive number of seconds"
