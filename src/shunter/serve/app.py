"""The HTTP side: OpenAI's completions and chat completions (streamed as server-sent events or
whole), models, health and metrics, on FastAPI. Every bad request is answered with OpenAI's
error JSON and a 4xx status; the engine thread (serve.scheduler) never sees one. One room: the
routes share the request checks and the streaming of one engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shunter.model.sampling import PENALTY_RANGE, SamplingParams
from shunter.model.tokenizer import Tokenizer
from shunter.serve.chat import Message
from shunter.serve.metrics import ServerMetrics
from shunter.serve.scheduler import ContinuousBatcher, GenerationRequest, QueueFull, TokenEvent

MAX_STOP_STRINGS = 4  # OpenAI's limit
SEED_LIMIT = 2**63


@dataclass
class ServedModel:
    """What the HTTP side needs to know of the model: its name, vocabulary, context, text."""

    name: str
    vocab_size: int
    max_context: int
    tokenizer: Tokenizer | None
    chat_template: Callable[[list[Message]], str]


class OpenAIError(Exception):
    """A request the server refuses: becomes {"error": {message, type, param, code}} and `status`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies ------------------------------------------------------------------------------
# Unknown fields are refused as OpenAI does; fields OpenAI defines that this server does not
# implement are accepted at their neutral value and refused otherwise (see _refuse_unsupported).
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    # sampling
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    frequency_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    # length and stopping
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # an extension vLLM and llama.cpp share: generate max_tokens whatever comes
    # streaming
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their neutral value only
    n: int = 1
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: kept for the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None


_Body.model_rebuild()
CompletionBody.model_rebuild()
ChatMessage.model_rebuild()
ChatBody.model_rebuild()


