"""LLM prompt enhancement: a base prompt in, a Stable Diffusion prompt pair out.

This is everything underneath the enhance stage: settings, the system prompt, two backends (a
local `transformers` chat model, or any OpenAI-compatible server through the official `openai`
client), the parser for "Positive Prompt: … / Negative Prompt: …" answers, and a SQLite cache of
raw answers shared by every process of a run.

`enhance` asks the cache first and the backend only for what is missing, so a re-run with every
answer cached never loads a model or opens a connection. An answer that cannot be used (empty,
unparsable, too long, or a request that failed after its retries) falls back to the input text,
with the reason; nothing here raises for one bad row.

Reproducibility: greedy decoding (temperature 0) is the default. When sampling, every request
draws from its own CPU `torch.Generator` seeded from its row (local backend) or sends its row's
seed (server), so a row's answer depends on that row alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Literal, Protocol, Sequence, TypeVar

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, Field, model_validator

from catalogen import stopping
from catalogen.storage.hashing import stable_hash

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT_FILE = Path(__file__).with_name("enhance_system.txt")
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
# The Hub commit of DEFAULT_MODEL that these defaults were chosen for.
DEFAULT_REVISION = "989aa7980e4cf806f80c7fef2b1adb7bc71aa306"

# Part of every cache key: bump when a change here alters the raw answer for the same inputs.
CACHE_VERSION = 1
# Sent to servers that need no key, so the client never falls back to OPENAI_API_KEY.
NO_KEY = "not-needed"


class LLMSettings(BaseModel):
    """How prompts are enhanced. Everything that changes a raw answer is part of its cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local", "openai"] = "local"
    model: str = Field(DEFAULT_MODEL, description="local: Hub id or folder; openai: the server's model name")
    revision: str | None = Field(DEFAULT_REVISION, description="Hub commit, branch or tag (local backend)")
    system_prompt_file: Path | None = Field(None, description="None: the shipped tasks/enhance_system.txt")
    max_new_tokens: int = Field(160, ge=8, le=1024)
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    max_prompt_chars: int = Field(1000, ge=1, description="longer answers fall back")
    batch_size: int = Field(8, ge=1, description="local backend: rows per greedy generate call")
    base_url: str | None = Field(None, description="openai backend, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="NAME of the env var holding the key (never the key)")
    timeout_s: float = Field(60, gt=0, description="openai backend: the whole of each attempt, headers and body")
    max_retries: int = Field(4, ge=0, description="openai backend: on 408/409/429/5xx, timeouts, lost connections")
    retry_wait_max_s: float | None = Field(
        None, gt=0, description="cap on each wait between retries; None: the client's own schedule"
    )
    concurrency: int = Field(8, ge=1, description="openai backend: requests in flight")
    max_response_bytes: int = Field(
        2**20, ge=1024, description="openai backend: a response body past this is not read; the row falls back"
    )
    max_answer_chars: int = Field(
        16384, ge=1, description="raw answers are kept (cache, raw_answer) up to this many characters; longer ones fall back"
    )

    @model_validator(mode="after")
    def _openai_needs_a_target(self) -> LLMSettings:
        if self.backend == "openai" and self.base_url is None and self.api_key_env is None:
            raise ValueError(
                "backend 'openai' without base_url talks to api.openai.com, which needs a key: "
                "set api_key_env to the name of the environment variable that holds it, or set base_url"
            )
        return self

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Request:
    """One row to enhance: the user text (its base prompt) and the row's seed (used only when sampling)."""

    text: str
    seed: int


@dataclass(frozen=True)
class Reply:
    """A backend's raw answer and the model that wrote it (a server may name a more exact one)."""

    text: str
    model: str


@dataclass(frozen=True)
class Answer:
    positive: str
    negative: str | None
    status: Literal["ok", "fallback"]
    reason: str | None  # why it fell back; None when ok
    raw: str  # the model's answer as received ("" when the request failed)
    model: str
    cached: bool


class LLMRequestError(Exception):
    """A request that failed for good (after the client's retries); its text is safe to record."""


def system_prompt(settings: LLMSettings) -> str:
    """The system prompt's text: the user's file, or the shipped one."""
    path = settings.system_prompt_file or DEFAULT_SYSTEM_PROMPT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FileNotFoundError(f"system prompt file {path} cannot be read: {exc.strerror}") from exc
    if not text:
        raise ValueError(f"system prompt file {path} is empty")
    return text


# --- parsing ---------------------------------------------------------------------------------------

# "Positive Prompt:", "**Negative prompt:**", "positive prompt**:", anywhere in the answer.
_LABEL = re.compile(
    r"\b(?P<kind>positive|negative)[ \t]*prompt[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?",
    re.IGNORECASE,
)
# C0 and C1 control characters except tab and newline, which separate lines here.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_SPACE = re.compile(r"\s+")
# Markdown emphasis, headings, list bullets and quotes that models wrap around a prompt.
_WRAPPING = " \t\n*_#`>-\"'“”‘’«»"


def _clean_segment(segment: str) -> str:
    """One label's text: up to the first blank line, on one line, without wrapping quotes or markup."""
    paragraph = _BLANK_LINE.split(segment.strip(), maxsplit=1)[0]
    return _SPACE.sub(" ", paragraph).strip(_WRAPPING).strip()


def _segments(text: str) -> dict[str, str]:
    """The text after the first positive and the first negative label, each up to the next label."""
    labels = list(_LABEL.finditer(text))
    found: dict[str, str] = {}
    for index, label in enumerate(labels):
        end = labels[index + 1].start() if index + 1 < len(labels) else len(text)
        found.setdefault(label["kind"].lower(), text[label.end():end])
    return found


def parse_answer(raw: str, fallback: str, max_chars: int) -> tuple[str, str | None, str, str | None]:
    """Split a model's answer into (positive, negative, status, reason).

    Accepts the labels in any case, wrapped in markdown bold, on one line or two, with quotes
    around the prompts; a missing negative line gives None. An empty, unparsable or over-long
    answer gives status "fallback": `fallback` as the positive prompt, no negative, and the reason.
    """
    text = _CONTROL.sub("", raw.replace("\r\n", "\n").replace("\r", "\n"))
    if not text.strip():
        return fallback, None, "fallback", "empty answer"
    segments = _segments(text)
    if "positive" not in segments:
        return fallback, None, "fallback", f"unparsable answer: no 'Positive Prompt:' label in {_excerpt(text)}"
    positive = _clean_segment(segments["positive"])
    negative = _clean_segment(segments.get("negative", "")) or None
    if not positive:
        return fallback, None, "fallback", "unparsable answer: the positive prompt is empty"
    for name, value in (("positive", positive), ("negative", negative or "")):
        if len(value) > max_chars:
            reason = f"answer too long: the {name} prompt has {len(value)} characters (limit {max_chars})"
            return fallback, None, "fallback", reason
    return positive, negative, "ok", None


# How a kept answer ends when it was cut at `max_answer_chars`.
_CUT = re.compile(r"\n\[cut: the answer had (\d+) characters\]\Z")


def kept_answer(text: str, limit: int) -> str:
    """The answer as it is kept (cache, results): whole, or its first `limit` characters and a mark."""
    if len(text) <= limit:
        return text
    cut = _CUT.search(text)
    total = int(cut[1]) if cut else len(text)
    return f"{text[:limit]}\n[cut: the answer had {total} characters]"


def _excerpt(text: str, limit: int = 60) -> str:
    flat = _SPACE.sub(" ", text).strip()
    return repr(flat if len(flat) <= limit else flat[:limit] + "…")


# --- the cache -------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    raw TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""
# How long a writer waits for another's lock before giving up (SQLite's busy timeout).
BUSY_TIMEOUT_S = 60.0


class AnswerCache:
    """Raw answers by cache key, in one SQLite file shared by the threads and processes of a run.

    WAL journaling lets readers run while one writer writes, the busy timeout makes writers queue
    instead of failing with "database is locked", and `INSERT OR IGNORE` makes a second writer of
    the same key a no-op (both computed the same answer). Each thread opens its own connection,
    as sqlite3 connections must not be shared across threads. The file must sit on a local disk:
    WAL does not work over network file systems.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection()  # create the table now, so a bad path fails here and names itself

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            try:
                connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; one fsync per checkpoint
                connection.execute(_SCHEMA)
            except sqlite3.Error as exc:
                raise sqlite3.OperationalError(f"answer cache {self.path}: {exc}") from exc
            self._local.connection = connection
        return connection

    def get(self, key: str) -> Reply | None:
        row = self._connection().execute("SELECT raw, model FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else Reply(text=row[0], model=row[1])

    def put(self, key: str, reply: Reply) -> None:
        self._connection().execute(
            "INSERT OR IGNORE INTO answers (key, raw, model) VALUES (?, ?, ?)", (key, reply.text, reply.model)
        )

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the path only: connections stay in the process (and thread) that opened them."""
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"AnswerCache({str(self.path)!r})"


def cache_key(settings: LLMSettings, model_identity: str, system: str, request: Request) -> str:
    """The key of one raw answer: backend, model and its identity, system prompt, input, decoding.

    `model_identity` is what pins the weights: the resolved Hub commit or folder hash (local), or
    what the caller trusts to name the served model (openai). The seed and top_p count only when
    sampling: a greedy answer is the same for every seed.
    """
    decoding: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature}
    if settings.sampling:
        decoding.update(top_p=settings.top_p, seed=request.seed)
    return stable_hash(
        "llm-answer", CACHE_VERSION, settings.backend, settings.model, model_identity, system, request.text, decoding
    )


