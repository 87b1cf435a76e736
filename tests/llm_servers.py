"""A real OpenAI-compatible HTTP server for the tests, on 127.0.0.1, with scripted misbehaviour.

It speaks `POST /v1/chat/completions` in the OpenAI response format, like vLLM, llama.cpp or
Ollama do, so the official `openai` client runs its real request, retry and parsing code against
it. The requested model name picks the behaviour, so one server covers every case:

- `normal`: answers "Positive Prompt: …" / "Negative Prompt: …" built from the user's text
  (after `delay_s`, so concurrent requests overlap); the seed, when sent, shows in the answer
- `slow`: sleeps `slow_s` before answering, past the client's timeout
- `flaky`: the first request for each user text gets 429, later ones an answer
- `broken`: 500 always
- `garbage-text`: 200 with a body that is not JSON
- `garbage-json`: 200 with JSON that has no `choices`
- `refuse`: 400 always, with an error body that echoes the caller's Authorization header
  (a careless server does exactly that; the client must not pass it on)
- `echo-key`: a good answer, and a model name, that both echo the Authorization header
- `huge`: a good answer padded to `huge_chars` characters
- `bad-utf8`: 200 with a JSON body that is not valid UTF-8
- `trickle`: headers at once, then the body one byte every `trickle_s` seconds
- `held`: answers as `normal` does once the test adds a word of the user's text to `released`
  (a shard held in flight exactly as long as the test wants)

Every request is counted per model, with its Authorization header, its body and how many
requests were in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

NEGATIVE = "blurry, low quality, watermark"


@dataclass
class ServerState:
    """What the server saw, read by the tests (guarded by `lock`)."""

    delay_s: float = 0.05
    slow_s: float = 2.0
    huge_chars: int = 10 * 2**20
    trickle_s: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)  # model -> requests received
    bodies: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    seen_texts: set[tuple[str, str]] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0
    released: set[str] = field(default_factory=set)  # `held`: answer texts holding any of these

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bodies.clear()
            self.authorization.clear()
            self.seen_texts.clear()
            self.max_in_flight = 0


def _user_text(body: dict[str, Any]) -> str:
    for message in body.get("messages", []):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    """A chat completion in the OpenAI response format; the answering model is the served name."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"served/{body.get('model')}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "test_error", "code": status}}, status_code=status)


def normal_answer(text: str, seed: int | None) -> str:
    """What `normal` answers for `text`; tests compare against it."""
    positive = f"product photograph of {text}, studio lighting, high detail"
    if seed is not None:
        positive += f", variation {seed}"
    return f"Positive Prompt: {positive}\nNegative Prompt: {NEGATIVE}"


async def _trickle(content: bytes, every_s: float):
    for index in range(len(content)):
        yield content[index:index + 1]
        await asyncio.sleep(every_s)


async def _respond(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
    model = body.get("model")
    text = _user_text(body)
    if model == "normal":
        await asyncio.sleep(state.delay_s)
        return JSONResponse(_completion(body, normal_answer(text, body.get("seed"))))
    if model == "held":
        while not any(word in text for word in set(state.released)):
            await asyncio.sleep(0.02)
        return JSONResponse(_completion(body, normal_answer(text, None)))
    if model == "slow":
        await asyncio.sleep(state.slow_s)
        return JSONResponse(_completion(body, normal_answer(text, None)))
    if model == "flaky":
        with state.lock:
            first = (model, text) not in state.seen_texts
            state.seen_texts.add((model, text))
        if first:
            return _error(429, "rate limited, try again")
        return JSONResponse(_completion(body, normal_answer(text, None)))
    if model == "broken":
        return _error(500, "the model crashed")
    if model == "garbage-text":
        return PlainTextResponse("<html>upstream proxy error</html>", status_code=200)
    if model == "garbage-json":
        return JSONResponse({"result": "no choices here"})
    if model == "refuse":
        return _error(400, f"bad request from {request.headers.get('authorization')}")
    if model == "echo-key":
        authorization = request.headers.get("authorization", "")
        answer = _completion(body, normal_answer(f"{text} ({authorization})", None))
        answer["model"] = f"served for {authorization}"
        return JSONResponse(answer)
    if model == "huge":
        return JSONResponse(_completion(body, normal_answer(text, None) + ", more" * (state.huge_chars // 6)))
    if model == "bad-utf8":
        content = json.dumps(_completion(body, normal_answer("CAFE_MUG", None))).encode()
        return Response(content.replace(b"CAFE_MUG", b"caf\xe9 \xff\xfe mug"), media_type="application/json")
    if model == "trickle":
        return StreamingResponse(_trickle(json.dumps(_completion(body, normal_answer(text, None))).encode(),
                                          state.trickle_s), media_type="application/json")
    return _error(404, f"unknown model {model!r}")


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        with state.lock:
            state.requests[body.get("model")] += 1
            state.bodies.append(body)
            state.authorization.append(request.headers.get("authorization", ""))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await _respond(state, request, body)
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LLMServer:
    """The app under uvicorn in a background thread; `url` is the OpenAI `base_url` (…/v1)."""

    def __init__(self, state: ServerState | None = None):
        self.state = state or ServerState()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(
            make_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="llm-test-server", daemon=True)

    def start(self) -> LLMServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test LLM server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop after the requests in flight (a `slow` one sleeps on after its client gave up)."""
        deadline = time.monotonic() + self.state.slow_s + 5
        while self.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._server.should_exit = True
        self._thread.join(timeout=10)