def _refuse_unsupported(body: _Body) -> None:
    if body.n != 1:
        raise OpenAIError("only n=1 is supported: send one request per completion", "n")
    if body.logprobs not in (None, False, 0):
        raise OpenAIError("logprobs are not supported", "logprobs")
    if body.logit_bias:
        raise OpenAIError("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionBody):
        if body.echo:
            raise OpenAIError("echo is not supported", "echo")
        if body.best_of not in (None, 1):
            raise OpenAIError("only best_of=1 is supported", "best_of")
        if body.suffix:
            raise OpenAIError("suffix is not supported", "suffix")
    if isinstance(body, ChatBody) and body.top_logprobs:
        raise OpenAIError("top_logprobs is not supported", "top_logprobs")


# -- from a body to an engine request ------------------------------------------------------------
def _prompt_ids(body: CompletionBody, served: ServedModel) -> list[int]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise OpenAIError("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _encode(prompt, served, "prompt")
    bad = [i for i in prompt if not 0 <= i < served.vocab_size]
    if bad:
        raise OpenAIError(
            f"token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})",
            "prompt",
            "invalid_token_id",
        )
    return list(prompt)


def _encode(text: str, served: ServedModel, param: str) -> list[int]:
    if served.tokenizer is None:
        raise OpenAIError(
            f"the model {served.name} has no tokenizer.json: send the prompt as token ids", param
        )
    return served.tokenizer.encode(text)


def _chat_ids(body: ChatBody, served: ServedModel) -> list[int]:
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    try:
        text = served.chat_template(messages)
    except ValueError as exc:
        raise OpenAIError(str(exc), "messages") from None
    return _encode(text, served, "messages")


def _check_lengths(prompt: list[int], max_tokens: int | None, served: ServedModel, param: str) -> int:
    """max_tokens (given or the rest of the context) once the prompt and it fit the context."""
    if not prompt:
        raise OpenAIError("the prompt is empty", param)
    room = served.max_context - len(prompt)
    if room < 1:
        raise OpenAIError(
            f"this model's maximum context length is {served.max_context} tokens; the prompt has "
            f"{len(prompt)}, leaving no room to generate",
            param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise OpenAIError(
            f"this model's maximum context length is {served.max_context} tokens; the prompt has "
            f"{len(prompt)} and max_tokens asks for {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def _stops(body: _Body) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise OpenAIError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    return tuple(s for s in stops if s)


def _sampling(body: _Body) -> SamplingParams:
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_LIMIT)
    return SamplingParams(body.temperature, body.top_p, seed, body.frequency_penalty, body.presence_penalty)


def _usage(event: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# -- the app -------------------------------------------------------------------------------------
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: counts every HTTP answer by endpoint and status (streams included); any
    other path counts as "other", so random paths cannot grow the metrics without bound."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(batcher: ContinuousBatcher, served: ServedModel, metrics: ServerMetrics) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="shunter serve", lifespan=lifespan)
    app.add_middleware(_CountRequests, metrics=metrics)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": (), "type": ""}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, queued = batcher.counts
        return {"status": "ok", "active_sequences": active, "queued_requests": queued}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": created, "owned_by": "shunter"}
        return {"object": "list", "data": [card | {"max_model_len": served.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Response:
        _refuse_unsupported(body)
        prompt = _prompt_ids(body, served)
        max_tokens = _check_lengths(prompt, body.max_tokens, served, "prompt")
        return await _run(body, http, prompt, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request) -> Response:
        _refuse_unsupported(body)
        prompt = _chat_ids(body, served)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _check_lengths(prompt, requested, served, "messages")
        return await _run(body, http, prompt, max_tokens, chat=True)

    async def _run(body: _Body, http: Request, prompt: list[int], max_tokens: int, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody listens
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = GenerationRequest(
            prompt, max_tokens, _sampling(body), deliver, _stops(body), body.ignore_eos
        )
        try:
            batcher.submit(request)
        except QueueFull:
            raise OpenAIError(
                "the server's queue is full: retry later",
                None,
                "rate_limit_exceeded",
                429,
                "rate_limit_error",
            ) from None
        shape = _ResponseShape(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, served.name, chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(request, events, shape, include_usage, http)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            collected = await _collect(events, http)
        finally:
            batcher.cancel(request)  # a no-op once it finished; frees the row if the client left
        if collected is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        tokens, text, last = collected
        if last.finish_reason == "error":
            raise OpenAIError(f"the engine failed: {last.error}", None, "engine_error", 500, "server_error")
        return JSONResponse(shape.whole(text, tokens, last))

    async def _stream(
        request: GenerationRequest,
        events: asyncio.Queue[TokenEvent],
        shape: _ResponseShape,
        include_usage: bool,
        http: Request,
    ) -> AsyncIterator[str]:
        try:
            if shape.chat:
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, [], None, include_usage))
            while True:
                event = await events.get()
                if event.finish_reason == "error":
                    message = f"the engine failed: {event.error}"
                    yield _sse(error_body(message, "server_error", None, "engine_error"))
                    break
                if event.text or event.finish_reason is None:
                    delta = {"content": event.text} if shape.chat else event.text
                    yield _sse(shape.chunk(delta, event.token_ids, None, include_usage))
                    event_ids: list[int] = []
                else:
                    event_ids = event.token_ids
                if event.finish_reason is not None:
                    yield _sse(
                        shape.chunk({} if shape.chat else "", event_ids, event.finish_reason, include_usage)
                    )
                    if include_usage:
                        yield _sse(shape.usage_chunk(event))
                    break
                if await http.is_disconnected():
                    break
            yield _sse("[DONE]")
        finally:
            batcher.cancel(request)  # a no-op once finished; a client gone mid-stream frees its row

    return app


async def _collect(
    events: asyncio.Queue[TokenEvent], http: Request
) -> tuple[list[int], str, TokenEvent] | None:
    """A whole completion's ids, text and last event; None when the client went away first."""
    tokens, text = [], []
    while True:
        event = await events.get()
        tokens += event.token_ids
        text.append(event.text)
        if event.finish_reason is not None:
            return tokens, "".join(text), event
        if await http.is_disconnected():
            return None


@dataclass
class _ResponseShape:
    """OpenAI's response objects for one request. Each choice also carries `token_ids`, the
    generated ids (an extension: OpenAI returns text only)."""

    id: str
    model: str
    chat: bool

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def _head(self, streamed: bool) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        )
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(
        self, delta: dict[str, str] | str, token_ids: list[int], finish: str | None, include_usage: bool
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice |= {"delta": delta, "logprobs": None}
        else:
            choice |= {"text": delta, "logprobs": None}
        choice |= {"finish_reason": finish, "token_ids": token_ids}
        out = self._head(True) | {"choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, last: TokenEvent) -> dict[str, Any]:
        return self._head(True) | {"choices": [], "usage": _usage(last)}

    def whole(self, text: str, token_ids: list[int], last: TokenEvent) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice |= {"message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice |= {"text": text, "logprobs": None}
        choice |= {"finish_reason": last.finish_reason, "token_ids": token_ids}
        return self._head(False) | {"choices": [choice], "usage": _usage(last)}