# --- backends --------------------------------------------------------------------------------------


class Backend(Protocol):
    def complete(self, system: str, requests: Sequence[Request]) -> list[Reply | Exception]:
        """One raw reply per request, in order; a request that failed for good gives its exception."""
        ...


def _conversation(system: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def _seeded_sampler_class():
    """`SeededSampler`, built on first use so that importing this module does not import torch."""
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    class SeededSampler(LogitsProcessor):
        """Draw each row's next token from that row's own generator, then leave only that token.

        `generate` samples with torch's one global RNG, so a row's draws would depend on the rows
        before it and on anything else in the process that draws. Here each row has a CPU
        generator seeded from its request, and `generate` runs greedy over the result, so its
        KV cache, padding and stopping rules stay in charge while the randomness is the row's own.
        """

        def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            for warper in self.warpers:
                scores = warper(input_ids, scores)
            probabilities = torch.softmax(scores.float(), dim=-1).cpu()
            chosen = torch.empty((len(self.generators), 1), dtype=torch.long)
            for row, generator in enumerate(self.generators):
                chosen[row] = torch.multinomial(probabilities[row], 1, generator=generator)
            only_chosen = torch.full_like(scores, float("-inf"))
            return only_chosen.scatter_(1, chosen.to(scores.device), 0.0)

    return SeededSampler


class LocalBackend:
    """A chat model run in this process through `transformers`.

    Greedy rows run in batches of `batch_size` (left-padded, with an attention mask). Sampled rows
    run one at a time, each with its own seeded generator, so a sampled answer cannot depend on
    its batch: not on its neighbours' draws and not on the numerics of a padded batch.
    """

    def __init__(self, model_path: str, device: str, dtype: torch.dtype, settings: LLMSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.device = device
        # A folder is what it is; a Hub id is pinned to the configured revision.
        revision = None if Path(model_path).is_dir() else settings.revision
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision, padding_side="left")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"model {model_path} has no chat template: the local backend needs an instruct model")
        if self.tokenizer.pad_token is None:  # e.g. Llama: padding is masked out, any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, revision=revision, dtype=dtype, use_safetensors=True)
        self.model = model.to(device).eval()
        self.generation_config = self._generation_config()

    def _generation_config(self):
        """The model's own generation defaults (stop tokens, repetition penalty), decoding greedily.

        Our settings decide how to sample (see `SeededSampler`), so the model's sampling defaults
        (Qwen2.5 ships do_sample=True, temperature 0.7, top_p 0.8, top_k 20) are switched off.
        """
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample = False
        config.temperature = 1.0
        config.top_p = 1.0
        config.top_k = 50  # transformers' own default: None would be refilled from the model's config
        config.max_new_tokens = self.settings.max_new_tokens
        config.max_length = None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config

    def complete(self, system: str, requests: Sequence[Request]) -> list[Reply | Exception]:
        # Sampled rows go one at a time (batches of one): see the class docstring
        size = 1 if self.settings.sampling else self.settings.batch_size
        replies: list[Reply | Exception] = []
        for start in range(0, len(requests), size):
            replies += self._generate(system, requests[start:start + size])
        return replies

    def _generate(self, system: str, requests: Sequence[Request]) -> list[Reply]:
        import torch
        from transformers import LogitsProcessorList

        # 1. Each conversation through the model's chat template, left-padded into one batch
        conversations = [_conversation(system, request.text) for request in requests]
        inputs = self.tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        # 2. Decode: greedy, or greedy over one seeded draw per row
        processors = LogitsProcessorList()
        if self.settings.sampling:
            sampler = _seeded_sampler_class()
            seeds = [request.seed for request in requests]
            processors.append(sampler(seeds, self.settings.temperature, self.settings.top_p))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, generation_config=self.generation_config, logits_processor=processors
            )
        # 3. Only the new tokens: everything after the (padded) prompt
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Reply(text=text, model=self.settings.model) for text in texts]

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.settings.model!r}, device={self.device!r})"


