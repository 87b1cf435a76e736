"""`catalogen review`: the page in a real headless Chromium (Debian's, driven by Playwright), the
server as users start it (the CLI, a subprocess), decisions checked on disk (decisions.read,
state.current), not only on the page.

One tiny run of 4 ids x 3 variants is made once for the module; tests that change the folder
beyond decisions work on a copy. The whole loop (4 variants scored, ranked, gated, decided) makes its own. The bucket case uses test_object_storage's moto S3 server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from conftest import BIN, FAST, cli_env, write_catalog
from PIL import Image

from catalogen.review import decisions
from catalogen.review.decisions import Decision
from catalogen.review.state import current
from catalogen.storage.store import RunStore
from flows.run import catalogen_run, run_summary
from test_object_storage import s3  # noqa: F401 - the module's moto S3 server, a fixture

CHROMIUM = os.environ.get("CATALOGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
IDS = ["cup", "hostile", "lamp", "chair"]
VARIANTS = 3

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's `chromium` package")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real flow run: 4 ids x 3 variants, 32x32 images."""
    tmp = tmp_path_factory.mktemp("review-run")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp / "photo.png")  # a catalog photo (see the reload test)
    catalog = write_catalog(tmp / "catalog.parquet", {"id": IDS, "prompt": ["a red cup", HOSTILE, "a desk lamp", "a wooden chair"]})
    out = tmp / "out"
    overrides = {**FAST, "num_variants": VARIANTS, "stages": ["generate"]}
    state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
    assert run_summary(state)["ok"] == len(IDS) * VARIANTS
    return out


