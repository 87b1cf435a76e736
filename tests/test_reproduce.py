"""`catalogen reproduce IMAGE` (#5): an image made again from the provenance in its own file.

Real tiny-profile runs through the CLI (configs/products.yaml for generate, configs/photos.yaml for
remove_bg, style, upscale and a JPEG rendition), then each image re-made in a temporary folder and
compared pixel for pixel; a tampered image (one pixel, one level), foreign files, a missing model
revision or input file, and hostile provenance chunks are refused or reported as the README says.
Hostile recipes (an enhance step sent to a server with a key and /proc/self/environ, URL images, a
cache elsewhere, big batches, /proc and FIFO inputs, wrong or missing hashes, malformed parts) are
obeyed only where they decide pixels; SIGINT / SIGTERM end a reproduction cleanly.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, cli_env
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.run.reproduce import MAX_PROVENANCE_BYTES, Unusable, read_capped, read_provenance

FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


def run_cli(catalog: str, config: str, out: Path) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["run", catalog, "--config", config, "--out", str(out), "--limit", "1", *FEWER_STEPS])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "results.parquet")


def reproduce(path: Path, *options: str):
    return CliRunner().invoke(app, ["reproduce", str(path), *options])


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> list[str]:
    """`--config` with this machine's images.roots: the repository's catalogs (photos, style images)."""
    config = tmp_path_factory.mktemp("local") / "local.yaml"
    config.write_text(yaml.safe_dump({"images": {"roots": [str(REPO / "catalogs")]}}))
    return ["--config", str(config)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, pd.Series]:
    out = tmp_path_factory.mktemp("photos") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        df = run_cli("catalogs/demo_photos.parquet", "configs/photos.yaml", out)
    assert (df.status == "ok").all()
    return out, df.iloc[0]


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> tuple[Path, pd.Series]:
    out = tmp_path_factory.mktemp("products") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        df = run_cli("catalogs/demo_products.parquet", "configs/products.yaml", out)
    assert (df.generate_status == "ok").all()
    return out, df.iloc[0]


def rewrite_png(source: Path, target: Path, provenance: dict | None = None, pixel: tuple[int, int] | None = None,
                by: int = 1) -> Path:
    """The PNG again with its text chunks (the provenance replaced when given), a pixel's colour
    channels changed `by` levels when given (down where up would pass 255)."""
    with Image.open(source) as image:
        image.load()
        texts = dict(image.text)
        copy = image.copy()
    if provenance is not None:
        texts["catalogen"] = json.dumps(provenance)
    if pixel is not None:
        value = copy.getpixel(pixel)
        copy.putpixel(pixel, tuple(v + by if v + by <= 255 else v - by for v in value[:3]) + tuple(value[3:]))
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    copy.save(target, format="PNG", pnginfo=info)
    return target


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A valid 1x1 PNG with one extra chunk right after IHDR (any size: written by hand, not by Pillow)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


# --- every stage's image, made again ----------------------------------------------------------------


@pytest.mark.parametrize("column, said", [
    ("remove_bg_image_path", "remove_bg image of row 'MUG-001' v0 (remove_bg)"),
    ("remove_bg_canvas_path", "remove_bg canvas image of row 'MUG-001' v0 (remove_bg)"),
    ("style_image_path", "style image of row 'MUG-001' v0 (remove_bg -> style)"),
    ("upscale_image_path", "upscale image of row 'MUG-001' v0 (remove_bg -> style -> upscale)"),
    # a JPEG rendition: its source made again, then rendered and encoded as the renditions stage does
    ("renditions_marketplace-main_path", "rendition marketplace-main of the remove_bg"),
])
def test_photo_stage_images_are_identical_when_made_again(photos, local, column: str, said: str):
    out, row = photos
    result = reproduce(out / row[column], *local)
    assert result.exit_code == 0, result.output
    assert f"identical: {said}" in result.output


def test_a_later_variant_is_made_again_from_its_own_seed(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "variants"
    small = ["--set", "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32"]
    result = CliRunner().invoke(app, ["run", "catalogs/demo_prompts.parquet", "--out", str(out), "--limit", "1",
                                      "--set", "num_variants=2", *small])
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out / "results.parquet")
    second = df[df.variant == 1].iloc[0]
    result = reproduce(out / second.image_path)
    assert result.exit_code == 0, result.output
    assert f"identical: generate image of row {second.id!r} v1 (generate)" in result.output


def test_a_photo_given_as_bytes_and_a_rows_own_style_image_are_found_again(tmp_path: Path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copyfile(REPO / "catalogs" / "styles" / "cool-stripes.png", tmp_path / "stripes.png")
    photo = (REPO / "catalogs" / "photos" / "TEA-002.png").read_bytes()
    catalog = tmp_path / "own.parquet"
    pq.write_table(pa.table({"id": ["P1"], "image": [photo], "style_image": ["stripes.png"]}), catalog)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(catalog), "--out", str(out), "--stages", "remove_bg,style",
                                      "--set", "style.steps=2"])
    assert result.exit_code == 0, result.output
    styled = out / pd.read_parquet(out / "results.parquet").style_image_path[0]
    inputs = read_provenance(styled)["recipe"]["inputs"]
    assert inputs["image"] == {"catalog": str(catalog), "id": "P1", "sha256": __import__("hashlib").sha256(photo).hexdigest()}
    assert inputs["style_image"]["path"] == str(tmp_path / "stripes.png")
    roots = tmp_path / "local.yaml"
    roots.write_text(yaml.safe_dump({"images": {"roots": [str(tmp_path)]}}))
    result = reproduce(styled, "--config", str(roots))
    assert result.exit_code == 0, result.output
    assert "identical: style image of row 'P1' v0 (remove_bg -> style)" in result.output
    (tmp_path / "stripes.png").write_bytes((REPO / "catalogs" / "styles" / "sage-dots.png").read_bytes())
    result = reproduce(styled, "--config", str(roots))
    assert result.exit_code == 2 and "input style_image does not match the recorded sha256" in result.output
    # the photo named by hand instead of its catalog: the same check, by its own bytes
    photo_file = tmp_path / "photo.png"
    photo_file.write_bytes(photo)
    result = reproduce(styled, "--input", f"image={photo_file}", "--input", f"style_image={tmp_path / 'stripes.png'}")
    assert result.exit_code == 2 and "input style_image does not match the recorded sha256" in result.output


def test_the_recipe_holds_what_makes_the_row_and_references_its_photo(photos):
    out, row = photos
    recipe = read_provenance(out / row.upscale_image_path)["recipe"]
    assert recipe["stages"] == ["remove_bg", "style", "upscale"]
    assert set(recipe["models"]) == {"remove_bg", "style", "upscale"}
    assert recipe["models"]["style"]["pipeline"]["revision"].startswith("sha256:")
    photo = recipe["inputs"]["image"]
    assert Path(photo["path"]).is_file() and len(photo["sha256"]) == 64
    assert recipe["inputs"]["style.style_image"]["path"].endswith("catalogs/styles/sage-dots.png")
    assert "batch_size" not in recipe["settings"]["style"]  # throughput only: the same bytes whatever it is
    assert recipe["row"]["id"] == "MUG-001" and isinstance(recipe["row"]["seed"], int)


# --- what does not reproduce ------------------------------------------------------------------------


def test_one_pixel_one_level_off_is_different_and_found(photos, local, tmp_path: Path):
    out, row = photos
    original = out / row.remove_bg_image_path
    tampered = rewrite_png(original, tmp_path / "tampered.png", pixel=(5, 3), by=1)
    assert read_provenance(tampered) == read_provenance(original)  # the provenance chunk is intact
    with Image.open(original) as a, Image.open(tampered) as b:  # exactly one pixel, by exactly one level
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.max() == 1 and list(zip(*np.nonzero(diff.max(axis=2)))) == [(3, 5)]
    result = reproduce(tampered, *local)
    assert result.exit_code == 1, result.output
    assert "max pixel difference 1 at (5, 3), 1 pixels differ" in result.output.splitlines()


def test_a_png_catalogen_did_not_write_is_refused_in_one_line(tmp_path: Path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "red").save(plain)
    result = reproduce(plain)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "carries no catalogen provenance" in result.output
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = reproduce(text)
    assert result.exit_code == 2 and "not a PNG, JPEG or WebP image" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = reproduce(tmp_path / "absent.png")
    assert result.exit_code == 2 and "cannot be read" in result.output


def test_provenance_without_a_recipe_is_refused(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.style_image_path)
    del provenance["recipe"]
    result = reproduce(rewrite_png(out / row.style_image_path, tmp_path / "old.png", provenance))
    assert result.exit_code == 2 and "without a recipe" in result.output


def test_a_model_revision_not_present_is_named(photos, local, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    provenance["recipe"]["models"]["remove_bg"]["segmenter"]["revision"] = "sha256:00000000000000000000000000000000"
    result = reproduce(rewrite_png(out / row.remove_bg_image_path, tmp_path / "other-model.png", provenance), *local)
    assert result.exit_code == 2, result.output
    assert "remove_bg.segmenter: tiny:rembg @ sha256:00000000000000000000000000000000 is not present" in result.output


def test_a_hub_model_is_pinned_to_its_recorded_commit_and_named_when_absent(photos, local, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.style_image_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    provenance["recipe"]["settings"]["profile"] = "sd15"
    provenance["recipe"]["models"]["style"]["pipeline"] = {"repo": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                           "revision": commit, "kind": "sd15"}
    result = reproduce(rewrite_png(out / row.style_image_path, tmp_path / "hub.png", provenance), *local)
    assert result.exit_code == 2, result.output
    assert f"style.pipeline: stable-diffusion-v1-5/stable-diffusion-v1-5 @ {commit} is not present" in result.output


def test_a_photo_is_read_only_where_allowed_and_a_changed_one_reveals_nothing(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    photo = Path(provenance["recipe"]["inputs"]["image"]["path"])
    moved = tmp_path / "moved" / "MUG-001.png"
    provenance["recipe"]["inputs"]["image"]["path"] = str(moved)
    image = rewrite_png(out / row.remove_bg_image_path, tmp_path / "moved.png", provenance)
    # no --config: no images.roots, so a recorded path is not read, whether or not it exists
    for exists in (False, True):
        result = reproduce(image)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"input image is recorded at {moved}, which" in result.output
        assert "--input image=PATH" in result.output
        moved.parent.mkdir(exist_ok=True)
        moved.write_bytes(photo.read_bytes())
    roots = tmp_path / "local.yaml"
    roots.write_text(yaml.safe_dump({"images": {"roots": [str(moved.parent)]}}))
    moved.unlink()
    result = reproduce(image, "--config", str(roots))
    assert result.exit_code == 2 and "file does not exist" in result.output, result.output
    # another file (inside the roots, or named by hand): it does not match, and nothing of its hash is shown
    other = REPO / "catalogs" / "photos" / "TEA-002.png"
    moved.write_bytes(other.read_bytes())
    digest = __import__("hashlib").sha256(other.read_bytes()).hexdigest()
    for options in (["--config", str(roots)], ["--input", f"image={other}"]):
        result = reproduce(image, *options)
        assert result.exit_code == 2, result.output
        assert result.output.strip().endswith("input image does not match the recorded sha256"), result.output
        assert not any(digest[i:i + 6] in result.output for i in range(0, 64 - 6)), result.output


# --- hostile files ----------------------------------------------------------------------------------


def refused_quickly(data: bytes, tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    del data
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(Unusable) as refused:
        read_provenance(path)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2.0, seconds
    assert peak < 4 * MAX_PROVENANCE_BYTES, peak  # a few times the cap, not the 50-64 MB the file holds
    result = reproduce(path)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    return str(refused.value)


def test_a_huge_provenance_chunk_is_refused_unread(tmp_path: Path):
    body = b"catalogen\0" + b'{"stage": "generate", "x": "' + b"a" * (50 * 2**20) + b'"}'
    reason = refused_quickly(png_with_chunk(b"tEXt", body), tmp_path, "huge.png")
    assert "refused unread" in reason


def test_a_compressed_provenance_bomb_is_refused(tmp_path: Path):
    body = b"catalogen\0\0" + zlib.compress(b"[" * (64 * 2**20), 9)
    reason = refused_quickly(png_with_chunk(b"zTXt", body), tmp_path, "bomb.png")
    assert "inflates past" in reason


def test_deeply_nested_provenance_is_refused(tmp_path: Path):
    body = b"catalogen\0" + b"[" * (2**20) + b"]" * (2**20)
    reason = refused_quickly(png_with_chunk(b"tEXt", body), tmp_path, "nested.png")
    assert "too deeply nested" in reason


def test_renditions_without_provenance_or_with_a_huge_xmp_chunk_are_refused(tmp_path: Path):
    plain = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(plain, format="JPEG")
    path = tmp_path / "plain.jpg"
    path.write_bytes(plain.getvalue())
    with pytest.raises(Unusable, match="carries no catalogen provenance"):
        read_provenance(path)
    webp = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(webp, format="WEBP")
    data = webp.getvalue()
    chunk = b"XMP " + struct.pack("<I", 50 * 2**20) + b"<x>" * (50 * 2**20 // 3) + b"ab"
    riff = data[12:] + chunk
    reason = refused_quickly(b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WEBP" + riff, tmp_path, "huge.webp")
    assert "refused unread" in reason


# --- hostile recipes: a recipe is obeyed only where it decides pixels ---------------------------------


class Listener:
    """An HTTP server on 127.0.0.1 that answers every request 200 and remembers each one."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen.append((self.command, self.path, str(self.headers), self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_HEAD = _any

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def listener():
    running = Listener()
    yield running
    running.server.shutdown()
    running.server.server_close()