class _BoundedRetryClient(openai.AsyncOpenAI):
    """The official client, whose waits between retries can be capped (tests use a tiny cap).

    Which failures it retries is the client's own rule, read in `openai._base_client` (3.57):
    timeouts, connection errors, 408, 409, 429 and every 5xx, unless the server says
    `x-should-retry: false` or asks for a Retry-After over two minutes. Its waits are the
    server's Retry-After (up to two minutes), else 0.5 s doubling per retry up to 8 s, less
    0-25 % jitter.
    """

    retry_wait_max_s: float | None = None

    def _calculate_retry_timeout(self, *args: Any, **kwargs: Any) -> float:
        wait = super()._calculate_retry_timeout(*args, **kwargs)
        if self.retry_wait_max_s is None:
            return wait
        return min(wait, self.retry_wait_max_s)


def _api_key(settings: LLMSettings) -> str:
    if settings.api_key_env is None:
        return NO_KEY
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise KeyError(f"environment variable {settings.api_key_env} (settings api_key_env) is not set or empty")
    return key


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret and secret != NO_KEY else text


class ResponseTooLarge(openai.OpenAIError):
    """A response body past `max_response_bytes`; an OpenAIError, so the client neither retries nor wraps it."""


class _DeadlineTransport(httpx2.AsyncHTTPTransport):
    """One attempt, headers and whole body, within `seconds`, and its body read up to `max_bytes` only.

    httpx's timeouts bound each read, so a server that trickles a byte a second would never time
    out; here the attempt as a whole has a deadline, which ends as a read timeout the client retries.
    """

    def __init__(self, seconds: float, max_bytes: int):
        super().__init__()
        self.seconds = seconds
        self.max_bytes = max_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            async with asyncio.timeout(self.seconds):
                response = await super().handle_async_request(request)
                try:
                    body = await self._read(response)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise httpx2.ReadTimeout(f"no whole answer within {self.seconds:g} s", request=request) from exc
        return httpx2.Response(response.status_code, headers=response.headers, content=body,
                               extensions=response.extensions, request=request)

    async def _read(self, response: httpx2.Response) -> bytes:
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise ResponseTooLarge(f"response too large: over {self.max_bytes:,} bytes (max_response_bytes)")
        return bytes(body)


