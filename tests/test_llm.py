"""LLM prompt enhancement: the tiny chat model, the parser, the answer cache and the OpenAI backend.

Nothing is mocked: the local backend runs the tiny Qwen2-shaped model through `transformers`, and
the OpenAI backend talks HTTP to a real server on 127.0.0.1 (tests/llm_servers.py).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.llm import (
    AnswerCache,
    LLMRequestError,
    LLMSettings,
    LocalBackend,
    OpenAIBackend,
    Reply,
    Request,
    cache_key,
    enhance,
    parse_answer,
    system_prompt,
)

TEXTS = [
    "Stoneware Coffee Mug, sand, stoneware",
    "mug",
    "Leather Backpack, brown, full grain leather with brass buckles and a padded laptop sleeve",
    "Ceramic Vase, white",
    "x",
]
# Short answers keep the tiny model fast; the parser sees the same kind of noise at any length.
LOCAL = dict(max_new_tokens=32)


def requests_for(texts: list[str], first_seed: int = 100) -> list[Request]:
    return [Request(text, first_seed + index) for index, text in enumerate(texts)]


def texts_of(replies: list) -> list[str]:
    return [reply.text for reply in replies]


# --- the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy shared CPU they spin-wait on each
    other: measured here, 2 threads ran these tests 5-10x slower than 1 under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from catalogen.models.tiny.profile import ensure_tiny

    return ensure_tiny("llm", tmp_path_factory.mktemp("llm-models"))


@pytest.fixture(scope="module")
def greedy(tiny_llm: Path) -> LocalBackend:
    import torch

    return LocalBackend(str(tiny_llm), "cpu", torch.float32, LLMSettings(**LOCAL))


@pytest.fixture(scope="module")
def sampled(tiny_llm: Path) -> LocalBackend:
    import torch

    return LocalBackend(str(tiny_llm), "cpu", torch.float32, LLMSettings(temperature=0.9, top_p=0.95, **LOCAL))


def _file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_tiny_llm_is_a_standard_checkpoint(tiny_llm: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    from catalogen.models.tiny.llm import build_llm

    assert (tiny_llm / "model.safetensors").is_file()
    assert not list(tiny_llm.glob("*.bin")), "weights must be safetensors only"
    model = AutoModelForCausalLM.from_pretrained(tiny_llm, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    assert isinstance(model, Qwen2ForCausalLM)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id is not None
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    # Deterministic: a second build is byte-identical.
    build_llm(tmp_path / "again", tmp_path)
    assert _file_hashes(tmp_path / "again") == _file_hashes(tiny_llm)


def test_tiny_llm_noise_falls_back_with_reasons(greedy: LocalBackend, tmp_path: Path):
    answers = enhance(greedy, greedy.settings, "tiny", AnswerCache(tmp_path / "cache.sqlite"), requests_for(TEXTS))
    assert len(answers) == 5
    for answer, text in zip(answers, TEXTS):
        assert (answer.status, answer.positive, answer.negative) == ("fallback", text, None)
        assert answer.reason and answer.raw
        assert (answer.model, answer.cached) == (greedy.settings.model, False)
    assert len(set(answer.raw for answer in answers)) == 5, "each answer should depend on its input"


def test_greedy_answer_is_the_same_alone_and_in_a_batch(greedy: LocalBackend):
    system = system_prompt(greedy.settings)
    requests = requests_for(TEXTS)  # lengths differ, so the batch is left-padded
    batched = texts_of(greedy.complete(system, requests))
    alone = [greedy.complete(system, [request])[0].text for request in requests]
    assert batched == alone
    assert len(set(batched)) == len(TEXTS)  # not one canned answer for every input


def test_sampled_answer_is_the_rows_own(sampled: LocalBackend, greedy: LocalBackend):
    import torch

    system = system_prompt(sampled.settings)
    requests = requests_for(TEXTS[:3])
    rng_before = torch.random.get_rng_state()
    torch.manual_seed(1)
    batched = texts_of(sampled.complete(system, requests))
    torch.manual_seed(2)  # the global RNG plays no part
    alone = [sampled.complete(system, [request])[0].text for request in reversed(requests)][::-1]
    assert batched == alone
    again = texts_of(sampled.complete(system, requests))
    assert again == batched
    reseeded = texts_of(sampled.complete(system, requests_for(TEXTS[:3], first_seed=900)))
    assert all(new != old for new, old in zip(reseeded, batched))
    assert batched != texts_of(greedy.complete(system, requests))
    torch.random.set_rng_state(rng_before)


# --- the parser ------------------------------------------------------------------------------------

MUG = "a sand stoneware coffee mug, product photograph, soft light"


@pytest.mark.parametrize(
    "raw, positive, negative",
    [
        (f"Positive Prompt: {MUG}\nNegative Prompt: blurry, watermark", MUG, "blurry, watermark"),
        (f"positive prompt: {MUG}\nNEGATIVE PROMPT: blurry", MUG, "blurry"),
        (f"**Positive Prompt:** {MUG}\n**Negative Prompt:** blurry", MUG, "blurry"),
        (f"**Positive prompt**: \"{MUG}\"\n**Negative prompt**: 'blurry'", MUG, "blurry"),
        (f"Sure! Here it is.\n\nPositive Prompt:\n{MUG}\n\nNegative Prompt:\nblurry\n\nEnjoy!", MUG, "blurry"),
        (f"Positive Prompt: {MUG} Negative Prompt: blurry", MUG, "blurry"),
        (f"Positive Prompt: {MUG}", MUG, None),
        (f"Positive Prompt: {MUG}\nNegative Prompt:", MUG, None),
        ("Positive Prompt: a sand\x00 stoneware\x1b coffee mug\x07, product photograph, soft light\r\n", MUG, None),
        (f"  `Positive Prompt: “{MUG}”`  ", MUG, None),
    ],
)
def test_parser_accepts_the_format_and_its_variants(raw: str, positive: str, negative: str | None):
    assert parse_answer(raw, "fallback text", 1000) == (positive, negative, "ok", None)


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty answer"),
        ("  \n\t \x00 ", "empty answer"),
        ("ng�ul��ew\x06=\x0e�bleongticbjdve\x02$ilear", "no 'Positive Prompt:' label"),
        ("A lovely mug on a table, soft light.", "no 'Positive Prompt:' label"),
        ("Positive Prompt:   \nNegative Prompt: blurry", "positive prompt is empty"),
        ("Positive Prompt: " + "mug, " * 250, "positive prompt has 1249 characters (limit 1000)"),
        ("Positive Prompt: mug\nNegative Prompt: " + "x" * 1001, "negative prompt has 1001 characters"),
    ],
)
def test_parser_falls_back_on_unusable_answers(raw: str, reason: str):
    positive, negative, status, why = parse_answer(raw, "Stoneware Coffee Mug", 1000)
    assert (positive, negative, status) == ("Stoneware Coffee Mug", None, "fallback")
    assert reason in why


# --- keys and the system prompt --------------------------------------------------------------------


def test_cache_key_ignores_what_cannot_change_a_greedy_answer():
    greedy = LLMSettings()
    system = system_prompt(greedy)
    base = cache_key(greedy, "rev-a", system, Request("mug", 1))
    assert base == cache_key(greedy, "rev-a", system, Request("mug", 1))
    assert base == cache_key(greedy, "rev-a", system, Request("mug", 2)), "greedy answers ignore the seed"
    parse_only = LLMSettings(top_p=0.5, max_prompt_chars=10, batch_size=1)  # top_p counts only when sampling
    assert base == cache_key(parse_only, "rev-a", system, Request("mug", 1))
    # what does change an answer: test_every_sampling_setting_is_in_both_keys


# The enhance stage's settings (a sampling server); each case below changes one thing from them.
SAMPLING = {"backend": "openai", "model": "normal", "base_url": "http://127.0.0.1:1/v1", "temperature": 0.7,
            "top_p": 0.9, "max_new_tokens": 100}
RESOLVED = "sha256:" + "0" * 64  # a local model's resolved revision


def stage_keys(folder: Path, changes: dict) -> tuple[str, str]:
    """(the enhance stage's row key, the answer cache's key) of one row, as the stage computes them.
    `changes` may also hold the row's `seed` and `text`, the local model's `resolved` revision and a
    `system` prompt's text (written to a file)."""
    import pyarrow as pa

    from catalogen.config import load_config
    from catalogen.models.identity import ModelIdentity
    from tasks import enhance as stage

    settings = {**SAMPLING, **changes}
    seed, text, resolved = settings.pop("seed", 1), settings.pop("text", "a mug"), settings.pop("resolved", RESOLVED)
    if "system" in settings:
        (folder / "system.txt").write_text(settings.pop("system"))
        settings["system_prompt_file"] = str(folder / "system.txt")
    cfg = load_config(None, {"stages": ["enhance"], "enhance": settings})
    llm = stage.effective(cfg)
    models = {"llm": ModelIdentity(llm.model, resolved, str(folder), "llm")} if llm.backend == "local" else {}
    rows = pa.table({"id": ["a"], "variant": pa.array([0], pa.int32()), "prompt": [text],
                     "seed": pa.array([seed], pa.int64())})
    row_key = stage.plan(rows, cfg, models).column("key")[0].as_py()
    return row_key, cache_key(llm, stage._identity(llm, models), system_prompt(llm), Request(text, seed))