SECRET = "sk-catalogen-test-secret-7f3a91"


def hostile_enhance(provenance: dict, listener: Listener, elsewhere: Path) -> dict:
    """The generate image's recipe, rewritten to send secrets and files to `listener`, fetch from it,
    write into `elsewhere` and run big batches; its base prompt changed (its recorded enhance answer kept)."""
    recipe = provenance["recipe"]
    recipe["settings"]["enhance"].update({"backend": "openai", "base_url": f"{listener.url}/v1", "model": "gpt",
                                          "api_key_env": "REPRODUCE_TEST_SECRET", "system_prompt_file": "/proc/self/environ"})
    recipe["settings"]["images"]["url_schemes"] = ["http", "https"]
    recipe["settings"]["generate"]["batch_size"] = 256
    recipe["settings"].update({"cache_dir": str(elsewhere), "runner": "dask", "rows_per_shard": 100_000,
                               "dask": {"address": listener.url.replace("http", "tcp")}})
    recipe["row"]["prompt"] = "a base prompt the enhance step rewrote"
    return provenance


def test_an_enhance_recipe_asks_no_server_and_reads_nothing_it_names(products, listener, tmp_path: Path, monkeypatch):
    """A generated image made again identical from its recipe, although the recipe sends its enhance
    step to a server with a key and a file, asks for URLs, a cache elsewhere, Dask and big batches."""
    monkeypatch.setenv("REPRODUCE_TEST_SECRET", SECRET)
    out, row = products
    original = out / row.generate_image_path
    provenance = read_provenance(original)
    assert provenance["recipe"]["stages"] == ["enhance", "generate"]
    assert provenance["recipe"]["row"]["prompt"]  # the template's prompt, before enhancement
    assert provenance["recipe"]["enhanced"]["prompt"] == row.enhance_prompt == row.generate_prompt  # enhance's answer
    # every later stage's image records enhance's answer too (what its generate image was made from)
    assert read_provenance(out / row.upscale_image_path)["recipe"]["enhanced"] == provenance["recipe"]["enhanced"]
    elsewhere = tmp_path / "elsewhere"
    crafted = rewrite_png(original, tmp_path / "crafted.png", hostile_enhance(provenance, listener, elsewhere))
    result = reproduce(crafted)
    assert result.exit_code == 0, result.output
    assert "identical: generate image of row 'MUG-001' v0 (enhance -> generate)" in result.output
    assert listener.seen == []  # no LLM request, no fetch, no Dask scheduler
    assert SECRET not in result.output
    assert not elsewhere.exists()


