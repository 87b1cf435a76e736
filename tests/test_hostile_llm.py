"""Hostile input to the prompt surfaces: template resource bombs, and LLM servers that misbehave.

Templates render in the bounded sandbox (catalogen/prompting/templates.py); the OpenAI backend talks HTTP
to real servers on 127.0.0.1 (tests/llm_servers.py). Each case bounds its own time and memory.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from catalogen import stopping
from catalogen.prompting.templates import TemplateSettings, render_prompts, template_faults
from tasks.llm import AnswerCache, LLMSettings, OpenAIBackend, Request, cache_key, enhance, system_prompt

# --- template resource bombs -----------------------------------------------------------------------

ROWS = pa.table({"id": ["MUG-1", "MUG-2"], "title": ["Stoneware Mug", "Glass Vase"]})


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "template, fault",
    [
        ("{{ 'a' * 10**9 }}", "'*' would make more than the 1,000,000 characters (or list items) a row may make"),
        ("{{ 2 ** 9999999999 }}", "'**' would make a number of over 4096 bits"),
        ("{{ title|center(999999999) }}", "center would make more than"),
        ("{{ title.ljust(999999999) }}", "str.ljust would make"),
        ("{{ '{0:>999999999}'.format(title) }}", "str.format would make"),
        ("{{ '%999999999s' % title }}", "'%' would make"),
        ("{{ '%999999999s'|format(title) }}", "format would make"),
        ("{{ title|indent(999999999, true) }}", "indent would make"),
        ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", "replace would make"),
        ("{{ range(100000)|join('x' * 20000) }}", "join would make"),
        ("{{ range(100000)|batch(999999999, 'x')|list }}", "batch would make"),
        ("{{ range(100000)|map('center', 100)|list|length }}", "center would make more than"),
        ("{% set a = 'a' * 500000 %}{% set a = a ~ a %}{% set a = a ~ a %}{{ a|length }}", "'~' would make"),
        ("{{ title }}{% for i in range(100000) %} {{ title }}{% endfor %}", "renders over 20,000 characters"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "over 2 s on one row"),
        ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "over 2 s"),
    ],
)
def test_template_bombs_are_row_faults(template: str, fault: str):
    tracemalloc.start()
    try:
        faults = template_faults(TemplateSettings(prompt=template), ROWS.column_names, ROWS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(faults) == 1, faults
    message = str(faults[0])
    assert message.startswith("template.prompt cannot render: ") and fault in message
    assert message.endswith("(rows: MUG-1, MUG-2)") and "\n" not in message
    assert peak < 64 * 2**20, f"rendering peaked at {peak / 2**20:.0f} MiB"


@pytest.mark.timeout(60)
def test_a_template_out_of_time_is_not_retried_on_every_row():
    rows = pa.table({"id": [f"R{i}" for i in range(50)], "title": ["mug"] * 50})
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    faults = template_faults(TemplateSettings(prompt=slow), rows.column_names, rows)
    assert time.monotonic() - started < 20, "50 rows must not take 50 time budgets"
    assert [fault.rows for fault in faults] == [tuple(f"R{i}" for i in range(50))]


def test_ordinary_templates_still_render():
    template = (
        "{{ title }}, {{ 'x' ~ title }}, {{ 2 ** 64 * 3 }}, {{ '%05.1f' % 3.14159 }}, {{ '{:>8}'.format(title) }}, "
        "{{ title|center(20) }}, {{ ['a', 'b']|join('+') }}, {{ title|replace('o', '0') }}, "
        "{% for word in title.split() %}{{ loop.index }}{{ word|lower }} {% endfor %}"
    )
    positives, _ = render_prompts(TemplateSettings(prompt=template), ROWS)
    assert positives[0] == (
        "Stoneware Mug, xStoneware Mug, 55340232221128654848, 003.1, Stoneware Mug, Stoneware Mug, a+b, "
        "St0neware Mug, 1stoneware 2mug"
    )


# --- the OpenAI backend against hostile servers ----------------------------------------------------

SECRET = "sk-echoed-5b1d2c9e-keep-me-out"
KEY_ENV = "CATALOGEN_TEST_HOSTILE_KEY"


@pytest.fixture
def state(server):
    server.state.reset()
    return server.state


def served(server, model: str, **overrides) -> LLMSettings:
    settings = dict(backend="openai", model=model, base_url=server.url, timeout_s=2, max_retries=0, retry_wait_max_s=0.02)
    return LLMSettings(**{**settings, **overrides})


def ask(settings: LLMSettings, cache: AnswerCache, texts: list[str]):
    requests = [Request(text, 100 + index) for index, text in enumerate(texts)]
    return enhance(OpenAIBackend(settings), settings, settings.model, cache, requests)


@pytest.mark.timeout(60)
def test_an_answer_that_is_not_utf8_falls_back(server, state, tmp_path: Path):
    answers = ask(served(server, "bad-utf8", max_retries=2), AnswerCache(tmp_path / "c.sqlite"), ["Mug, blue"])
    assert (answers[0].status, answers[0].positive, answers[0].negative) == ("fallback", "Mug, blue", None)
    assert answers[0].reason == "malformed response: not valid UTF-8"
    assert state.requests["bad-utf8"] == 1, "a malformed answer is not asked again"


@pytest.mark.timeout(30)
def test_a_trickling_server_times_out_as_a_whole(server, state, tmp_path: Path):
    started = time.monotonic()
    answers = ask(served(server, "trickle", timeout_s=2, max_retries=1), AnswerCache(tmp_path / "c.sqlite"), ["Mug"])
    elapsed = time.monotonic() - started
    assert (answers[0].status, answers[0].reason) == ("fallback", "timed out (2 s per attempt) after 1 retry")
    assert elapsed < 15, f"two attempts of 2 s took {elapsed:.1f} s"


@pytest.mark.timeout(30)
def test_abandoning_the_run_ends_a_request_in_flight(server, state, tmp_path: Path):
    settings = served(server, "trickle", timeout_s=60, max_retries=3)
    timer = threading.Timer(1.0, stopping.ABANDON.set)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(stopping.Abandoned):
            ask(settings, AnswerCache(tmp_path / "c.sqlite"), ["Mug", "Vase"])
        elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        stopping.reset()
    assert elapsed < 5, f"the requests ran {elapsed:.1f} s after the stop"
    assert len(AnswerCache(tmp_path / "c.sqlite")) == 0


@pytest.mark.timeout(60)
def test_huge_answers_are_bounded_where_read_and_where_kept(server, state, tmp_path: Path):
    cache = AnswerCache(tmp_path / "c.sqlite")
    refused = ask(served(server, "huge"), cache, ["Mug"])[0]  # 10 MiB answer, 1 MiB read by default
    assert (refused.status, refused.raw) == ("fallback", "")
    assert refused.reason == "response too large: over 1,048,576 bytes (max_response_bytes)"
    settings = served(server, "huge", max_response_bytes=32 * 2**20, max_answer_chars=4096)
    kept = ask(settings, cache, ["Mug"] * 3)
    assert [answer.status for answer in kept] == ["fallback"] * 3
    assert kept[0].reason.startswith("answer too long: 10,485,") and "max_answer_chars 4,096" in kept[0].reason
    assert kept[0].raw.startswith("Positive Prompt: product photograph of Mug") and len(kept[0].raw) < 4200
    assert kept[0].raw.endswith("characters]")
    again = ask(settings, cache, ["Mug"])[0]
    assert again.cached and again.reason == kept[0].reason and again.raw == kept[0].raw
    assert (tmp_path / "c.sqlite").stat().st_size < 2**20


def test_two_temperatures_are_two_answers(server, state, tmp_path: Path):
    warm, hot = served(server, "normal", temperature=0.5), served(server, "normal", temperature=0.9)
    system = system_prompt(warm)
    assert cache_key(warm, "m", system, Request("mug", 1)) != cache_key(hot, "m", system, Request("mug", 1))
    cache = AnswerCache(tmp_path / "c.sqlite")
    first, second = ask(warm, cache, ["mug"])[0], ask(hot, cache, ["mug"])[0]
    assert (first.cached, second.cached, len(cache), state.requests["normal"]) == (False, False, 2, 2)
    assert [body["temperature"] for body in state.bodies] == [0.5, 0.9]


@pytest.mark.timeout(300)
def test_a_run_at_another_temperature_asks_the_server_again(server, state, tmp_path: Path):
    """Runs of one process, one answer cache: the same rows at another temperature are new requests
    (sent with that temperature), and only the same temperature again reuses the cached answers."""
    import pandas as pd
    from conftest import FAST, write_catalog
    from flows.run import catalogen_run, run_summary

    catalog = write_catalog(tmp_path / "products.parquet", {"id": ["MUG-1", "VASE-2"], "title": ["Mug", "Vase"]})

    def run(out: Path, temperature: float) -> tuple[list[float], pd.DataFrame]:
        settings = {**FAST, "stages": ["enhance"], "template.preset": "product-photo", "enhance.backend": "openai",
                    "enhance.model": "normal", "enhance.base_url": server.url, "enhance.timeout_s": 5,
                    "enhance.answer_cache": str(tmp_path / "answers.sqlite"), "enhance.temperature": temperature}
        before = len(state.bodies)
        summary = run_summary(catalogen_run(catalog=str(catalog), out=str(out), overrides=settings, return_state=True))
        assert not isinstance(summary, BaseException), summary
        assert summary["stages"]["enhance"] == {"ok": 2}
        return [body["temperature"] for body in state.bodies[before:]], pd.read_parquet(out / "results.parquet")

    sent, first = run(tmp_path / "out", 0.5)
    assert sent == [0.5, 0.5] and not first.enhance_cached.any()
    sent, second = run(tmp_path / "out", 0.9)  # the same folder and cache; only the temperature changed
    assert sent == [0.9, 0.9] and not second.enhance_cached.any()
    assert set(second.enhance_key).isdisjoint(first.enhance_key)
    sent, third = run(tmp_path / "again", 0.9)  # another folder, the same temperature: the cached answers
    assert sent == [] and third.enhance_cached.all()
    assert list(third.enhance_prompt) == list(second.enhance_prompt)


@pytest.mark.timeout(300)
def test_an_echoed_key_is_kept_nowhere(server, state, tmp_path: Path, monkeypatch):
    from conftest import FAST, write_catalog
    from flows.run import catalogen_run, run_summary

    monkeypatch.setenv(KEY_ENV, SECRET)
    catalog = write_catalog(tmp_path / "products.parquet", {"id": ["MUG-1", "VASE-2"], "title": ["Mug", "Vase"]})
    out, answers = tmp_path / "out", tmp_path / "answers.sqlite"
    settings = {**FAST, "stages": ["enhance"], "template.preset": "product-photo", "enhance.backend": "openai",
                "enhance.model": "echo-key", "enhance.base_url": server.url, "enhance.api_key_env": KEY_ENV,
                "enhance.timeout_s": 5, "enhance.answer_cache": str(answers)}
    state_ = catalogen_run(catalog=str(catalog), out=str(out), overrides=settings, return_state=True)
    summary = run_summary(state_)
    assert not isinstance(summary, BaseException), summary
    assert summary["stages"]["enhance"] == {"ok": 2}
    assert set(state.authorization) == {f"Bearer {SECRET}"}
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert df.enhance_prompt.str.contains(r"\(Bearer \*\*\*\)").all() and (df.enhance_model == "served for Bearer ***").all()
    files = [path for path in [*out.rglob("*"), *tmp_path.glob("answers.sqlite*")] if path.is_file()]
    assert answers in files and any(path.name == "results.parquet" for path in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