@pytest.mark.parametrize("before, after", [
    ({}, {"temperature": 0.8}),
    ({}, {"temperature": 0.0}),  # greedy
    ({"temperature": 0.0}, {"temperature": 0.01}),  # the least sampling
    ({}, {"top_p": 0.8}),
    ({}, {"max_new_tokens": 101}),
    ({}, {"seed": 2}),
    ({}, {"model": "other"}),
    ({}, {"system": "Answer with Positive Prompt: and Negative Prompt: lines."}),
    ({}, {"backend": "local"}),
    ({}, {"base_url": "http://127.0.0.1:2/v1"}),
    ({"backend": "local"}, {"backend": "local", "resolved": "sha256:" + "1" * 64}),
    ({}, {"text": "a cup"}),
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()) or "sampling")
def test_every_sampling_setting_is_in_both_keys(tmp_path: Path, before: dict, after: dict):
    """Settings that differ in one thing never share a row's result nor a cached answer: not the
    stage's key (a re-run redoes the rows) and not the answer cache's (and so asks the model again)."""
    first = stage_keys(tmp_path, before)
    assert stage_keys(tmp_path, before) == first  # the keys are a function of the settings alone
    second = stage_keys(tmp_path, after)
    assert second[0] != first[0], "the stage's row key"
    assert second[1] != first[1], "the answer cache's key"


