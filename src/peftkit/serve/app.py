"""The HTTP API of `peftkit serve`: a FastAPI application over one `Engine`, shaped like OpenAI's.

Routes (all under an optional API key, ``Authorization: Bearer KEY``, except ``/health``):

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: the ``model`` field names the base model or an
  adapter; ``stream: true`` sends server-sent events ending with ``data: [DONE]``;
* ``GET /v1/models`` (and ``/v1/models/{name}``): what can be asked for;
* ``POST /v1/adapters`` ``{"name": ..., "path": ...}`` loads a LoRA adapter folder from under the server's
  adapter root (``--adapter-root``; a relative path starts there; without a root: 403; a path outside it gets the
  message a missing one gets, naming neither). One trained on other base weights gets 400 ``base_mismatch`` unless
  ``"allow_base_mismatch": true``; the reply's ``warnings`` say what else differs from its training, e.g. a QLoRA
  adapter on a full-precision base. ``DELETE /v1/adapters/{name}`` unloads one once its requests in flight have
  finished;
* ``GET /health``: whether the server takes requests, and how many are decoding and waiting (no model names: it
  needs no key).

A chat request for an adapter goes in as the adapter's training saw its prompts, as ``peftkit generate`` sends
them (`peftkit.core.context`): each user message put after the instruction its training rows shared, the system
message they started with (unless the request brings its own), in the chat template they were rendered with; the
base model and adapters without a record use the model's template (or ``template``). The answer ends at that
template's end of turn. ``"peftkit_raw": true`` sends the messages as they are, in the model's template.
``/v1/completions`` prompts always go in as they are.

Decoding is greedy unless ``temperature`` > 0 (then ``top_p`` and ``seed`` apply). Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the status saying whose fault it is: 400 bad request,
401 wrong API key, 403 adapter loading off, 404 unknown model, 409 name taken, 429 queue full, 503 shutting down.
A client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.core.context import TrainingContext
from peftkit.data.sequences import prompt_text, turn_end
from peftkit.errors import PeftkitError
from peftkit.serve.engine import Delta, Engine, Failed, Finished, Generation, SamplingParams, ServeError

__all__ = ["as_trained", "create_app"]

log = logging.getLogger("peftkit.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the OpenAI API that peftkit does not use are ignored


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: decode exactly max_tokens tokens (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    best_of: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    peftkit_raw: bool = False  # the messages as sent, in the model's template: no recorded training context


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str = Field(min_length=1)
    allow_base_mismatch: bool | None = None  # None: as the server was started (--allow-base-mismatch)


def _unsupported(body: _Sampling) -> str | None:
    """The first request field set to something peftkit serve does not do, as a message."""
    checks = [
        (body.n != 1, "n", "only n=1 is supported (one choice per request)"),
        (bool(body.presence_penalty), "presence_penalty", "presence_penalty is not supported"),
        (bool(body.frequency_penalty), "frequency_penalty", "frequency_penalty is not supported"),
        (bool(body.logit_bias), "logit_bias", "logit_bias is not supported"),
        (body.logprobs not in (None, False, 0), "logprobs", "logprobs are not supported"),
        (body.best_of not in (None, 1), "best_of", "best_of is not supported"),
    ]
    if isinstance(body, ChatRequest):
        checks += [
            (bool(body.tools), "tools", "tools are not supported"),
            (body.response_format not in (None, {"type": "text"}), "response_format",
             "response_format other than text is not supported"),
        ]
    if isinstance(body, CompletionRequest):
        checks += [(body.echo, "echo", "echo is not supported"),
                   (bool(body.suffix), "suffix", "suffix is not supported")]
    for bad, param, message in checks:
        if bad:
            return param + ": " + message
    return None


def create_app(engine: Engine, api_key: str | None = None, template: str | None = None,
               default_max_tokens: int = 256, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI application serving `engine` (started and shut down with the application's lifespan).

    Args:
        api_key: if set, every ``/v1`` route wants ``Authorization: Bearer <api_key>``.
        template: named chat template for the base model and adapters that record none (as in ``peftkit generate``).
        default_max_tokens: new tokens of a chat completion that gives no max_tokens (capped by the context).
        shutdown_timeout: seconds the engine lets accepted requests finish when the application stops.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="peftkit serve", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:  # no key, so no names: only whether it serves, and how busy it is
        status = "ok" if engine.accepting else "shutting_down"
        return {"status": status, **engine.load(), "stats": dict(engine.stats)}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(api_key))])
    v1.include_router(_model_routes(engine))
    v1.include_router(_completion_routes(engine, TrainingContext(template=template), default_max_tokens))
    app.include_router(v1)
    return app


def _key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """The dependency that checks ``Authorization: Bearer <api_key>`` (nothing without a key)."""

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ServeError("missing or wrong API key (send Authorization: Bearer <key>)", status=401,
                             code="invalid_api_key")

    return check_key


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON shape, with the status saying whose fault it is."""

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, e: ServeError) -> JSONResponse:
        return _error(e.status, str(e), e.code, e.param)

    @app.exception_handler(PeftkitError)
    async def peftkit_error(_: Request, e: PeftkitError) -> JSONResponse:
        return _error(400, str(e), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return _error(400, f"the request body is not valid JSON: {detail}", "invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "http_error")


def _model_routes(engine: Engine) -> APIRouter:
    """``/models`` (what can be asked for) and ``/adapters`` (loading and unloading them)."""
    router = APIRouter()

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine, name) for name in engine.models()]}

    @router.get("/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name not in engine.models():
            raise ServeError(f"model {name!r} does not exist", status=404, code="model_not_found")
        return _model_card(engine, name)

    @router.post("/adapters")
    async def load_adapter(body: AdapterRequest) -> dict[str, Any]:
        if body.name in engine.models():
            raise ServeError(f"a model named {body.name!r} is already served", status=409, code="model_exists")
        attached = await asyncio.to_thread(engine.load_adapter, body.name, body.path, body.allow_base_mismatch,
                                           remote=True)
        await asyncio.wrap_future(attached)
        for warning in engine.warnings.get(body.name, []):
            log.warning("peftkit serve: warning: %s", warning)
        return _model_card(engine, body.name)

    @router.delete("/adapters/{name:path}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.wrap_future(engine.remove_adapter(name))
        return {"id": name, "object": "model", "deleted": True}

    return router


def _completion_routes(engine: Engine, plain: TrainingContext, default_max_tokens: int) -> APIRouter:
    """``/chat/completions`` (prompts as the adapter's training saw them) and ``/completions`` (as they are).

    `plain`: the context of the base model, of adapters without a record, and of ``peftkit_raw`` requests.
    """
    router = APIRouter()
    end_of_turn = functools.lru_cache(maxsize=64)(functools.partial(_end_of_turn, engine.tokenizer))

    @router.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        context = (None if body.peftkit_raw else engine.context(body.model)) or plain
        messages = as_trained(context, [m.as_dict() for m in body.messages])
        text = prompt_text(engine.tokenizer, messages, context.chat_template)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        stop = end_of_turn(context.chat_template)
        return await _complete(engine, body, ids, request, "chat.completion", default_max_tokens, stop)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ServeError(f"prompt: one prompt per request is supported, got a list of {len(prompt)}",
                                 param="prompt")
            prompt = prompt[0]
        ids = engine.tokenizer(prompt)["input_ids"]
        return await _complete(engine, body, ids, request, "text_completion", 16)  # 16: OpenAI's default

    return router


def as_trained(context: TrainingContext, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` as the adapter's training built them (`TrainingContext.conversation`, as ``peftkit generate``):
    every user message put after the recorded instruction, and the recorded system message first unless the
    request starts with its own."""
    out = [m for m in context.conversation("")[:-1] if messages[0]["role"] != "system"]
    for m in messages:
        content = context.conversation(m["content"])[-1]["content"] if m["role"] == "user" else m["content"]
        out.append({"role": m["role"], "content": content})
    return out


def _end_of_turn(tokenizer: Any, template: str | None) -> tuple[tuple[str, ...], frozenset[int]]:
    """How an answer in `template` ends, as ``peftkit generate`` stops it (`peftkit.generation._stopping`):
    (stop strings, stop tokens): its end-of-turn token when the end of turn is one token, else its text."""
    end = turn_end(tokenizer, template)
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    if len(ids) == 1:
        return (), frozenset(ids)
    return ((end,) if ids else ()), frozenset()


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    parent = None if name == engine.base_name else engine.base_name
    context = engine.contexts.get(name)
    return {"id": name, "object": "model", "created": 0, "owned_by": "peftkit", "parent": parent,
            "root": engine.folders.get(name, engine.base_name),
            "training_context": None if context is None else context.describe(),
            "warnings": engine.warnings.get(name, [])}


def _sampling(body: _Sampling, n_prompt: int, room: int, default: int) -> SamplingParams:
    problem = _unsupported(body)
    if problem:
        raise ServeError(problem, param=problem.split(":")[0])
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ServeError("stop: at most 4 stop strings, none empty", param="stop")
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
    if max_tokens is None:
        if room <= 0:
            raise ServeError(f"the prompt has {n_prompt} tokens, as many as the model's context; nothing is left "
                             "to generate", code="context_length_exceeded", param="messages")
        max_tokens = min(default, room)
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature or 0.0,
                          top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=tuple(stop),
                          ignore_eos=body.ignore_eos)


async def _complete(engine: Engine, body: _Sampling, ids: list[int], request: Request, kind: str,
                    default_max_tokens: int,
                    end: tuple[tuple[str, ...], frozenset[int]] = ((), frozenset())) -> Any:
    params = _sampling(body, len(ids), engine.max_model_len - len(ids), default_max_tokens)
    params = dataclasses.replace(params, stop=params.stop + end[0], stop_token_ids=end[1])
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: Any) -> None:  # called from the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, event)

    gen = engine.submit(body.model, ids, params, emit, deltas=body.stream)
    meta = {"id": ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, gen, events, meta, kind, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    end = await _wait_unless_disconnected(engine, gen, events, request)
    if end is None:
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    if isinstance(end, Failed):
        return _error(end.status, end.message, "generation_failed")
    choice: dict[str, Any] = {"index": 0, "finish_reason": end.reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": end.text}
    else:
        choice["text"] = end.text
    return {**meta, "object": kind, "choices": [choice], "usage": _usage(end)}


def _usage(end: Finished) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


async def _wait_unless_disconnected(engine: Engine, gen: Generation, events: asyncio.Queue,
                                    request: Request) -> Finished | Failed | None:
    """The request's last event, or None (and the request cancelled) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return None
            event = get.result()
            if isinstance(event, (Finished, Failed)):
                return event
    finally:
        watch.cancel()
        engine.cancel(gen)  # a no-op once finished


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(engine: Engine, gen: Generation, events: asyncio.Queue, meta: dict[str, Any], kind: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that disconnects cancels it (the generator is closed)."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({**meta, "object": obj, "choices": [choice]})

    try:
        if chat:
            yield chunk(None, first=True)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk(event.text)
            elif isinstance(event, Finished):
                yield chunk(None, finish=event.reason)
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(event)})
                yield "data: [DONE]\n\n"
                return
            else:
                kind_ = _TYPES.get(event.status, "server_error")
                yield _sse({"error": {"message": event.message, "type": kind_, "param": None,
                                      "code": "generation_failed"}})
                return
    finally:
        engine.cancel(gen)  # a no-op once finished
