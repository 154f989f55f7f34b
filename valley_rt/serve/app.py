"""The HTTP layer: `build_app(engine, settings)` -> a FastAPI app with thin OpenAI-compatible handlers.

Handlers parse and answer; the engine does the work. One exception handler turns every error into an
OpenAI error object ({"error": {"message", "type", "param", "code"}}) with its 4xx status (a 5xx only
for a bug). The body is read by hand rather than by FastAPI's model binding, so a wrong content type is
a 415, malformed JSON a 400 naming the position, and an oversized body a 413 cut off while it is
being received (`BodyLimit`). The lifespan hook closes the engine after uvicorn has drained the
in-flight requests (SIGTERM: stop accepting, finish what is running, exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from valley_rt.errors import ValleyError
from valley_rt.serve.engine import Completion, ServeEngine, Settings
from valley_rt.serve.llm import GenOutcome
from valley_rt.serve.media import APIError
from valley_rt.serve.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
                                      Delta, ErrorInfo, ErrorResponse, ModelCard, ModelList, ResponseMessage,
                                      UnsupportedField, Usage, completion_id)
from valley_rt.prompt import clean_answer

log = logging.getLogger("valley_rt.serve")


def error_response(e: Exception) -> JSONResponse:
    """Every error as an OpenAI error object."""
    if isinstance(e, APIError):
        status, info, headers = e.status, ErrorInfo(message=str(e), type=e.type, param=e.param, code=e.code), e.headers
    elif isinstance(e, ValleyError):  # a bad video, a bad frame count, ...: the client's input
        status, headers = 400, {}
        info = ErrorInfo(message=str(e), type="invalid_request_error", code=type(e).__name__)
    elif isinstance(e, StarletteHTTPException):
        status, headers = e.status_code, dict(e.headers or {})
        info = ErrorInfo(message=str(e.detail), type="invalid_request_error" if status < 500 else "server_error")
    else:
        log.exception("internal error", exc_info=e)
        status, headers = 500, {}
        info = ErrorInfo(message=f"internal error: {type(e).__name__}", type="server_error")
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body",))
    extra = f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return APIError(f"{loc}: {first.get('msg')}{extra}" if loc else f"{first.get('msg')}{extra}", param=loc or None,
                    code="invalid_field" if first.get("type") != "extra_forbidden" else "unknown_field")


class BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` (by Content-Length at once, else while it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(f"request body is over {self.max_bytes} bytes (server limit --max-body-mb)", status=413,
                           code="limit_exceeded", param="--max-body-mb")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        await self.app(scope, limited, send)


def build_app(engine: ServeEngine, settings: Settings | None = None) -> FastAPI:
    settings = settings or engine.settings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await engine.close()  # uvicorn has drained the in-flight requests by now

    app = FastAPI(title="valley-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * (1 << 20)))

    @app.exception_handler(Exception)
    async def _any(request, e):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(validation_error(e))

    @app.exception_handler(ValleyError)
    async def _valley(request, e):
        if isinstance(e, APIError) and e.status < 500:
            engine.metrics.errors.labels(e.code or e.type).inc()
        elif not isinstance(e, APIError):
            engine.metrics.errors.labels(type(e).__name__).inc()
        return error_response(e)

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name, root=engine.valley.source,
                                         max_model_len=engine.llm.max_context)]).model_dump()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse_request(request, settings)
        c = await engine.generate(req, engine.admit())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = await started(engine.events(c))
            return StreamingResponse(stream(events, settings.model_name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(engine, c, request, settings.model_name)

    return app


async def parse_request(request: Request, settings: Settings) -> ChatCompletionRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415,
                       code="unsupported_media_type")
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    try:
        req.check_supported()
    except UnsupportedField as e:
        raise APIError(str(e), param=e.field, code="unsupported_field") from None
    if req.model not in (None, "", settings.model_name):
        raise APIError(f"model {req.model!r} is not served here (serving {settings.model_name!r})", status=404,
                       code="model_not_found", param="model")
    return req


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def usage(out: GenOutcome) -> Usage:
    n = len(out.token_ids)
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=n, total_tokens=out.prompt_tokens + n,
                 prompt_tokens_details={"cached_tokens": out.cached_tokens})


def finish_reason(out: GenOutcome) -> str:
    return "length" if out.finish_reason == "length" else "stop"


async def complete(engine: ServeEngine, c: Completion, request: Request, model: str) -> dict:
    """A whole answer; a client that hangs up meanwhile cancels the generation."""

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        c.cancel()

    watcher = asyncio.create_task(watch())
    try:
        out = None
        async for kind, item in engine.events(c):
            if kind == "done":
                out = item
    finally:
        watcher.cancel()
    return ChatCompletion(id=completion_id(), model=model, usage=usage(out),
                          choices=[Choice(message=ResponseMessage(content=clean_answer(out.text)),
                                          finish_reason=finish_reason(out))]).model_dump(exclude_none=True)


async def started(events):
    """The generation's events, its first one awaited before the response starts: an error before the
    first token (an LLM server that is down: 503) gets its own HTTP status and error object instead of
    a 200 followed by an error in the stream. The first event comes with the first token (or the end)."""
    first = await anext(events)

    async def chained():
        try:
            yield first
            async for item in events:
                yield item
        finally:
            await events.aclose()  # cancels the generation when the client went away

    return chained()


async def stream(events, model: str, include_usage: bool):
    """SSE chunks in the OpenAI format from a generation's events (`started`); the last is
    `data: [DONE]`. An error after the 200 is sent goes out as an error object in the stream (as vLLM
    does)."""
    cid, created = completion_id(), int(time.time())

    def chunk(delta: Delta, finish=None, usage_=None, choices=True) -> str:
        obj = ChatCompletionChunk(id=cid, created=created, model=model, usage=usage_,
                                  choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
        return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"

    try:
        async for kind, item in events:
            if kind == "first":  # the role chunk goes out with the first token: a client's TTFT is real
                yield chunk(Delta(role="assistant", content=""))
            elif kind == "text":
                yield chunk(Delta(content=item))
            elif kind == "done":
                yield chunk(Delta(), finish=finish_reason(item))
                if include_usage:
                    yield chunk(Delta(), usage_=usage(item), choices=False)
    except ValleyError as e:
        body = json.loads(error_response(e).body)
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