async def _until_abandoned() -> None:
    while not stopping.ABANDON.is_set():
        await asyncio.sleep(0.05)


T = TypeVar("T")


def _run_async(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, in a thread of its own if this one runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-loop") as pool:
        return pool.submit(asyncio.run, work).result()


def _retries(exc: openai.APIError) -> int | None:
    """How many retries the client made before giving up, from the header it sends with each attempt."""
    request = getattr(exc, "request", None)
    count = request.headers.get("x-stainless-retry-count") if request is not None else None
    return int(count) if count and count.isdigit() else None


def _after(retries: int | None) -> str:
    if retries is None:
        return "after its retries"
    if retries == 0:
        return "not retried"
    return f"after {retries} {'retry' if retries == 1 else 'retries'}"


def _status_reason(exc: openai.APIStatusError) -> str:
    status = exc.status_code
    if status == 429:
        kind = "rate limited"
    elif status >= 500:
        kind = "server error"
    else:
        kind = "request refused"
    return f"{kind} {status} {_after(_retries(exc))}: {exc.message}"


def _failure_reason(exc: openai.OpenAIError, settings: LLMSettings) -> str:
    if isinstance(exc, ResponseTooLarge):
        return str(exc)
    if isinstance(exc, openai.APIStatusError):
        return _status_reason(exc)
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out ({settings.timeout_s:g} s per attempt) {_after(_retries(exc))}"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot connect to {settings.base_url or 'the OpenAI API'} {_after(_retries(exc))}"
    return f"{type(exc).__name__}: {exc}"


def _reply_from(response: Any, requested_model: str) -> Reply | LLMRequestError:
    """The answer's text and model, or what is wrong with a response that is not a chat completion."""
    if isinstance(response, str):  # the client hands back a 200 that is not JSON as text
        return LLMRequestError(f"malformed response: not JSON: {_excerpt(response)}")
    choices = getattr(response, "choices", None)
    if not choices:
        return LLMRequestError("malformed response: no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        return LLMRequestError("malformed response: the first choice has no text")
    model = getattr(response, "model", None) or requested_model
    if _SURROGATE.search(content) or _SURROGATE.search(str(model)):
        return LLMRequestError("malformed response: not valid Unicode (a lone surrogate escape)")
    return Reply(text=content, model=str(model))


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON may escape them; no UTF-8 file can hold them


def _scrubbed(result: Reply | LLMRequestError, secret: str) -> Reply | LLMRequestError:
    """The result with the key removed wherever a server echoed it (answer, model name, error)."""
    if isinstance(result, Reply):
        return Reply(text=_redact(result.text, secret), model=_redact(result.model, secret))
    return LLMRequestError(_redact(str(result), secret))


class OpenAIBackend:
    """Any OpenAI-compatible chat server (vLLM, llama.cpp, Ollama, TGI, OpenAI) via the official client.

    Up to `concurrency` requests are in flight at once; each is retried by the client itself
    (see `_BoundedRetryClient`), each attempt has `timeout_s` for the whole exchange, and a
    response body is read up to `max_response_bytes` (see `_DeadlineTransport`). A request that
    still fails comes back as an `LLMRequestError` whose text says why; the client's own
    exceptions are not returned, because they carry the request and its Authorization header.
    The key is scrubbed from everything returned, answers included, in case a server echoes it.
    When a stop's grace period ends (`stopping.ABANDON`), requests in flight and retry waits end
    at once and `complete` raises `stopping.Abandoned`.

    The client lives for one `complete` call: its connections belong to that call's event loop.
    """

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self._key = _api_key(settings)

    def _client(self) -> _BoundedRetryClient:
        transport = _DeadlineTransport(self.settings.timeout_s, self.settings.max_response_bytes)
        client = _BoundedRetryClient(
            base_url=self.settings.base_url,
            api_key=self._key,
            timeout=self.settings.timeout_s,
            max_retries=self.settings.max_retries,
            http_client=openai.DefaultAsyncHttpxClient(transport=transport),
        )
        client.retry_wait_max_s = self.settings.retry_wait_max_s
        return client

    def complete(self, system: str, requests: Sequence[Request]) -> list[Reply | Exception]:
        if not requests:
            return []
        stopping.check()
        return _run_async(self._complete_all(system, requests))

    async def _complete_all(self, system: str, requests: Sequence[Request]) -> list[Reply | Exception]:
        """Every request, `concurrency` at a time, all cancelled as soon as the run is abandoned."""
        gate = asyncio.Semaphore(self.settings.concurrency)
        async with self._client() as client:

            async def one(request: Request) -> Reply | Exception:
                async with gate:
                    return await self._complete_one(client, system, request)

            work = asyncio.ensure_future(asyncio.gather(*(one(request) for request in requests)))
            watch = asyncio.ensure_future(_until_abandoned())
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            watch.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                stopping.check()
            return work.result()

    def _arguments(self, system: str, request: Request) -> dict[str, Any]:
        arguments: dict[str, Any] = dict(
            model=self.settings.model,
            messages=_conversation(system, request.text),
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_tokens=self.settings.max_new_tokens,
        )
        if self.settings.sampling:
            arguments["seed"] = _server_seed(request.seed)
        return arguments

    async def _complete_one(self, client: _BoundedRetryClient, system: str, request: Request) -> Reply | Exception:
        try:
            response = await client.chat.completions.create(**self._arguments(system, request))
        except openai.OpenAIError as exc:
            return _scrubbed(LLMRequestError(_failure_reason(exc, self.settings)), self._key)
        except UnicodeDecodeError:
            return LLMRequestError("malformed response: not valid UTF-8")
        return _scrubbed(_reply_from(response, self.settings.model), self._key)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.settings.model!r}, base_url={self.settings.base_url!r})"


