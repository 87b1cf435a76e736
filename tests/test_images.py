"""Images a catalog brings: refused up front by row id, normalised for the stages, decoded per row."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import fast_config, run_stage
from PIL import Image

from catalogen.catalog import CatalogError
from catalogen.media.images import (
    IMAGE_BYTES,
    ImageLoadError,
    ImageSettings,
    catalog_as_given,
    decode_image,
    image_identity,
    load_image,
)
from catalogen.models.loading import ModelIdentity
from catalogen.run.plan import (
    load_checked_catalog,
    plan_rows,
    plan_stages,
    validate_for_run,
)

STAGES = ["remove_bg"]  # the first image reader takes the catalog's images


def png_bytes(width: int = 24, height: int = 16, colour=(200, 30, 25)) -> bytes:
    pixels = np.full((height, width, 3), 245, np.uint8)
    pixels[4:12, 6:18] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a size and which holds no pixels: only a header check can refuse it cleanly."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A catalog's folder with one good photo, an empty file, and a folder of photos outside it."""
    catalog = tmp_path / "catalog"
    (catalog / "photos").mkdir(parents=True)
    (catalog / "photos" / "mug.png").write_bytes(png_bytes())
    (catalog / "photos" / "empty.png").write_bytes(b"")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    (catalog / "photos" / "link.png").symlink_to(outside / "secret.png")
    return catalog


def check(columns: dict, folder: Path, **settings) -> pa.Table:
    cfg = fast_config(stages=STAGES, **{f"images.{k}": v for k, v in settings.items()})
    return validate_for_run(pa.table(columns), cfg, source=str(folder / "catalog.parquet"), folder=folder)


def faults_of(columns: dict, folder: Path, **settings) -> dict[str, tuple[str, ...]]:
    with pytest.raises(CatalogError) as info:
        check(columns, folder, **settings)
    return {f.message: f.rows for f in info.value.faults}


def rows_of(faults: dict[str, tuple[str, ...]], words: str) -> tuple[str, ...]:
    found = [rows for message, rows in faults.items() if words in message]
    assert len(found) == 1, f"{words!r} in one fault of {list(faults)}"
    return found[0]


def test_every_path_fault_is_refused_with_its_rows(folder: Path):
    images = {
        "ok": "photos/mug.png",
        "climbs": "../elsewhere/secret.png",
        "absolute": str(folder.parent / "elsewhere" / "secret.png"),
        "link": "photos/link.png",
        "missing": "photos/nope.png",
        "missing-too": str(folder / "photos" / "gone.png"),
        "empty": "photos/empty.png",
        "folder": "photos",
        "ftp": "ftp://example.com/a.png",
        "blank": "  ",
    }
    faults = faults_of({"id": list(images), "image": list(images.values())}, folder)

    assert rows_of(faults, "points outside") == ("climbs", "absolute")
    assert rows_of(faults, "symbolic link") == ("link",)
    assert rows_of(faults, "does not exist") == ("missing", "missing-too")
    assert rows_of(faults, "empty file") == ("empty",)
    assert rows_of(faults, "not a file") == ("folder",)
    assert rows_of(faults, "ftp:// URL") == ("ftp",)
    assert "allowed: none" in next(m for m in faults if "ftp" in m)
    assert rows_of(faults, "null or blank") == ("blank",)  # the run reads images from the catalog
    assert len(faults) == 7


def test_a_column_of_the_wrong_type_is_one_fault(folder: Path):
    faults = faults_of({"id": ["a", "b"], "image": [1, 2]}, folder)
    assert list(faults) == ["must hold text (a path or URL) or binary (the image's bytes), found int64"]


def test_a_missing_column_and_empty_bytes_are_faults(folder: Path):
    assert rows_of(faults_of({"id": ["a"], "title": ["x"]}, folder), "required column is missing") == ()
    faults = faults_of({"id": ["a", "b"], "image": pa.array([png_bytes(), b""], pa.binary())}, folder)
    assert rows_of(faults, "empty bytes") == ("b",)