def test_the_rerun_takes_throughput_and_places_from_this_machine(products, listener, tmp_path: Path):
    """What the flow is given for a hostile recipe: the recipe's pixel settings, this machine's others."""
    from catalogen.config import RunConfig, config_model, load_config
    from catalogen.run.reproduce import rebuild

    out, row = products
    provenance = hostile_enhance(read_provenance(out / row.generate_image_path), listener, tmp_path / "elsewhere")
    provenance["recipe"]["settings"]["generate"]["steps"] = 3
    (tmp_path / "job").mkdir()
    job = rebuild(out / row.generate_image_path, provenance, tmp_path / "job")
    cfg = load_config(job.config)
    defaults = config_model()()
    assert cfg.stages == ("generate",)  # enhance is not run again
    assert cfg.enhance == defaults.enhance  # no server, key or system prompt file from the recipe
    assert cfg.generate.steps == 3  # what decides pixels is the recipe's
    assert cfg.generate.batch_size == defaults.generate.batch_size
    assert (cfg.cache_dir, cfg.runner, cfg.rows_per_shard, cfg.dask) == (None, "threads", RunConfig().rows_per_shard, defaults.dask)
    assert cfg.images.url_schemes == () and cfg.images.roots == (tmp_path / "job" / "inputs",)
    assert cfg.offline and cfg.stop_grace_s == 0
    catalog = pd.read_parquet(job.catalog).iloc[0]
    assert catalog.prompt == row.generate_prompt  # enhance's recorded answer, not the base prompt
    assert not (tmp_path / "elsewhere").exists() and listener.seen == []