def _server_seed(seed: int) -> int:
    """The row's seed in 31 bits: servers disagree on seed widths (llama.cpp reads 32 bits)."""
    return seed % 2**31


# --- enhance ---------------------------------------------------------------------------------------

BackendSource = Backend | Callable[[], Backend]


def _backend(source: BackendSource) -> Backend:
    """A backend, or a zero-argument factory called only now that one is needed."""
    return source if hasattr(source, "complete") else source()


def enhance(
    backend: BackendSource,
    settings: LLMSettings,
    model_identity: str,
    cache: AnswerCache,
    requests: Sequence[Request],
) -> list[Answer]:
    """Enhance each request's text into a Stable Diffusion prompt pair, one `Answer` per request.

    `backend` is a backend or a zero-argument factory for one: the factory is called only when
    some answer is missing from the cache, so a fully cached shard loads no model. Raw answers
    are cached as received up to `max_answer_chars` (failed requests are not, so they are asked again next time); the
    parse runs on every call. A server's failures come back as fallback rows; an exception from
    the local backend (out of memory, say) propagates, so the caller's batcher can split and retry.

    >>> settings = LLMSettings(backend="openai", model="qwen2.5", base_url="http://127.0.0.1:8000/v1")
    >>> cache = AnswerCache(Path("outputs/run/llm-answers.sqlite"))
    >>> answers = enhance(partial(OpenAIBackend, settings), settings, "qwen2.5", cache,
    ...                   [Request("Stoneware Coffee Mug, sand, stoneware", seed=1)])
    >>> answers[0].status, answers[0].positive, answers[0].negative
    ('ok', 'a sand-coloured stoneware coffee mug on a linen cloth, product photograph, …', 'blurry, …')
    """
    # 1. Keys, and the answers already cached
    system = system_prompt(settings)
    keys = [cache_key(settings, model_identity, system, request) for request in requests]
    replies: dict[str, Reply | Exception] = {}
    cached: set[str] = set()
    for key in keys:
        hit = cache.get(key)
        if hit is not None:
            replies[key] = hit
            cached.add(key)
    # 2. Ask the backend once per missing key, and cache what it answered
    missing: dict[str, Request] = {}
    for key, request in zip(keys, requests):
        if key not in replies:
            missing.setdefault(key, request)
    if missing:
        results = _backend(backend).complete(system, list(missing.values()))
        for key, result in zip(missing, results):
            if isinstance(result, Reply):
                result = Reply(kept_answer(result.text, settings.max_answer_chars), result.model)
                cache.put(key, result)
            else:
                log.warning("LLM request for %s failed: %s", _excerpt(missing[key].text), result)
            replies[key] = result
    # 3. Parse each answer, falling back to the input text
    return [_answer(replies[key], request, settings, key in cached) for key, request in zip(keys, requests)]


def _answer(result: Reply | Exception, request: Request, settings: LLMSettings, cached: bool) -> Answer:
    if isinstance(result, Exception):
        return Answer(request.text, None, "fallback", str(result), "", settings.model, cached)
    raw = kept_answer(result.text, settings.max_answer_chars)  # also cuts answers cached before a lower limit
    cut = _CUT.search(raw)
    if cut:
        reason = f"answer too long: {int(cut[1]):,} characters (max_answer_chars {settings.max_answer_chars:,})"
        return Answer(request.text, None, "fallback", reason, raw, result.model, cached)
    positive, negative, status, reason = parse_answer(raw, request.text, settings.max_prompt_chars)
    return Answer(positive, negative, status, reason, raw, result.model, cached)