class Server:
    """`catalogen review RUN --port 0` in a subprocess: its URL from the one line it prints."""

    def __init__(self, folder: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([str(BIN / "catalogen"), "review", str(folder), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env())
        self.line = self.proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:(\d+))/\?token=(\S+)", self.line)
        assert found, (self.line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url, self.port, self.token = found.group(0), found.group(2), found.group(3)
        self.base = found.group(1)

    def request(self, path: str, body: dict | bytes | None = None, token: str | None = "own",
                content_type: str = "application/json") -> tuple[int, bytes]:
        headers = {}
        if token:
            headers["Cookie"] = f"catalogen_review_{self.port}={self.token if token == 'own' else token}"
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def products(self, **query: str) -> dict:
        status, body = self.request("/api/products?" + "&".join(f"{k}={v}" for k, v in query.items()))
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a person stops it: its exit code and what it wrote to stderr."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def serve(servers: list[Server], folder: Path | str, *args: str, **kwargs) -> Server:
    server = Server(folder, *args, **kwargs)
    servers.append(server)
    return server


@pytest.fixture(scope="module")
def chromium():
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A review page in its own browser context (its own cookies), recording page errors. The page's
    Content-Security-Policy is bypassed: the waits evaluate strings, and escaping must hold without it."""

    def __init__(self, chromium, server: Server) -> None:
        self.context = chromium.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(server.url)
        self.drawn()

    def drawn(self) -> None:
        self.page.wait_for_selector("body[data-rendered]", timeout=30_000)

    def shown(self) -> str:
        return self.page.get_attribute("#detail", "data-id")

    def go_to(self, row_id: str) -> None:
        while self.shown() != row_id:
            self.key("j")

    def key(self, key: str) -> None:
        before = self.page.get_attribute("body", "data-rendered")
        self.page.keyboard.press(key)
        self.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")

    def decide(self, key: str, text: str | None = None) -> str:
        """Press a decision's key (typing its reason or note), wait for the answer; the status line."""
        before = self.page.get_attribute("body", "data-rendered")
        self.page.keyboard.press(key)
        if text is not None:
            self.page.wait_for_selector("#ask:not([hidden])")
            self.page.keyboard.type(text)
            self.page.keyboard.press("Enter")
        self.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")
        return self.page.text_content("#status")

    def listed_states(self) -> dict[str, str]:
        return dict(self.page.eval_on_selector_all("#list li", "lis => lis.map(l => [l.dataset.id, l.dataset.state])"))

    def close(self) -> None:
        self.context.close()


def states(folder: Path | str) -> dict[tuple[str, int], tuple]:
    table = current(RunStore(folder))
    return {(r["id"], r["variant"]): (r["review_state"], r["review_reason"], r["review_by"], r["selected"])
            for r in table.select(["id", "variant", "review_state", "review_reason", "review_by", "selected"]).to_pylist()}


def standing(folder: Path | str) -> dict[str, Decision]:
    return decisions.latest(decisions.read(RunStore(folder)))


def fresh_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("review", ".lock"))
    return copy


# --- the page, by keyboard ------------------------------------------------------------------------


def test_keyboard_decisions_are_written_at_once_and_a_reload_keeps_them(run, chromium, servers, tmp_path):
    folder = fresh_copy(run, tmp_path)
    server = serve(servers, folder, "--reviewer", "alice <b>")
    page = Page(chromium, server)
    assert page.page.text_content("#reviewer") == "alice <b>"  # escaped, not markup
    assert page.shown() == "cup" and list(page.listed_states()) == IDS

    assert "saved by alice <b>" in page.decide("a")
    assert standing(folder)["cup"].decision == "approve"
    assert states(folder)[("cup", 0)][:3] == ("approved", None, "alice <b>")

    page.key("j")
    assert page.shown() == "hostile"
    page.decide("r", "label is wrong")
    assert (standing(folder)["hostile"].decision, standing(folder)["hostile"].reason) == ("reject", "label is wrong")
    assert states(folder)[("hostile", 0)][:3] == ("rejected", "label is wrong", "alice <b>")
    assert page.page.text_content("#product-reason") == "label is wrong"

    page.key("j")
    page.decide("3")  # the third candidate: variant 2 ships
    chosen = standing(folder)["lamp"]
    assert (chosen.decision, chosen.variant) == ("choose", 2)
    after = states(folder)
    assert after[("lamp", 2)][0] == "approved" and after[("lamp", 2)][3] is True
    assert [after[("lamp", v)][0] for v in (0, 1)] == ["alternate", "alternate"]
    assert page.page.get_attribute("#main", "data-variant") == "2"

    page.key("j")
    page.decide("g", "brighter light")
    assert (standing(folder)["chair"].decision, standing(folder)["chair"].note) == ("regenerate", "brighter light")
    assert states(folder)[("chair", 0)][:2] == ("rejected", "regenerate: brighter light")

    # The reject reason typed before is offered again (the run's reasons).
    assert "label is wrong" in page.page.eval_on_selector_all("#reasons option", "os => os.map(o => o.value)")

    page.decide("u")  # takes back the regenerate: chair is as the run left it
    assert "chair" not in standing(folder)
    assert states(folder)[("chair", 0)][:3] == ("approved", None, "default")
    assert page.page.get_attribute("#detail", "data-state") == "approved"

    # The buttons do what the keys do; K goes back.
    before = page.page.get_attribute("body", "data-rendered")
    page.page.click("#actions button[data-key='a']")
    page.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")
    assert (standing(folder)["chair"].decision, standing(folder)["chair"].reviewer) == ("approve", "alice <b>")
    page.key("k")
    assert page.shown() == "lamp"

    # A reload keeps every state, as the folder has it.
    page.page.reload()
    page.drawn()
    on_disk = states(folder)
    expected = {"cup": on_disk[("cup", 0)][0], "hostile": on_disk[("hostile", 0)][0], "lamp": on_disk[("lamp", 2)][0],
                "chair": on_disk[("chair", 0)][0]}
    assert page.listed_states() == expected == {"cup": "approved", "hostile": "rejected", "lamp": "approved",
                                                "chair": "approved"}
    page.go_to("hostile")
    assert page.page.text_content("#product-by").startswith("by alice <b>")

    # The filters: by state, by reason.
    page.page.select_option("#state-filter", "rejected")
    page.page.wait_for_function("document.querySelectorAll('#list li').length === 1")
    assert list(page.listed_states()) == ["hostile"]
    page.page.select_option("#state-filter", "")
    page.page.select_option("#reason-filter", "label is wrong")
    page.page.wait_for_function("document.querySelectorAll('#list li').length === 1")
    assert page.errors == []
    page.close()
    assert server.stop() == (0, "")  # Ctrl-C ends it cleanly: no traceback


def test_a_prompt_holding_script_is_inert_and_shown_as_text(run, chromium, servers):
    server = serve(servers, run)
    page = Page(chromium, server)
    page.go_to("hostile")
    assert page.page.text_content("#prompt-before") == HOSTILE
    assert page.page.evaluate("window.pwned") is None
    assert page.page.eval_on_selector_all("script", "s => s.length") == 1  # the page's own
    assert page.page.eval_on_selector_all("#detail img[src='x']", "s => s.length") == 0
    assert page.errors == []
    page.close()


def test_two_reviewers_at_once_in_two_processes_lose_nothing_and_see_who_decided(run, chromium, servers, tmp_path):
    folder = fresh_copy(run, tmp_path)
    alice, bob = serve(servers, folder, "--reviewer", "alice"), serve(servers, folder, "--reviewer", "bob")
    first, second = Page(chromium, alice), Page(chromium, bob)
    second.go_to("lamp")
    marks = [p.page.get_attribute("body", "data-rendered") for p in (first, second)]
    first.page.keyboard.press("a")  # neither waits for the other's answer
    second.page.keyboard.press("r")
    second.page.keyboard.type("too dark")
    second.page.keyboard.press("Enter")
    for page, mark in zip((first, second), marks):
        page.page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(mark)} "
                                    "&& document.getElementById('status').textContent.includes('saved')")
    kept = standing(folder)
    assert (kept["cup"].decision, kept["cup"].reviewer) == ("approve", "alice")
    assert (kept["lamp"].decision, kept["lamp"].reviewer, kept["lamp"].reason) == ("reject", "bob", "too dark")
    first.page.reload()
    first.drawn()
    first.go_to("lamp")
    assert first.page.get_attribute("#detail", "data-state") == "rejected"
    assert first.page.text_content("#product-by").startswith("by bob")
    first.close()
    second.close()