def test_system_prompt_file_is_shipped_and_replaceable(tmp_path: Path):
    shipped = system_prompt(LLMSettings())
    assert "Positive Prompt:" in shipped and "Negative Prompt:" in shipped
    for part in ("subject", "medium", "style", "lighting", "colour", "details"):
        assert part in shipped
    custom = tmp_path / "system.txt"
    custom.write_text("Answer with Positive Prompt: and Negative Prompt: lines.\n")
    assert system_prompt(LLMSettings(system_prompt_file=custom)) == custom.read_text().strip()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        system_prompt(LLMSettings(system_prompt_file=tmp_path / "missing.txt"))


def test_settings_are_strict():
    with pytest.raises(ValueError, match="extra"):
        LLMSettings(tempreature=0.5)
    with pytest.raises(ValueError, match="api_key_env"):
        LLMSettings(backend="openai")
    with pytest.raises(ValueError):
        LLMSettings().temperature = 1.0  # frozen


# --- the answer cache ------------------------------------------------------------------------------


class CountingBackend:
    """The real backend, with its calls counted."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0
        self.requests = 0

    def complete(self, system, requests):
        self.calls += 1
        self.requests += len(requests)
        return self.backend.complete(system, requests)


def test_cached_answers_skip_the_backend(greedy: LocalBackend, tmp_path: Path):
    cache = AnswerCache(tmp_path / "cache.sqlite")
    counting = CountingBackend(greedy)
    requests = requests_for(TEXTS[:3] + TEXTS[:1])  # the last repeats the first (another seed: greedy ignores it)
    first = enhance(counting, greedy.settings, "tiny", cache, requests)
    assert (counting.calls, counting.requests, len(cache)) == (1, 3, 3)
    assert not any(answer.cached for answer in first)
    assert first[3] == first[0]

    built = []

    def factory() -> CountingBackend:
        built.append(1)
        return counting

    second = enhance(factory, greedy.settings, "tiny", AnswerCache(tmp_path / "cache.sqlite"), requests)
    assert (built, counting.calls) == ([], 1), "a fully cached call must not even build the backend"
    assert all(answer.cached for answer in second)
    assert [replace(answer, cached=False) for answer in second] == first

    enhance(factory, greedy.settings, "tiny", cache, requests_for(["a new row"]) + requests)
    assert (built, counting.calls, counting.requests) == ([1], 2, 4)


def write_answers(path: str, worker: str, barrier, rounds: int) -> None:
    """Write shared keys (the same value from everyone) and own keys, from two threads at once."""
    cache = AnswerCache(Path(path))
    errors: list[BaseException] = []

    def write(thread: int) -> None:
        try:
            for index in range(rounds):
                cache.put(f"shared-{index}", Reply(f"answer {index}", "m"))
                cache.put(f"{worker}-{thread}-{index}", Reply(f"{worker} {thread} {index}", "m"))
                assert cache.get(f"shared-{index}") == Reply(f"answer {index}", "m")
        except BaseException as exc:  # noqa: BLE001 - reported below, from the main thread
            errors.append(exc)

    barrier.wait()
    threads = [threading.Thread(target=write, args=(thread,)) for thread in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_cache_takes_concurrent_writers_from_processes_and_threads(tmp_path: Path):
    path = tmp_path / "shared" / "cache.sqlite"  # created by whichever writer comes first
    rounds, workers = 40, 3
    # Spawned: a child forked from a process that has run a Prefect flow (earlier tests) exits 1
    # after its target returns, inside multiprocessing's own shutdown, whatever the target did.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    processes = [
        context.Process(target=write_answers, args=(str(path), f"p{number}", barrier, rounds))
        for number in range(workers - 1)
    ]
    for process in processes:
        process.start()
    write_answers(str(path), "main", barrier, rounds)  # this process is the last writer
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    cache = AnswerCache(path)
    assert len(cache) == rounds + workers * 2 * rounds
    for index in range(rounds):
        assert cache.get(f"shared-{index}") == Reply(f"answer {index}", "m")
        assert cache.get(f"p1-1-{index}") == Reply(f"p1 1 {index}", "m")
        assert cache.get(f"main-0-{index}") == Reply(f"main 0 {index}", "m")
    assert cache.get("absent") is None


# --- the OpenAI backend against a real HTTP server -------------------------------------------------

SECRET = "sk-planted-3f9c1e7a-never-log-me"
KEY_ENV = "CATALOGEN_TEST_LLM_KEY"


@pytest.fixture
def state(server):
    server.state.reset()
    server.state.delay_s = 0.05
    return server.state


def served(server, model: str, **overrides) -> LLMSettings:
    """Settings for `model` on the test server, with short timeouts and waits between retries."""
    settings = dict(
        backend="openai", model=model, base_url=server.url, timeout_s=2, max_retries=4, retry_wait_max_s=0.02,
    )
    return LLMSettings(**{**settings, **overrides})


def test_openai_answers_with_bounded_concurrency(server, state, tmp_path: Path):
    from llm_servers import NEGATIVE, normal_answer

    state.delay_s = 0.2  # long enough for requests to overlap
    settings = served(server, "normal", concurrency=3)
    texts = [f"Product {number}, red, wool" for number in range(9)]
    cache = AnswerCache(tmp_path / "c.sqlite")
    answers = enhance(OpenAIBackend(settings), settings, "normal", cache, requests_for(texts))
    for answer, text in zip(answers, texts):
        expected = normal_answer(text, None).splitlines()[0].removeprefix("Positive Prompt: ")
        assert (answer.status, answer.positive, answer.negative, answer.reason) == ("ok", expected, NEGATIVE, None)
        assert answer.model == "served/normal"  # the model the response names
    assert state.requests["normal"] == 9
    assert state.max_in_flight == 3
    assert all("seed" not in body for body in state.bodies), "greedy requests send no seed"
    assert state.bodies[0]["messages"][0] == {"role": "system", "content": system_prompt(settings)}
    assert (state.bodies[0]["temperature"], state.bodies[0]["max_tokens"]) == (0.0, 160)


def test_openai_sampling_sends_each_rows_seed(server, state, tmp_path: Path):
    settings = served(server, "normal", temperature=0.8, top_p=0.9)
    requests = [Request("mug", 7), Request("mug", 2**40 + 5)]
    answers = enhance(OpenAIBackend(settings), settings, "normal", AnswerCache(tmp_path / "c.sqlite"), requests)
    assert sorted(body["seed"] for body in state.bodies) == sorted([7, (2**40 + 5) % 2**31])
    assert answers[0].positive.endswith("variation 7") and answers[0].positive != answers[1].positive
    assert {body["top_p"] for body in state.bodies} == {0.9}


@pytest.mark.parametrize(
    "model, overrides, status, reason, attempts",
    [
        ("flaky", {}, "ok", None, 2),
        ("broken", {}, "fallback", "server error 500 after 4 retries: Error code: 500", 5),
        ("slow", {"timeout_s": 0.25, "max_retries": 1}, "fallback", "timed out (0.25 s per attempt) after 1 retry", 2),
        ("garbage-text", {}, "fallback", "malformed response: not JSON", 1),
        ("garbage-json", {}, "fallback", "malformed response: no choices", 1),
        ("refuse", {}, "fallback", "request refused 400 not retried", 1),
    ],
)
def test_openai_failures_end_as_rows(server, state, tmp_path: Path, model, overrides, status, reason, attempts):
    state.slow_s = 1.0
    settings = served(server, model, **overrides)
    texts = ["Mug, blue", "Vase, white"]
    started = time.monotonic()
    answers = enhance(OpenAIBackend(settings), settings, model, AnswerCache(tmp_path / "c.sqlite"), requests_for(texts))
    elapsed = time.monotonic() - started
    assert [answer.status for answer in answers] == [status, status]
    for answer, text in zip(answers, texts):
        if status == "fallback":
            assert (answer.positive, answer.negative, answer.cached) == (text, None, False)
            assert reason in answer.reason
    assert state.requests[model] == attempts * len(texts), "retried exactly the client's retryable failures"
    assert elapsed < 3, "waits between retries are capped by retry_wait_max_s"


def test_openai_failed_requests_are_not_cached(server, state, tmp_path: Path):
    cache = AnswerCache(tmp_path / "c.sqlite")
    settings = served(server, "broken", max_retries=0)
    enhance(OpenAIBackend(settings), settings, "broken", cache, requests_for(["mug"]))
    again = enhance(OpenAIBackend(settings), settings, "broken", cache, requests_for(["mug"]))
    assert (len(cache), state.requests["broken"], again[0].cached) == (0, 2, False)


def test_openai_unreachable_server_falls_back(tmp_path: Path):
    from llm_servers import free_port

    settings = LLMSettings(
        backend="openai", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=2, retry_wait_max_s=0.01
    )
    answers = enhance(OpenAIBackend(settings), settings, "m", AnswerCache(tmp_path / "c.sqlite"), requests_for(["mug"]))
    assert answers[0].status == "fallback"
    assert f"cannot connect to {settings.base_url} after 2 retries" == answers[0].reason


def test_api_key_reaches_the_server_and_nothing_else(server, state, tmp_path: Path, monkeypatch, caplog, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    seen = []
    for model in ("normal", "broken", "refuse", "garbage-text"):  # `refuse` echoes the key in its error
        settings = served(server, model, api_key_env=KEY_ENV, max_retries=1)
        backend = OpenAIBackend(settings)
        cache = AnswerCache(tmp_path / f"{model}.sqlite")
        seen += [repr(backend), settings.model_dump_json(), repr(settings)]
        seen += [repr(answer) for answer in enhance(backend, settings, model, cache, requests_for(["mug"]))]
        for result in backend.complete("system", requests_for(["vase"])):
            seen += [str(result), repr(result), repr(getattr(result, "__cause__", None))]
            if model != "normal":
                assert isinstance(result, LLMRequestError)
    assert state.authorization and set(state.authorization) == {f"Bearer {SECRET}"}
    assert any("***" in text for text in seen), "the echoed key was redacted"
    captured = capsys.readouterr()
    assert any(record.name.startswith("openai") for record in caplog.records), "client logs were captured"
    for text in seen + [caplog.text, captured.out, captured.err]:
        assert SECRET not in text


def test_no_key_configured_sends_a_placeholder(server, state, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    settings = served(server, "normal")
    enhance(OpenAIBackend(settings), settings, "normal", AnswerCache(tmp_path / "c.sqlite"), requests_for(["mug"]))
    assert state.authorization == ["Bearer not-needed"]
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(KeyError, match=KEY_ENV):
        OpenAIBackend(served(server, "normal", api_key_env=KEY_ENV))