def test_image_bytes_is_a_reserved_name(folder: Path):
    faults = faults_of({"id": ["a"], "image": ["photos/mug.png"], "image_bytes": [b"x"]}, folder)
    assert any("catalogen uses for image data" in m for m in faults)


def test_paths_become_absolute_and_bytes_move_to_their_own_column(folder: Path):
    data = png_bytes()
    checked = check({"id": ["a", "b"], "image": pa.array([data, data[:10] + b"rest"], pa.binary())}, folder)
    assert checked.column("image").null_count == 2
    assert checked.column(IMAGE_BYTES).to_pylist() == [data, data[:10] + b"rest"]

    checked = check({"id": ["a", "b"], "image": ["photos/mug.png", "photos/../photos/mug.png"]}, folder)
    resolved = str((folder / "photos" / "mug.png").resolve())
    assert checked.column("image").to_pylist() == [resolved, resolved]
    assert checked.column(IMAGE_BYTES).null_count == 2
    given = catalog_as_given(checked)  # what results.parquet shows: the catalog as written
    assert given.column_names == ["id", "image"]
    assert given.column("image").to_pylist() == ["photos/mug.png", "photos/../photos/mug.png"]


def test_a_path_may_lead_into_an_allowed_root(folder: Path):
    columns = {"id": ["a", "b"], "image": ["../elsewhere/secret.png", str(folder.parent / "elsewhere" / "secret.png")]}
    checked = check(columns, folder, roots=["../elsewhere"])  # a relative root starts at the catalog's folder
    assert checked.column("image").to_pylist() == [str((folder.parent / "elsewhere" / "secret.png").resolve())] * 2
    checked = check({"id": ["a"], "image": ["photos/link.png"]}, folder, roots=[str(folder.parent / "elsewhere")])
    assert checked.column("image").to_pylist() == [str((folder.parent / "elsewhere" / "secret.png").resolve())]


def test_roots_expand_home_and_file_urls_are_refused():
    assert ImageSettings(roots=["~/photos"]).roots[0] == Path.home() / "photos"
    with pytest.raises(ValueError, match="'file' URLs"):
        ImageSettings(url_schemes=["file"])


@pytest.mark.parametrize("scheme", ["file", "local", "LOCAL://", "simplecache", "zip", "dir", "reference", "mydisk"])
def test_every_url_scheme_that_reaches_local_files_is_refused_as_file_is(scheme: str, monkeypatch):
    """Judged by fsspec's filesystem class, not by name: `mydisk` is the local disk registered under a
    new name; zip, simplecache and dir open whatever filesystem they are given, the local disk too."""
    import importlib

    from fsspec.implementations.local import LocalFileSystem

    registry = importlib.import_module("fsspec.registry")  # the module (`fsspec.registry` is its read-only view)
    monkeypatch.setitem(registry._registry, "mydisk", LocalFileSystem)
    name = scheme.lower().removesuffix("://")
    with pytest.raises(ValueError, match=f"'{name}' URLs would reach any local file: give paths, and list their "
                                         "folders in images.roots"):
        ImageSettings(url_schemes=[scheme])