# --- security -------------------------------------------------------------------------------------


def test_every_request_needs_the_token_and_only_the_runs_images_are_served(run, servers):
    server = serve(servers, run)
    image = pq.read_table(run / "results.parquet").column("image_path")[0].as_py()
    assert server.request(f"/files/{image}")[0] == 200
    for path in ("/", "/api/products", f"/files/{image}", "/assets/review.js"):
        assert server.request(path, token=None)[0] == 401, path
        assert server.request(path, token="not-the-token")[0] == 403, path
    assert server.request("/?token=not-the-token", token=None)[0] == 403
    body = {"id": "cup", "decision": "approve", "variant": 0, "key": "x"}
    assert server.request("/api/decide", body, token=None)[0] == 401
    assert server.request("/api/decide", json.dumps(body).encode(), content_type="application/x-www-form-urlencoded")[0] == 403
    assert server.request("/api/undo", {}, token="not-the-token")[0] == 403
    for path in ("/files/run.json", "/files/results.parquet", "/files/images/../run.json", "/files/%2e%2e/catalog.parquet",
                 "/files//etc/passwd", f"/files/{image}.txt", "/photo/999", "/assets/review.html.j2"):
        assert server.request(path)[0] == 404, path
    assert not (run / "review").exists()  # nothing was decided


def test_a_host_other_machines_reach_is_refused_without_allow_remote(run):
    refused = subprocess.run([str(BIN / "catalogen"), "review", str(run), "--host", "0.0.0.0"], capture_output=True,
                             text=True, env=cli_env(), timeout=60)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 lets other machines reach the page; add --allow-remote to allow it"]


# --- durability -----------------------------------------------------------------------------------


def test_a_decision_acknowledged_before_a_sigkill_is_there_on_restart(run, servers, tmp_path):
    folder = fresh_copy(run, tmp_path)
    server = serve(servers, folder, "--reviewer", "carol")
    item = next(i for i in server.products()["items"] if i["id"] == "chair")
    key = next(c["key"] for c in item["candidates"] if c["variant"] == 1)
    status, body = server.request("/api/decide", {"id": "chair", "decision": "choose", "variant": 1, "key": key})
    server.proc.send_signal(signal.SIGKILL)  # at once after the answer
    assert status == 200, body
    server.proc.wait()
    kept = standing(folder)["chair"]
    assert (kept.decision, kept.variant, kept.key, kept.reviewer) == ("choose", 1, key, "carol")
    again = serve(servers, folder)
    item = next(i for i in again.products()["items"] if i["id"] == "chair")
    assert (item["main"], item["state"], item["by"]) == (1, "approved", "carol")


