"""Degenerate is not ok: a fallback prompt or a degenerate caption is counted by summarize(), shown
with its reason in the report, and kept out of a training export unless asked for; the export and the
report's gallery reach remove_bg's marketplace canvas; catalog markup shows in the report as text.

The run folder is written here (results.parquet with the columns the stages write, real PNGs,
run.json), so each case is exact and the tests need no model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalogen.publish.export import ExportError, ExportOptions, export_run
from catalogen.storage.hashing import sha256_file
from catalogen.publish.report import write_report
from catalogen.run.results import error_reason, summarize

STAGES = ("enhance", "generate", "remove_bg", "caption")
MARKUP = '<b>bold</b> <script>window.injected = 1</script> "><img src=x onerror="window.injected = 2">'


def _png(folder: Path, name: str, colour: str) -> tuple[str, str]:
    path = folder / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path.relative_to(folder).as_posix(), sha256_file(path)


def write_run(folder: Path, rows: list[dict]) -> Path:
    """A run folder of enhance -> generate -> remove_bg -> caption; each row dict sets `id`, `prompt`,
    and optionally `enhance` / `caption` (status, error), `caption_text`, `failed` (generate's error)."""
    folder.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {}

    def put(name: str, value) -> None:
        columns.setdefault(name, []).append(value)

    for i, row in enumerate(rows):
        failed = row.get("failed")
        enhance = row.get("enhance", ("ok", None))
        caption = row.get("caption", ("ok", None)) if not failed else ("skipped", "generate failed")
        cutout, cutout_sha = _png(folder, f"cutout-{i}", "red")
        canvas, canvas_sha = _png(folder, f"canvas-{i}", "white")
        put("id", row["id"])
        put("prompt", row["prompt"])
        put("variant", 0)
        put("status", "failed" if failed else "ok")
        put("error", f"generate: {failed}" if failed else None)
        put("stage", "generate" if failed else "caption")
        for column, value in (("path", cutout), ("sha256", cutout_sha), ("width", 32), ("height", 32)):
            put(f"image_{column}", None if failed else value)
            put(f"remove_bg_image_{column}", None if failed else value)
            put(f"generate_image_{column}", None if failed else value)
            put(f"remove_bg_canvas_{column}", None if failed else {"path": canvas, "sha256": canvas_sha}.get(column, 32))
        for stage, (status, error) in (("enhance", enhance), ("generate", ("failed", failed) if failed else ("ok", None)),
                                       ("remove_bg", ("skipped", "generate failed") if failed else ("ok", None)),
                                       ("caption", caption)):
            put(f"{stage}_status", status)
            put(f"{stage}_error", error)
            put(f"{stage}_key", f"{stage}-{i}")
        put("enhance_prompt", row["prompt"])
        put("caption_caption", None if failed else row.get("caption_text", f"a photo of thing {i}"))
    types = {name: pa.int32() for name in columns if name.endswith(("_width", "_height"))}
    table = pa.table({name: pa.array(values, types.get(name)) for name, values in columns.items()})
    pq.write_table(table, folder / "results.parquet")
    (folder / "run.json").write_text(json.dumps({"config": {"stages": list(STAGES)}}))
    return folder


ROWS = [
    {"id": "good", "prompt": "a red mug"},
    {"id": "echo", "prompt": "a blue mug", "caption": ("degenerate", "'mug' repeated 3+ times in a row"),
     "caption_text": "mug mug mug"},
    {"id": "parrot", "prompt": "a green mug", "enhance": ("fallback", "unparsable answer: no label")},
    {"id": "broken", "prompt": "a black mug", "failed": "CUDA out of memory"},
]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", ROWS)


def test_summarize_counts_fallback_and_degenerate_rows_with_their_reasons(run_dir: Path):
    summary = summarize(pq.read_table(run_dir / "results.parquet"), STAGES)
    assert (summary["ok"], summary["failed"], summary["fallback"], summary["degenerate"]) == (3, 1, 1, 1)
    assert summary["reasons"] == {
        "generate: CUDA out of memory": 1,
        "caption degenerate: '…' repeated 3+ times in a row": 1,
        "enhance fallback: unparsable answer: no label": 1,
    }


def test_the_outcome_line_says_what_its_notes_mean():
    from flows.run import outcome_line

    summary = {"rows": 25, "ok": 24, "fallback": 2, "degenerate": 12, "failed": 1, "skipped": 0}
    assert outcome_line(summary) == ("25 rows: 24 ok (2 fallback: LLM answers that could not be used, the prompt kept "
                                     "as given; 12 degenerate: captions flagged as useless), 1 failed, 0 skipped")
    assert outcome_line({**summary, "fallback": 0, "degenerate": 0}) == "25 rows: 24 ok, 1 failed, 0 skipped"
    from catalogen.models.tiny.profile import profile_note

    assert "--profile sdxl" in profile_note("tiny-sdxl") and profile_note("sd15") is None


def test_summary_reasons_are_trimmed_for_one_line(tmp_path: Path):
    rows = [{"id": "a", "prompt": "p", "caption": ("degenerate", "word " * 100), "caption_text": "x"}]
    reasons = summarize(pq.read_table(write_run(tmp_path / "run", rows) / "results.parquet"), STAGES)["reasons"]
    assert [len(reason) for reason in reasons] == [120]


def _index(run_dir: Path) -> dict:
    text = (run_dir / "report-data" / "index.js").read_text()
    return json.loads(text.removeprefix("window.catalogenReport = ").rstrip().rstrip(";"))


def test_the_report_counts_degenerate_and_fallback_rows_and_shows_their_reasons(tmp_path: Path):
    clean_rows = [row for row in ROWS if "failed" not in row]  # no failure: only notes
    run_dir = write_run(tmp_path / "run", clean_rows)
    html = write_report(run_dir).read_text()
    assert 'id="no-errors"' not in html and "No row carries an error" not in html
    assert '<span class="n" id="count-degenerate">1</span>' in html
    assert '<span class="n" id="count-fallback">1</span>' in html
    assert "caption degenerate: &#39;…&#39; repeated 3+ times in a row" in html
    assert "enhance fallback: unparsable answer: no label" in html
    index = _index(run_dir)
    reasons = [item["reason"] for item in index["reasons"]]
    assert [reasons[k] if k >= 0 else None for k in index["reasonOf"]] == [
        None, "caption degenerate: '…' repeated 3+ times in a row", "enhance fallback: unparsable answer: no label"]


def test_the_report_gallery_shows_the_marketplace_canvas(run_dir: Path):
    write_report(run_dir)
    index = _index(run_dir)
    assert index["imageStages"] == ["generate", "remove_bg", "remove_bg.canvas"]
    chunk = (run_dir / "report-data" / "rows-00000.js").read_text()
    row = json.loads(chunk.split("] = ", 1)[1].rstrip().rstrip(";"))[0]
    canvas = pq.read_table(run_dir / "results.parquet").to_pylist()[0]
    assert row["img"][2]["src"] == canvas["remove_bg_canvas_path"]
    assert (run_dir / row["img"][2]["thumb"]).is_file()


def _texts(out: Path) -> dict[str, str]:
    return {path.stem: path.read_text() for path in out.glob("train/*/*.txt")}


def test_export_leaves_out_degenerate_captions_unless_asked(run_dir: Path, tmp_path: Path):
    manifest = export_run(run_dir, tmp_path / "default", ExportOptions(format="imagefolder"))
    assert manifest["rows"] == 2 and manifest["excluded"]["degenerate_text"] == 1
    texts = _texts(tmp_path / "default")
    assert "mug mug mug" not in texts.values() and len(texts) == 2

    manifest = export_run(run_dir, tmp_path / "all", ExportOptions(format="imagefolder", include_degenerate=True))
    assert manifest["rows"] == 3 and "mug mug mug" in _texts(tmp_path / "all").values()
    assert manifest["options"]["include_degenerate"] is True


def test_include_degenerate_through_the_cli(run_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from catalogen.cli import app

    for flags, rows, left_out in (([], 2, "1 degenerate_text"), (["--include-degenerate"], 3, None)):
        out = tmp_path / f"export{len(flags)}"
        result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "imagefolder", "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rows"] == rows and manifest["options"]["include_degenerate"] is bool(flags)
        assert (left_out in result.output) if left_out else "degenerate_text" not in result.output
        assert ("mug mug mug" in _texts(out).values()) is bool(flags)


def test_export_can_take_the_marketplace_canvas(run_dir: Path, tmp_path: Path):
    out = tmp_path / "canvas"
    manifest = export_run(run_dir, out, ExportOptions(format="imagefolder", image_stage="remove_bg.canvas"))
    assert manifest["image_column"] == "remove_bg_canvas_path"
    for image in out.glob("train/*/*.png"):
        assert Image.open(image).getpixel((0, 0)) == (255, 255, 255)  # the white canvas, not the red cut-out
    assert len(list(out.glob("train/*/*.png"))) == 2
    with pytest.raises(ExportError, match=r"--image-stage style: .* \(stages with images: generate, remove_bg, remove_bg.canvas\)"):
        export_run(run_dir, tmp_path / "none", ExportOptions(format="hf", image_stage="style"))


# --- catalog markup in the report is text ---------------------------------------------------------

MARKUP_ROWS = [{"id": f"sku {MARKUP}", "prompt": f"a mug {MARKUP}", "caption_text": f"caption {MARKUP}"},
               {"id": "bad", "prompt": "p", "failed": f"could not read {MARKUP}"}]


MARKUP_REASON = error_reason(f"generate: could not read {MARKUP}")


def test_catalog_markup_is_escaped_in_the_report_page(tmp_path: Path):
    html = write_report(write_run(tmp_path / "run", MARKUP_ROWS)).read_text()
    assert "<b>bold" not in html and "<script>window.injected" not in html
    assert "&lt;b&gt;bold" in html and "&lt;script&gt;window.injected" in html  # the failed row's reason, as text


CHROMIUM = os.environ.get("CATALOGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason=f"no Chromium at {CHROMIUM}")
def test_catalog_markup_shows_as_text_in_the_browser(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    from test_report import CHROMIUM_ARGS  # noqa: PLC0415 - the same browser settings as the report tests

    html = write_report(write_run(tmp_path / "run", MARKUP_ROWS))
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(html.resolve().as_uri())
        page.wait_for_selector("body[data-rendered]", timeout=60_000)
        card = page.locator("article.row").first
        assert card.get_attribute("data-id") == f"sku {MARKUP}"
        text = card.text_content()
        assert f"a mug {MARKUP}" in text and f"caption {MARKUP}" in text
        assert page.locator("#rows b, #rows script, #rows img[onerror], #reasons b, #reasons img[onerror]").count() == 0
        assert MARKUP_REASON in page.locator("#reasons").text_content()
        assert page.evaluate("window.injected") is None
        browser.close()