def test_a_local_url_cannot_bypass_images_roots(folder: Path):
    """The hostile trial's case: `images.url_schemes: [local]` and `local:///…/secret.png` ran to ok."""
    secret = folder.parent / "elsewhere" / "secret.png"
    from typer.testing import CliRunner

    from catalogen.cli import app

    catalog = folder / "catalog.csv"
    catalog.write_text(f"id,image\na,local://{secret}\n")
    result = CliRunner().invoke(app, ["validate", str(catalog), "--set", "stages=[remove_bg]",
                                      "--set", "images.url_schemes=[local]"])
    assert result.exit_code == 1 and "'local' URLs would reach any local file" in result.output, result.output
    faults = faults_of({"id": ["a"], "image": [f"local://{secret}"]}, folder)  # and with the default schemes
    assert list(faults) == ["is a local:// URL, a scheme images.url_schemes does not allow (allowed: none) "
                            f"(e.g. 'local://{secret}')"]
    faults = faults_of({"id": ["a"], "image": [f"memory://x::file://{secret}"]}, folder, url_schemes=["memory"])
    assert list(faults) == [f"chains filesystems with '::': give one plain URL (e.g. 'memory://x::file://{secret}')"]
    with pytest.raises(ImageLoadError, match="chains filesystems"):
        load_image(f"memory://x::file://{secret}", None, folder, ImageSettings(url_schemes=("memory",)))


def test_a_path_outside_the_roots_of_a_catalog_read_from_a_url_names_the_roots_once(folder: Path):
    cfg = fast_config(stages=STAGES, **{"images.roots": [str(folder / "photos")]})
    outside = str(folder.parent / "elsewhere" / "secret.png")
    with pytest.raises(CatalogError) as info:
        validate_for_run(pa.table({"id": ["a"], "image": [outside]}), cfg, source="s3://b/catalog.parquet", folder=None)
    assert [f.message for f in info.value.faults] == [f"points outside images.roots (e.g. {outside!r})"]
    link = str(folder / "photos" / "link.png")  # inside the root, a link to a file outside it
    with pytest.raises(CatalogError) as info:
        validate_for_run(pa.table({"id": ["a"], "image": [link]}), cfg, source="s3://b/catalog.parquet", folder=None)
    assert [f.message for f in info.value.faults] == [
        f"leads through a symbolic link outside images.roots (e.g. {link!r})"]