def test_a_changed_image_needs_review_again_and_the_page_reloads_the_results(run, servers, tmp_path):
    folder = fresh_copy(run, tmp_path)
    server = serve(servers, folder)
    item = server.products()["items"][0]
    assert item["photo"] is None and server.request("/photo/0")[0] == 404
    assert server.request("/api/decide", {"id": "cup", "decision": "approve", "variant": 0,
                                          "key": item["candidates"][0]["key"]})[0] == 200
    assert server.products(state="approved")["total"] == 4
    table = pq.read_table(folder / "results.parquet")
    sha = table.column("image_sha256").to_pylist()
    sha[0] = "0" * 64  # cup v0 was made again: another image
    table = table.set_column(table.schema.get_field_index("image_sha256"), "image_sha256", pa.array(sha))
    # and the rows now bring a catalog photo (as product rows do), relative to the catalog's folder,
    table = table.append_column("image", pa.array(["photo.png"] * table.num_rows))
    # and a product more, first in the catalog
    desk = table.filter(pa.compute.equal(table.column("id"), "chair"))
    desk = desk.set_column(0, "id", pa.array(["desk"] * desk.num_rows))
    RunStore(folder).write_results(pa.concat_tables([desk, table]))
    page = server.products(state="needs_review")
    assert [i["id"] for i in page["items"]] == ["cup"] and page["items"][0]["reason"].startswith("the image changed")
    assert [i["id"] for i in server.products()["items"]] == ["desk", *IDS]
    assert states(folder)[("cup", 0)][0] == "needs_review"
    stale = server.request("/api/decide", {"id": "cup", "decision": "approve", "variant": 0, "key": item["candidates"][0]["key"]})
    assert stale[0] == 409 and b"changed" in stale[1]
    status, photo = server.request(page["items"][0]["photo"])
    assert status == 200 and photo == (run.parent / "photo.png").read_bytes()


# --- compaction -----------------------------------------------------------------------------------


def _decide(store: RunStore, row_id: str, kind: str = "approve", **extra) -> Decision:
    return decisions.record(store, Decision(id=row_id, decision=kind, variant=0, key="k", reviewer="r",
                                            at=decisions.now(), **extra))


