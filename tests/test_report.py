"""report.html in a real headless Chromium (Debian's, driven by Playwright), opened from file://.

Chromium comes from the system (`apt-get install chromium`; .ci/run installs it), never from
`playwright install`. Without it these tests are skipped, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAST, prompts, write_catalog
from PIL import Image

from catalogen.config import load_config
from catalogen.storage.hashing import sha256_file
from catalogen.media.pngmeta import read_png_text
from catalogen.publish.report import THUMB_DIR, error_reason, write_report
from catalogen.run.plan import prepare
from flows.run import artifact_key, catalogen_run, run_summary

CHROMIUM = os.environ.get("CATALOGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
BIG = 100_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's `chromium` package")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

playwright = pytest.importorskip("playwright.sync_api")


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """A real flow run of 8 rows, one of which fails (a folder sits where its image would go)."""
    tmp = tmp_path_factory.mktemp("report-run")
    catalog = write_catalog(tmp / "catalog.parquet", prompts(8))
    out = tmp / "out"
    overrides = {**FAST, "rows_per_shard": 3}
    plan = prepare(catalog, load_config(None, overrides), out)
    planned = plan.planned["generate"].to_pylist()[4]
    (out / plan.store.image_path("generate", planned["id"], planned["variant"], planned["key"])).mkdir(parents=True)
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
    summary = run_summary(state)
    assert (summary["ok"], summary["failed"]) == (7, 1), summary
    return out, summary, planned["id"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium with a fresh profile folder for the module's pages."""
    with playwright.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


class Page:
    """A browser page that records every console error, page error and failed request."""

    def __init__(self, context) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", self._page_error)
        self.page.on("requestfailed", self._request_failed)

    def _console(self, message) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console {message.type}: {message.text}")

    def _page_error(self, error) -> None:
        self.errors.append(f"page error: {error}")

    def _request_failed(self, request) -> None:
        self.errors.append(f"request failed: {request.url} {request.failure}")

    def open(self, html: Path, fragment: str = "") -> float:
        """Seconds from navigation to the first page of rows drawn."""
        started = time.monotonic()
        self.page.goto(html.resolve().as_uri() + fragment)
        self.rendered()
        return time.monotonic() - started

    def rendered(self) -> None:
        self.page.wait_for_selector("body[data-rendered]", timeout=60_000)

    def choose(self, select: str, value: str) -> None:
        """Pick a filter value and wait until the page has been drawn again."""
        before = self.page.get_attribute("body", "data-rendered")
        self.page.select_option(select, value)
        self.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")

    def click(self, selector: str) -> None:
        before = self.page.get_attribute("body", "data-rendered")
        self.page.click(selector)
        self.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")

    def shown_ids(self) -> list[str]:
        return self.page.eval_on_selector_all("article.row", "cards => cards.map(c => c.dataset.id)")

    def text(self, selector: str) -> str:
        return self.page.text_content(selector).strip()


# --- the report of a real run ---------------------------------------------------------------------


