"""OpenAI-compatible inference: /v1/models, /v1/completions and /v1/chat/completions (streaming or not)."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import functools
import logging
import time
from typing import Any

from daemon.server.auth import require_api_key
from daemon.server.context import INLINE_BYTES, ServerContext
from daemon.server.middleware import BodyRefused, BodySizeLimit
from daemon.server.protocol import ApiError, Shape, finish_error, prompt_ids, sampling, sse, usage_of
from daemon.server.text import Detokenizer

log = logging.getLogger("lorad.server")
COMPLETION_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat?


def routes(ctx: ServerContext) -> Any:
    """GET /v1/models, POST /v1/completions and /v1/chat/completions."""
    from fastapi import APIRouter, Request, Response
    from fastapi.responses import JSONResponse

    from daemon import engine as eng

    daemon = ctx.daemon
    router = APIRouter()

    @router.get("/v1/models")
    def models(request: Request) -> Response:
        from daemon import registry

        try:
            require_api_key(ctx.serve, request)
        except ApiError as e:
            ctx.count("/v1/models", e.status)
            return e.response()
        engine = getattr(daemon, "engine", None)
        champion = eng.label(engine.champion) if engine is not None else None
        created = int(getattr(daemon, "started_at", time.time()))
        data = [{"id": "lorad", "object": "model", "created": created, "owned_by": "lorad", "root": champion},
                {"id": eng.BASE_LABEL, "object": "model", "created": created, "owned_by": "lorad",
                 "root": _public_name(daemon.cfg.model.base_model)}]
        if daemon.store is not None:
            for row in registry.list_adapters(daemon.store):
                data.append({"id": row["version"], "object": "model", "created": int(row["created_at"]),
                             "owned_by": "lorad", "parent": row["parent"], "champion": row["champion"]})
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(ctx, request, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(ctx, request, chat=True)

    return router


class Completions:
    """ASGI in front of the app: ``POST /v1/completions`` and ``/v1/chat/completions`` go straight to
    ``generate`` (behind the same body limit, with the same answer to an unexpected error); every other request
    goes to ``app``. Saves FastAPI's routing, middleware stack and per-chunk send wrappers on the hot path."""

    def __init__(self, app: Any, ctx: ServerContext):
        self.app, self.ctx = app, ctx
        self.limited = BodySizeLimit(self._generate, max_bytes=ctx.serve.max_body_bytes,
                                     timeout=ctx.serve.body_timeout_seconds, on_refused=ctx.count)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in COMPLETION_PATHS:
            await self.limited(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _generate(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.requests import Request

        path = scope["path"]
        try:
            response = await generate(self.ctx, Request(scope, receive, send), chat=COMPLETION_PATHS[path])
        except BodyRefused:
            raise  # the body limit answers 413 / 408 itself
        except Exception as exc:  # a bug, not the client's fault: as the app's own handler answers it
            log.error("unhandled error", exc_info=exc, extra={"path": path})
            self.ctx.count(path, 500)
            response = ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                code="internal_error").response()
        await response(scope, receive, send)


def _public_name(base_model: str) -> str:
    """A hub id as it is; a local folder by its last name only (a path tells callers about the host)."""
    from pathlib import Path

    return Path(base_model).name if base_model.startswith(("/", ".", "~")) else base_model


async def _admit(ctx: ServerContext, request: Any, *, chat: bool) -> tuple:
    """Authenticate, parse, tokenize (in the request pool when the body is large) and submit: (engine, handle,
    stops, body).

    Raises:
        ApiError: whatever is wrong with the request, or the engine's refusal (429, 404, 503).
    """
    import asyncio

    from starlette.concurrency import run_in_threadpool

    from daemon import engine as eng

    serve = ctx.serve
    require_api_key(serve, request)
    engine = ctx.engine_or_503()
    body, size = await ctx.json_body_sized(request)
    params, stops = sampling(body, chat=chat, max_new_tokens=serve.max_new_tokens)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if size <= INLINE_BYTES:  # a small body tokenizes faster than a trip through the pool
        ids = prompt_ids(engine.tokenizer, body, chat=chat, max_prompt_tokens=serve.max_prompt_tokens)
    else:
        ids = await ctx.cpu(prompt_ids, engine.tokenizer, body, chat=chat,
                            max_prompt_tokens=serve.max_prompt_tokens)
    loop = asyncio.get_running_loop()
    try:
        handle = engine.submit(ids, model=model, params=params, loop=loop, load=False)
        if handle is None:  # the pinned version must be loaded first: seconds, so not on the event loop
            handle = await run_in_threadpool(engine.submit, ids, model=model, params=params, loop=loop)
    except eng.EngineError as e:
        headers = {"Retry-After": "1"} if isinstance(e, eng.QueueFull) else None
        raise ApiError(e.status, str(e), code=e.code, param="model" if e.status == 404 else None,
                       headers=headers) from None
    return engine, handle, stops, body


async def generate(ctx: ServerContext, request: Any, *, chat: bool) -> Any:
    """One completion request: validate, submit to the engine pinned to a version, answer or stream."""
    import asyncio

    from fastapi.responses import JSONResponse

    route = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        engine, handle, stops, body = await _admit(ctx, request, chat=chat)
    except ApiError as e:
        ctx.count(route, e.status, t0)
        return e.response()
    stream = body.get("stream") is True
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    request_id = ("chatcmpl-" if chat else "cmpl-") + handle.id
    headers = {"x-lorad-adapter": handle.label, "x-request-id": request_id}
    log.debug("request admitted", extra={"id": request_id, "model": handle.label,
                                         "prompt_tokens": len(handle.prompt_ids), "stream": stream})
    shape = Shape(chat=chat, id=request_id, model=handle.label, created=int(time.time()))
    if stream:
        return event_stream(_stream(ctx, handle, engine, stops, shape, include_usage, route, t0), handle, headers)
    detok = Detokenizer(engine.tokenizer, stops)
    hangup = asyncio.get_running_loop().create_task(_interrupt_on_disconnect(request.receive, handle))
    try:
        async for batch in handle.abatches():
            ids = [e[1] for e in batch if e[0] == "token"]
            if ids:
                detok.push_many(ids)
                if detok.stopped:
                    handle.cancel()
                    break
    finally:
        hangup.cancel()
        if not handle.done:
            handle.cancel()
    if handle.interrupted:
        ctx.count(route, 499, t0)  # nobody reads the answer
        return ApiError(499, "the client closed the connection", code="client_disconnected").response()
    error = finish_error(handle, detok)
    if error is not None:
        ctx.count(route, error.status, t0)
        return error.response()
    detok.flush()
    reason = "stop" if detok.stopped else handle.finish_reason
    ctx.count(route, 200, t0)
    return JSONResponse(shape.full(detok.text, reason, usage_of(handle)), headers=headers)


async def _interrupt_on_disconnect(receive: Any, handle: Any) -> None:
    """Interrupt ``handle`` as soon as the client hangs up (the engine frees its row at its next step).

    Waits on the connection's ASGI ``http.disconnect``: nothing polls. Runs beside the request until it answers.
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    if not handle.done:
        handle.interrupt()
        log.info("client disconnected: request cancelled", extra={"id": handle.id})


def event_stream(body: Any, handle: Any, headers: dict) -> Any:
    """A ``text/event-stream`` response that writes each chunk of ``body`` (bytes) as it comes, with one task
    beside it that interrupts ``handle`` when the client hangs up (Starlette's StreamingResponse starts an anyio
    task group per response for the same)."""
    return _event_stream_class()(body, handle, headers)


@functools.cache
def _event_stream_class() -> type:
    import asyncio

    from starlette.responses import Response

    class EventStream(Response):
        media_type = "text/event-stream"

        def __init__(self, body: Any, handle: Any, headers: dict):
            self.body_iterator, self.handle, self.status_code, self.background = body, handle, 200, None
            self.init_headers(headers)

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            hangup = asyncio.get_running_loop().create_task(_interrupt_on_disconnect(receive, self.handle))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                hangup.cancel()
                await self.body_iterator.aclose()

    return EventStream


async def _stream(ctx: ServerContext, handle: Any, engine: Any, stops: list, shape: Shape, include_usage: bool,
                  route: str, t0: float):
    """The chunks of one streamed answer: everything that arrived since the last chunk goes out as one event
    (a client or loop that falls behind catches up in fewer, larger chunks)."""
    detok = Detokenizer(engine.tokenizer, stops)
    code = 499  # until the answer is complete: the client hung up
    try:
        if shape.chat:
            yield sse(shape.chunk({"role": "assistant", "content": ""}, None)).encode()
        async for batch in handle.abatches():
            ids = [e[1] for e in batch if e[0] == "token"]
            if ids:
                text = detok.push_many(ids)
                if text:
                    yield shape.text_event(text)
                if detok.stopped:
                    handle.cancel()
                    break
        if handle.interrupted:
            return
        error = finish_error(handle, detok)
        if error is not None:  # headers are gone: the error travels as an event, as OpenAI does
            code = error.status
            yield sse({"error": {"message": error.message, "type": ApiError.TYPES.get(error.status),
                                 "param": None, "code": error.code}}).encode()
            return
        tail = detok.flush()
        if tail:
            yield shape.text_event(tail)
        reason = "stop" if detok.stopped else handle.finish_reason
        usage = usage_of(handle)
        final = sse(shape.chunk("" if not shape.chat else None, reason, usage=usage))
        if include_usage:
            final += sse(shape.usage_chunk(usage))
        code = 200
        yield (final + "data: [DONE]\n\n").encode()
    finally:
        if not handle.done:
            handle.cancel()  # the client went away, or a stop string matched
        ctx.count(route, code, t0)