def test_compaction_folds_every_decision_into_one_file_and_an_interrupted_one_loses_nothing(run, tmp_path):
    store = RunStore(fresh_copy(run, tmp_path))
    made = [_decide(store, "cup"), _decide(store, "lamp", "reject", reason="dark")]
    made.append(_decide(store, "cup", "undo", undoes=made[0].name))
    before = decisions.read(store)
    assert [d.name for d in before] == [d.name for d in made]

    # Interrupted after the folded file is written, before any single file is removed: each read once.
    folded = store.root / decisions.FOLDER / "compacted-interrupted.jsonl"
    folded.write_text("".join(json.dumps({**d.__dict__}) + "\n" for d in before[:2]))
    assert decisions.read(store) == before

    done = subprocess.run([str(BIN / "catalogen"), "review", str(store.root), "--compact"], capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3 decision(s) in one file (4 file(s) folded)"
    assert len(decisions.files(store)) == 1 and decisions.read(store) == before
    later = _decide(store, "chair", "regenerate", note="n")  # a single file beside the folded one
    assert decisions.read(store) == [*before, later]
    assert set(decisions.latest(decisions.read(store))) == {"lamp", "chair"}


# --- the report -----------------------------------------------------------------------------------


def test_the_report_shows_each_rows_review_state_reviewer_and_reason_and_filters_by_state(run, chromium, tmp_path):
    from catalogen.publish.report import write_report

    folder = fresh_copy(run, tmp_path)
    store = RunStore(folder)
    sha = {(r["id"], r["variant"]): r["image_sha256"] for r in pq.read_table(folder / "results.parquet").to_pylist()}
    for row_id, kind, variant, reason in (("hostile", "reject", 0, "smudged <label>"), ("lamp", "choose", 1, "")):
        decisions.record(store, Decision(id=row_id, decision=kind, variant=variant, key=sha[(row_id, variant)],
                                         reviewer="dora", at=decisions.now(), reason=reason))
    html = write_report(folder)
    context = chromium.new_context()
    page = context.new_page()
    page.goto(Path(html).resolve().as_uri())
    page.wait_for_selector("body[data-rendered]")

    def shown(state: str) -> list[tuple[str, str]]:
        before = page.get_attribute("body", "data-rendered")
        page.select_option("#filter-review", state)
        page.wait_for_function(f"document.body.dataset.rendered !== {json.dumps(before)}")
        return [tuple(card) for card in page.eval_on_selector_all("article.row", "cards => cards.map(c => [c.dataset.id, c.dataset.review])")]

    assert shown("rejected") == [("hostile", "rejected")] * VARIANTS
    assert page.text_content("article.row dd.review") == "rejected · smudged <label> · by dora"
    assert shown("alternate") == [("lamp", "alternate")] * (VARIANTS - 1)
    assert sorted(shown("approved")) == sorted([("cup", "approved")] * VARIANTS + [("chair", "approved")] * VARIANTS
                                               + [("lamp", "approved")])
    assert "review=approved" in page.url
    context.close()


# --- a run folder in a bucket ---------------------------------------------------------------------


def test_a_run_folder_in_a_bucket_is_reviewed_and_its_decisions_are_objects_there(run, servers, s3):
    import fsspec

    from test_object_storage import BUCKET

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.put(str(run), f"{BUCKET}/review-run", recursive=True)
    url = f"s3://{BUCKET}/review-run"
    server = serve(servers, url, "--reviewer", "erin", env=cli_env())
    assert server.line.startswith(f"review {url} at http://127.0.0.1:")
    item = server.products()["items"][0]
    status, image = server.request(item["candidates"][0]["image"])
    assert status == 200 and image == (run / item["candidates"][0]["image"].removeprefix("/files/")).read_bytes()
    status, body = server.request("/api/decide", {"id": item["id"], "decision": "reject", "variant": item["main"],
                                                  "key": item["candidates"][0]["key"], "reason": "wrong colour"})
    assert status == 200, body
    kept = standing(url)[item["id"]]
    assert (kept.decision, kept.reason, kept.reviewer) == ("reject", "wrong colour", "erin")
    assert fs.ls(f"{BUCKET}/review-run/{decisions.FOLDER}") == [f"{BUCKET}/review-run/{decisions.FOLDER}/{kept.name}"]
    assert server.products(state="rejected")["items"][0]["by"] == "erin"


# --- the whole loop -------------------------------------------------------------------------------


def test_the_whole_loop_scores_ranks_gates_and_a_person_decides_in_the_page(chromium, servers, tmp_path):
    """num_variants 4 -> score -> select (a weighted score) -> gates (a person decides every product)
    -> the page by keyboard: the best candidate is the one shown large, and the decisions are the rows'."""
    catalog = write_catalog(tmp_path / "catalog.parquet", {"id": ["mug", "vase"], "prompt": ["a blue mug", "a tall vase"]})
    out = tmp_path / "out"
    overrides = {**FAST, "num_variants": 4, "stages": ["generate", "score"],
                 "select": {"by": "score_aesthetic + 0.05 * score_clip"},
                 "review": {"reject_if": ["generate_safety_flagged == true"], "approve_if": []}}
    def flow() -> dict:
        state = catalogen_run(catalog=str(catalog), out=str(out), overrides=overrides, return_state=True)
        return run_summary(state)

    with ThreadPoolExecutor(1) as thread:  # Playwright's event loop runs in this one: the flow runs beside it
        assert thread.submit(flow).result()["ok"] == 8

    made = pq.read_table(out / "results.parquet").to_pylist()
    best = {}
    for row_id in ("mug", "vase"):
        rows = [r for r in made if r["id"] == row_id]
        # ranked by the weighted score, highest first (ties to the lower variant), computed here from the columns
        order = sorted(rows, key=lambda r: (-(r["score_aesthetic"] + 0.05 * r["score_clip"]), r["variant"]))
        assert [r["select_rank"] for r in order] == [1, 2, 3, 4]
        best[row_id] = order[0]["variant"]
        assert [(r["variant"], r["selected"], r["review_state"]) for r in order] == \
            [(best[row_id], True, "needs_review")] + [(r["variant"], False, "alternate") for r in order[1:]]
        assert order[0]["review_reason"] == "no review.approve_if rule: a person decides"

    server = serve(servers, out, "--reviewer", "dana")
    page = Page(chromium, server)
    assert page.listed_states() == {"mug": "needs_review", "vase": "needs_review"}
    assert page.shown() == "mug" and page.page.get_attribute("#main", "data-variant") == str(best["mug"])
    page.decide("a")
    page.key("j")
    assert page.page.get_attribute("#main", "data-variant") == str(best["vase"])
    page.decide("3")  # the third candidate, variant 2, ships instead
    now = states(out)
    assert now[("mug", best["mug"])] == ("approved", None, "dana", True)
    assert now[("vase", 2)][0::3] == ("approved", True)
    assert [now[("vase", v)][0] for v in (0, 1, 3)] == ["alternate"] * 3
    assert page.listed_states() == {"mug": "approved", "vase": "approved"} and page.errors == []
    page.close()
    assert server.stop() == (0, "")


def test_open_hands_the_printed_url_to_the_browser(run, servers, tmp_path):
    # webbrowser honours $BROWSER: a script that records what it was asked to open stands in for one.
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {opened}\n')
    browser.chmod(0o755)
    server = serve(servers, run, "--open", env={**cli_env(), "BROWSER": f"{browser} %s"})
    for _ in range(100):
        if opened.exists() and opened.read_text():
            break
        time.sleep(0.1)
    assert opened.read_text().splitlines() == [server.url]  # once, the URL with its token, as printed
    assert server.stop() == (0, "")