def test_the_flow_writes_a_report_that_opens_from_file(failed_run, browser, tmp_path: Path):
    out, summary, failed_id = failed_run
    html = out / "report.html"
    assert summary["report"] == str(html) and html.exists()
    results = pq.read_table(out / "results.parquet").to_pandas().set_index("id")
    ok = results[results.status == "ok"]

    # One thumbnail per ok image, named by the image's sha256.
    assert sorted(p.name for p in (out / THUMB_DIR).iterdir()) == sorted(f"{s}.webp" for s in ok.generate_image_sha256)
    with Image.open(out / THUMB_DIR / f"{ok.generate_image_sha256.iloc[0]}.webp") as thumb:
        assert thumb.format == "WEBP" and thumb.size == (32, 32)  # never enlarged

    page = Page(browser)
    seconds = page.open(html)
    print(f"\n8-row report: first page drawn in {seconds:.2f} s")
    assert page.text("#count-rows") == "8" and page.text("#count-failed") == "1"
    assert page.shown_ids() == list(results.index)
    thumbs = page.page.eval_on_selector_all(
        "article.row img.thumb", "imgs => imgs.map(i => [i.closest('article').dataset.id, i.getAttribute('src'), i.loading])")
    assert sorted(thumbs) == sorted([rid, f"thumbs/{sha}.webp", "lazy"] for rid, sha in ok.generate_image_sha256.items())
    page.page.wait_for_function("document.querySelector('img.thumb').naturalWidth > 0")
    assert page.page.locator(f"article[data-id='{failed_id}'] .placeholder").count() == 1
    assert "could not write image" in page.text(f"article[data-id='{failed_id}'] dd.error")

    # The parameters line is the text the PNG carries, for every row that has an image.
    lines = dict(page.page.eval_on_selector_all(
        "article.row", "cards => cards.map(c => [c.dataset.id, c.querySelector('pre.parameters').textContent])"))
    for rid, row in ok.iterrows():
        assert lines[rid] == read_png_text(str(out / row.generate_image_path))["parameters"]
    assert f"Seed: {results.loc[failed_id, 'generate_seed']}" in lines[failed_id]  # seeds keep all 64 bits
    assert page.text(f"article[data-id='{failed_id}'] .seed") == f"seed {results.loc[failed_id, 'generate_seed']}"

    # The error reasons, counted over the run.
    reasons = page.page.eval_on_selector_all("#reasons tbody tr", "trs => trs.map(t => t.textContent.trim())")
    assert len(reasons) == 1 and reasons[0].startswith("1") and "could not write image" in reasons[0]

    # Filters: failed shows only the failed row, ok hides it; by stage; by reason.
    page.choose("#filter-status", "failed")
    assert page.shown_ids() == [failed_id]
    assert page.text("#shown") == "rows 1–1 of 1 (filtered from 8)"
    assert "status=failed" in page.page.url
    page.choose("#filter-status", "ok")
    assert page.shown_ids() == list(ok.index)
    page.choose("#filter-stage", "generate")
    assert page.shown_ids() == list(ok.index)
    page.choose("#filter-status", "skipped")
    assert page.shown_ids() == [] and page.text("#shown") == "no row matches"
    page.click("button.reason")
    assert page.shown_ids() == [failed_id]

    # The copy button puts the parameters on the clipboard.
    browser.grant_permissions(["clipboard-read", "clipboard-write"])
    page.page.click(f"article[data-id='{failed_id}'] button.copy")
    page.page.wait_for_function("document.querySelector('button.copy').textContent === 'copied'")
    assert page.page.evaluate("navigator.clipboard.readText()") == lines[failed_id]

    # A link with the filter in its #fragment opens filtered.
    again = Page(browser)
    again.open(html, "#status=failed")
    assert again.shown_ids() == [failed_id]

    page.page.screenshot(path=str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert page.errors == [] and again.errors == []


def test_writing_the_report_again_reuses_thumbnails(failed_run):
    from typer.testing import CliRunner

    from catalogen.cli import app

    out, _, _ = failed_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / THUMB_DIR).iterdir()}
    result = CliRunner().invoke(app, ["report", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html")
    assert {p.name: p.stat().st_mtime_ns for p in (out / THUMB_DIR).iterdir()} == before


def test_report_of_a_folder_without_results_is_refused(tmp_path: Path):
    from typer.testing import CliRunner

    from catalogen.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a catalogen run folder (no run.json)" in result.output
    assert list(tmp_path.iterdir()) == []  # not even a lock file


def _artifact_data(key: str):
    """The newest artifact under `key`, read with Prefect's sync client (Artifact.get turns into a
    coroutine while Playwright's event loop runs in this thread)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.UPDATED_DESC, limit=1)
    assert found, f"no artifact {key}"
    return found[0].data


def test_the_run_leaves_prefect_artifacts(failed_run):
    out, _, _ = failed_run
    key = artifact_key(out)
    rows = _artifact_data(f"{key}-stages")
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [(r["stage"], r["ok"], r["failed"], r["skipped"]) for r in rows] == [("generate", 7, 1, 0)]
    assert (out / "report.html").resolve().as_uri() in _artifact_data(f"{key}-report")
    assert float(_artifact_data(f"{key}-progress")) == 100.0


# --- a large run: paging ----------------------------------------------------------------------------


def _big_results(folder: Path, images: int = 5) -> pa.Table:
    """BIG synthetic rows (every 10th failed) pointing at a handful of real image files."""
    paths, shas = [], []
    for k in range(images):
        relative = f"images/generate/{k:02d}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (40 * k, 90, 200 - 30 * k)).save(folder / relative)
        paths.append(relative)
        shas.append(sha256_file(folder / relative))
    failed = [i % 10 == 3 for i in range(BIG)]
    status = ["failed" if f else "ok" for f in failed]
    error = [f"generate: RuntimeError: out of memory in row {i}" if f else None for i, f in enumerate(failed)]
    return pa.table({
        "id": [f"row-{i}" for i in range(BIG)],
        "prompt": [f"a product photo number {i}" for i in range(BIG)],
        "variant": pa.array([0] * BIG, pa.int32()),
        "status": status,
        "error": error,
        "stage": ["generate"] * BIG,
        "generate_key": [f"{i:064x}" for i in range(BIG)],
        "generate_seed": pa.array(range(BIG), pa.int64()),
        "generate_status": status,
        "generate_error": [e.removeprefix("generate: ") if e else None for e in error],
        "generate_seconds": [0.5] * BIG,
        "generate_device": ["cuda:0"] * BIG,
        "generate_image_path": [None if f else paths[i % images] for i, f in enumerate(failed)],
        "generate_image_sha256": [None if f else shas[i % images] for i, f in enumerate(failed)],
        "generate_image_width": pa.array([None if f else 64 for f in failed], pa.int32()),
        "generate_image_height": pa.array([None if f else 48 for f in failed], pa.int32()),
    })


def test_a_100k_row_report_pages(browser, tmp_path: Path):
    out = tmp_path / "big"
    out.mkdir()
    pq.write_table(_big_results(out), out / "results.parquet")
    started = time.monotonic()
    html = write_report(out)
    print(f"\n{BIG}-row report written in {time.monotonic() - started:.1f} s, "
          f"{sum(p.stat().st_size for p in (out / 'report-data').iterdir()) / 2**20:.1f} MB of row data")
    assert len(list((out / THUMB_DIR).iterdir())) == 5  # one per distinct image, not per row
    assert html.stat().st_size < 100_000  # the rows are not in the HTML

    page = Page(browser)
    seconds = page.open(html)
    print(f"{BIG}-row report: first page drawn in {seconds:.2f} s")
    assert page.text("#shown") == "rows 1–100 of 100,000"
    assert page.shown_ids() == [f"row-{i}" for i in range(100)]
    assert page.page.locator("img.thumb").count() == 90
    assert page.text("#page-count") == "1,000"

    page.click("#page-last")
    assert page.text("#shown") == "rows 99,901–100,000 of 100,000"
    assert page.shown_ids()[-1] == "row-99999"
    assert page.page.is_disabled("#page-next")
    page.page.fill("#page-number", "437")
    before = page.page.get_attribute("body", "data-rendered")
    page.page.press("#page-number", "Enter")
    page.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")
    assert page.shown_ids()[0] == "row-43600"

    page.choose("#filter-status", "failed")
    assert page.text("#shown") == "rows 1–100 of 10,000 (filtered from 100,000)"
    assert page.shown_ids()[:2] == ["row-3", "row-13"]
    page.click("#page-next")
    assert page.shown_ids()[0] == "row-1003"
    assert page.errors == []
    page.page.screenshot(path=str(tmp_path / "report-100k.png"))


def test_error_reasons_count_equal_causes_together():
    first = error_reason("generate: could not write image: [Errno 21] Is a directory: '/a/b.tmp' -> '/a/b.png'")
    second = error_reason("generate: could not write image: [Errno 21] Is a directory: '/c/d.tmp' -> '/c/d.png'")
    assert first == second == "generate: could not write image: [Errno 21] Is a directory: '…' -> '…'"
    assert error_reason("caption: no such file /data/x/123.png") == "caption: no such file …"
    assert error_reason("enhance: model answered 123456 tokens, key 9f86d081884c7d65") == \
        "enhance: model answered … tokens, key …"
    assert error_reason("generate: CUDA out of memory") != error_reason("generate: image withheld")


def test_a_row_of_a_chained_run_shows_both_prompts_the_caption_and_each_image():
    from catalogen.publish.report import row_record

    row = {
        "id": "sku-1", "variant": 0, "status": "ok", "stage": "caption", "error": None, "prompt": "red shoe",
        "enhance_source_prompt": "red shoe", "enhance_prompt": "a red leather shoe, studio light",
        "enhance_status": "fallback", "enhance_error": "the answer was not a prompt; kept the input",
        "generate_prompt": "a red leather shoe, studio light", "generate_seed": 2**63 - 1, "generate_status": "ok",
        "generate_image_path": "images/generate/a.png", "generate_image_sha256": "a" * 64,
        "generate_image_width": 64, "generate_image_height": 64,
        "upscale_status": "skipped", "upscale_error": "the row asks for no upscale",
        "upscale_image_path": None, "upscale_image_sha256": None,
        "caption_status": "ok", "caption_caption": "a red shoe on white",
    }
    record = row_record(row, ["enhance", "generate", "upscale", "caption"], ["generate", "upscale"], {"a" * 64})
    assert (record["before"], record["after"]) == ("red shoe", "a red leather shoe, studio light")
    assert record["cap"] == "a red shoe on white"
    assert record["seed"] == str(2**63 - 1)  # text: JavaScript numbers would round it
    assert record["ss"] == ["fallback", "ok", "skipped", "ok"]
    assert record["se"] == {"enhance": "the answer was not a prompt; kept the input", "upscale": "the row asks for no upscale"}
    assert record["img"] == [{"src": "images/generate/a.png", "thumb": f"thumbs/{'a' * 64}.webp", "w": 64, "h": 64}, None]
    assert "par" not in record  # no generate parameters recorded: no line to copy


# --- markup in the data ---------------------------------------------------------------------------


def _pwn(n: int) -> str:
    """Markup that, if it ever became markup, would run: it sets window.__pwned (no quotes or slashes,
    which the reasons' counting would blank)."""
    return f"<img src=x onerror=window.__pwned={n}>"


def _hostile_run(folder: Path) -> dict[str, str]:
    """A run folder whose ids, failure reason, near-duplicate group, model, catalog and own name are
    markup: 3 rows, row 2 a near-duplicate of row 0, row 1 failed. Returns the markup by place."""
    marks = {"id": _pwn(1), "reason": f"generate: {_pwn(2)} broke", "duplicate": "<svg onload=window.__pwned=3>",
             "model": "<script>window.__pwned=4</script>", "catalog": f"{_pwn(5)}.parquet",
             "folder": folder.name, "dialog": "<img src=x onerror=alert(6)>"}
    image = folder / "images" / "generate" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    sha = sha256_file(image)
    path = str(image.relative_to(folder))
    ok = [True, False, True]
    table = pa.table({
        "id": [marks["id"], marks["dialog"], marks["duplicate"]],
        "prompt": ["a red square", "a second square", "a red square again"],
        "variant": pa.array([0, 0, 0], pa.int32()),
        "status": ["ok", "failed", "ok"],
        "error": [None, marks["reason"], None],
        "stage": ["generate"] * 3,
        "generate_key": ["a" * 64, "b" * 64, "c" * 64],
        "generate_seed": pa.array([1, 2, 3], pa.int64()),
        "generate_status": ["ok", "failed", "ok"],
        "generate_error": [None, marks["reason"].removeprefix("generate: "), None],
        "generate_seconds": [0.1] * 3,
        "generate_device": ["cpu"] * 3,
        "generate_image_path": [path if k else None for k in ok],
        "generate_image_sha256": [sha if k else None for k in ok],
        "generate_image_width": pa.array([32 if k else None for k in ok], pa.int32()),
        "generate_image_height": pa.array([32 if k else None for k in ok], pa.int32()),
        "image_path": [path if k else None for k in ok],
        "image_sha256": [sha if k else None for k in ok],
        "phash": ["0" * 16, None, "0" * 16],
        "near_duplicate_of": [None, None, marks["id"]],
        "near_duplicate_of_variant": pa.array([None, None, 0], pa.int32()),
        "near_duplicate_distance": pa.array([None, None, 0], pa.int32()),
    })
    from catalogen.media.duplicates import METADATA_KEY

    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps({"max_distance": 4})}),
                   folder / "results.parquet")
    identity = {"repo": marks["model"], "revision": marks["model"]}
    (folder / "run.json").write_text(json.dumps({
        "catalog": {"path": marks["catalog"], "ids": 3, "rows": 3},
        "config": {"stages": ["generate"], "generate": {"scheduler": marks["model"]}},
        "models": {"generate": {"pipeline": identity}}, "versions": {"python": marks["model"]},
        "invocations": [{"started_at": "2025-01-01T00:00:00+00:00"}],
    }))
    return marks


def test_markup_in_ids_reasons_and_groups_shows_as_text_and_never_runs(browser, tmp_path: Path):
    folder = tmp_path / _pwn(7)
    folder.mkdir()
    marks = _hostile_run(folder)
    html = write_report(folder)
    page = Page(browser)
    dialogs: list[str] = []
    page.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.open(html)
    page.page.wait_for_function("document.querySelectorAll('article.row').length === 3")
    page.page.wait_for_timeout(500)  # an onerror of a broken image fires after its failed load
    assert page.page.evaluate("window.__pwned") is None and dialogs == []
    assert page.page.locator("#summary img:not(.thumb), #rows img:not(.thumb), svg, #summary script").count() == 0
    text = page.page.inner_text("body")
    for place, mark in marks.items():
        assert mark in text, place  # the markup itself, as text
    assert page.page.inner_text("#reasons").count(marks["reason"]) == 1
    assert [marks["id"], marks["duplicate"]] == page.page.eval_on_selector_all(
        "#near-duplicates .dup-id", "spans => spans.map(s => s.textContent)")
    assert page.shown_ids() == [marks["id"], marks["dialog"], marks["duplicate"]]
    assert page.errors == []