def test_an_allowed_url_scheme_is_fetched_with_fsspec(folder: Path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/shop/mug.png", png_bytes())
    checked = check({"id": ["a"], "image": ["memory://shop/mug.png"]}, folder, url_schemes=["memory"])
    url = checked.column("image")[0].as_py()
    assert url == "memory://shop/mug.png"
    settings = ImageSettings(url_schemes=("memory",))
    assert load_image(url, None, folder, settings).size == (24, 16)
    with pytest.raises(ImageLoadError, match="could not fetch"):
        load_image("memory://shop/none.png", None, folder, settings)
    with pytest.raises(ImageLoadError, match="not in images.url_schemes"):
        load_image(url, None, folder, ImageSettings())
    faults = faults_of({"id": ["a"], "image": ["nosuchscheme://x/y.png"]}, folder, url_schemes=["nosuchscheme"])
    assert rows_of(faults, "fsspec cannot fetch") == ("a",)


def test_a_hugging_face_image_column_and_a_csv_catalog(folder: Path):
    data = png_bytes()
    hf = pa.array([{"bytes": data, "path": "x.png"}, {"bytes": None, "path": "photos/mug.png"}],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    checked = check({"id": ["a", "b"], "image": hf}, folder)
    assert checked.column(IMAGE_BYTES).to_pylist() == [data, None]
    assert checked.column("image").to_pylist() == [None, str((folder / "photos" / "mug.png").resolve())]

    (folder / "catalog.csv").write_text("id,image\n0012,photos/mug.png\n")
    table = load_checked_catalog(folder / "catalog.csv", fast_config(stages=STAGES))
    assert table.column("image").to_pylist() == [str((folder / "photos" / "mug.png").resolve())]


def test_rows_carry_their_images_and_generate_skips_them(folder: Path):
    data = png_bytes()
    cfg = fast_config(stages=["generate", "remove_bg"], num_variants=2)
    identities = {"generate": {"pipeline": ModelIdentity("tiny:sd15", "rev", "", "sd15")},
                  "remove_bg": {"segmenter": ModelIdentity("tiny:rembg", "rev", "", "rembg")}}
    for image, carried in ((pa.array([None, data], pa.binary()), "image_bytes"),
                           (pa.array([None, "photos/mug.png"]), "image")):
        catalog = validate_for_run(pa.table({"id": ["gen", "own"], "prompt": ["a", "b"], "image": image}), cfg,
                                   folder=folder)
        rows = plan_rows(catalog, cfg)
        assert rows.column(carried).is_valid().to_pylist() == [False, False, True, True]  # two variants each
        planned = plan_stages(rows, cfg, identities)
        skips = planned["generate"].column("skip_reason").to_pylist()
        assert skips == [None, None, "the row brings its own image", "the row brings its own image"]


def test_identity_of_bytes_files_and_urls(folder: Path):
    path = folder / "photos" / "mug.png"
    data = path.read_bytes()
    assert image_identity(None, data) == "sha256:" + hashlib.sha256(data).hexdigest()
    before = image_identity(str(path), None)
    path.write_bytes(data + b"\0")  # another size: another identity
    assert image_identity(str(path), None) != before
    assert image_identity("https://x.test/a.png", None) == "url:https://x.test/a.png"
    assert image_identity(None, None) is None


def test_decoding_faults_name_their_reason(folder: Path):
    settings = ImageSettings(max_pixels=1000)
    with pytest.raises(ImageLoadError, match="24x16 = 384 pixels"):
        decode_image(png_bytes(), ImageSettings(max_pixels=383))
    assert decode_image(png_bytes(), settings).size == (24, 16)
    with pytest.raises(ImageLoadError, match="over images.max_pixels"):  # refused from the header alone
        decode_image(header_only_png(7000, 7000), ImageSettings())
    with pytest.raises(ImageLoadError, match="decompression bomb"):  # PIL's own limit
        decode_image(header_only_png(20000, 20000), ImageSettings(max_pixels=10**9))
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        decode_image(png_bytes()[:-30], settings)
    with pytest.raises(ImageLoadError, match="not an image"):
        decode_image(b"GIF89 but not really", settings)
    with pytest.raises(ImageLoadError, match="outside the run folder"):
        load_image("../catalog/photos/mug.png", None, folder / "run", settings)
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(str(folder / "nope.png"), None, folder, settings)
    with pytest.raises(ImageLoadError, match="no image"):
        load_image(None, None, folder, settings)


def test_a_broken_image_fails_its_row_alone_through_a_stage(tmp_path: Path):
    good = png_bytes(64, 48)
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "large.png").write_bytes(png_bytes(80, 60))
    catalog = pa.table({"id": ["good", "truncated", "text", "large"],
                        "image": ["good.png", "truncated.png", "text.png", "large.png"]})
    cfg = fast_config(stages=STAGES, **{"images.max_pixels": 64 * 48})
    out = run_stage(catalog, cfg, tmp_path / "out", "remove_bg")
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["good"]["status"] == "ok"
    assert by_id["truncated"]["status"] == "failed" and "truncated or corrupt" in by_id["truncated"]["error"]
    assert by_id["text"]["status"] == "failed" and "not an image" in by_id["text"]["error"]
    assert by_id["large"]["status"] == "failed" and "80x60 = 4800 pixels" in by_id["large"]["error"]

    as_bytes = pa.table({"id": ["bytes", "broken"], "image": pa.array([good, good[:100]], pa.binary())})
    out = run_stage(as_bytes, cfg, tmp_path / "out-bytes", "remove_bg")
    assert out.column("status").to_pylist() == ["ok", "failed"]
    assert "truncated or corrupt" in out.column("error")[1].as_py()
    assert out.column("source_sha256")[0].as_py() == by_id["good"]["source_sha256"]
    cutouts = [np.asarray(Image.open(path)) for path in (tmp_path / "out" / by_id["good"]["image_path"],
                                                          tmp_path / "out-bytes" / out.column("image_path")[0].as_py())]
    assert np.array_equal(*cutouts)  # the same image, as a file or as bytes, gives the same cut-out