def test_a_url_input_is_never_fetched(photos, listener, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    url = f"{listener.url}/internal-admin"
    provenance["recipe"]["settings"]["images"]["url_schemes"] = ["http"]
    provenance["recipe"]["row"]["image"] = url
    provenance["recipe"]["inputs"]["image"] = {"url": url}
    result = reproduce(rewrite_png(out / row.remove_bg_image_path, tmp_path / "url.png", provenance))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"input image has no recorded sha256 (the URL {url}: reproduce fetches nothing)" in result.output
    assert listener.seen == []


def write_roots(folder: Path, *roots: str) -> Path:
    config = folder / "roots.yaml"
    config.write_text(yaml.safe_dump({"images": {"roots": list(roots)}}))
    return config


def test_inputs_are_read_capped_from_regular_files_only(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    photo = provenance["recipe"]["inputs"]["image"]["path"]
    provenance["recipe"]["inputs"]["image"]["path"] = "/proc/self/pagemap"
    image = rewrite_png(out / row.remove_bg_image_path, tmp_path / "pagemap.png", provenance)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        ([], "input image is recorded at /proc/self/pagemap, which"),  # no images.roots: not read at all
        (["--config", str(write_roots(tmp_path, "/"))], "input image is recorded at /proc/self/pagemap, which is an empty file"),
        (["--input", "image=/proc/self/pagemap"], "input image /proc/self/pagemap reads past its size"),
        (["--input", f"image={fifo}"], f"input image {fifo} is not a regular file: refused unread"),
        (["--input", f"style_image={photo}"], "--input style_image: the image's recipe has no input of that name"),
    ]
    for options, said in cases:
        result = reproduce(image, *options)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (options, result.output)
        assert said in result.output, (options, result.output)
    tracemalloc.start()
    with pytest.raises(Unusable, match="reads past its size"):
        read_capped(Path("/proc/self/pagemap"), 256 * 2**20, "input image")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # one read's worth, not the 256 MB cap (nor the 40 GB it would give)


def test_an_input_without_a_recorded_hash_is_refused_even_when_named(photos, tmp_path: Path):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    photo = provenance["recipe"]["inputs"]["image"]["path"]
    provenance["recipe"]["inputs"]["image"]["sha256"] = None
    image = rewrite_png(out / row.remove_bg_image_path, tmp_path / "unhashed.png", provenance)
    for options in ([], ["--input", f"image={photo}"], ["--config", str(write_roots(tmp_path, str(REPO)))]):
        result = reproduce(image, *options)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "input image has no recorded sha256: refused" in result.output


# --- malformed recipes: one line, before anything runs ----------------------------------------------


@pytest.mark.parametrize("change, said", [
    (lambda r: r.update(inputs=[{"path": "/etc/hostname"}]), "its recipe's inputs is a list, not a mapping"),
    (lambda r: r.update(settings=["generate", "steps"]), "its recipe's settings is a list, not a mapping"),
    (lambda r: r.update(models={"remove_bg": ["tiny:rembg"]}), "its recipe's models.remove_bg is a list, not a mapping"),
    (lambda r: r.update(stages="remove_bg"), "its recipe's stages are not a list of stage names"),
    # a setting a configuration refuses: named, and said to come from the recipe (not a temporary file)
    (lambda r: r["settings"]["remove_bg"].update(min_coverage=7),
     "remove_bg.min_coverage: Input should be less than or equal to 1 (from the image's recipe)"),
    (lambda r: r["settings"].update(profile="sd99"), "profile: Input should be 'tiny', 'tiny-sdxl', 'sd15' or 'sdxl' "
                                                     "(from the image's recipe)"),
    (lambda r: r["row"].update(seed=-5), "its recipe's row cannot be run here (the image's recipe): column 'seed'"),
])
def test_a_malformed_recipe_is_refused_in_one_line(photos, local, tmp_path: Path, change, said: str):
    out, row = photos
    provenance = read_provenance(out / row.remove_bg_image_path)
    change(provenance["recipe"])
    result = reproduce(rewrite_png(out / row.remove_bg_image_path, tmp_path / "malformed.png", provenance), *local)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert said in result.output
    assert "catalogen-reproduce-" not in result.output and "config.yaml" not in result.output


@pytest.mark.parametrize("change, said", [
    ({"name": "Main Image!"}, "name: name 'Main Image!': use 1-40 lower-case letters"),
    ({"size": 10**9}, "size: Input should be less than or equal to"),
    ({"format": "gif"}, "format: Input should be 'png', 'jpeg', 'webp' or 'avif'"),
])
def test_a_renditions_bad_settings_are_refused_before_anything_runs(photos, local, tmp_path: Path, change, said: str):
    from catalogen.run.reproduce import rebuild

    out, row = photos
    provenance = read_provenance(out / row["renditions_marketplace-main_path"])
    provenance["rendition"].update(change)
    (tmp_path / "job").mkdir()
    with pytest.raises(Unusable, match="its rendition settings are not valid") as refused:
        rebuild(out / row.remove_bg_image_path, provenance, tmp_path / "job")
    assert said in str(refused.value)
    assert not any((tmp_path / "job").iterdir())  # refused before a file of the re-run was written
    image = rewrite_png(out / row.remove_bg_image_path, tmp_path / "rendition.png", provenance)
    result = reproduce(image, *local)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert said in result.output


# --- stopping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code, after", [
    (signal.SIGTERM, 143, "inputs/*"),  # while it prepares: its input already copied into the temporary folder
    (signal.SIGINT, 130, "out/run.json"),  # while the flow runs
], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_reproduction_exits_as_signalled_and_leaves_no_temporary_folder(
        photos, local, tmp_path: Path, signum: signal.Signals, code: int, after: str):
    out, row = photos
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([str(BIN / "catalogen"), "reproduce", str(out / row.upscale_image_path), *local],
                            env={**cli_env(), "TMPDIR": str(temp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not any(temp.glob(f"catalogen-reproduce-*/{after}")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert f"stopped by {signum.name}: nothing compared; the temporary folder is removed" in stderr
    assert "different" not in stdout + stderr and "Traceback" not in stderr
    assert list(temp.iterdir()) == []
