"""OpenAI-compatible inference: /v1/models, /v1/completions and /v1/chat/completions (streaming or not)."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import logging
import time
from typing import Any

from daemon.server.context import ServerContext
from daemon.server.protocol import ApiError, Shape, finish_error, prompt_ids, sampling, sse, usage_of
from daemon.server.text import Detokenizer

log = logging.getLogger("lorad.server")


def routes(ctx: ServerContext) -> Any:
    """GET /v1/models, POST /v1/completions and /v1/chat/completions."""
    from fastapi import APIRouter, Request, Response

    from daemon import engine as eng

    daemon = ctx.daemon
    router = APIRouter()

    @router.get("/v1/models")
    def models() -> dict:
        from daemon import registry

        engine = getattr(daemon, "engine", None)
        champion = eng.label(engine.champion) if engine is not None else None
        created = int(getattr(daemon, "started_at", time.time()))
        data = [{"id": "lorad", "object": "model", "created": created, "owned_by": "lorad", "root": champion},
                {"id": eng.BASE_LABEL, "object": "model", "created": created, "owned_by": "lorad",
                 "root": daemon.cfg.model.base_model}]
        if daemon.store is not None:
            for row in registry.list_adapters(daemon.store):
                data.append({"id": row["version"], "object": "model", "created": int(row["created_at"]),
                             "owned_by": "lorad", "parent": row["parent"], "champion": row["champion"]})
        return {"object": "list", "data": data}

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(ctx, request, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(ctx, request, chat=True)

    return router


async def generate(ctx: ServerContext, request: Any, *, chat: bool) -> Any:
    """One completion request: validate, submit to the engine pinned to a version, answer or stream."""
    import asyncio

    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from daemon import engine as eng

    serve = ctx.serve
    route = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        engine = ctx.engine_or_503()
        body = await ctx.json_body(request)
        ids = prompt_ids(engine.tokenizer, body, chat=chat, max_prompt_tokens=serve.max_prompt_tokens)
        params, stops = sampling(body, chat=chat, max_new_tokens=serve.max_new_tokens)
        stream = body.get("stream") is True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string", param="model")
        try:
            handle = await run_in_threadpool(engine.submit, ids, model=model, params=params,
                                             loop=asyncio.get_running_loop())
        except eng.EngineError as e:
            headers = {"Retry-After": "1"} if isinstance(e, eng.QueueFull) else None
            raise ApiError(e.status, str(e), code=e.code, param="model" if e.status == 404 else None,
                           headers=headers) from None
    except ApiError as e:
        ctx.count(route, e.status, t0)
        return e.response()
    request_id = ("chatcmpl-" if chat else "cmpl-") + handle.id
    headers = {"x-lorad-adapter": handle.label, "x-request-id": request_id}
    log.debug("request admitted", extra={"id": request_id, "model": handle.label,
                                         "prompt_tokens": len(ids), "stream": stream})
    shape = Shape(chat=chat, id=request_id, model=handle.label, created=int(time.time()))
    if stream:
        return StreamingResponse(_stream(ctx, handle, engine, stops, shape, include_usage, route, t0),
                                 media_type="text/event-stream", headers=headers)
    detok = Detokenizer(engine.tokenizer, stops)
    try:
        async for event in handle.aevents():
            if event[0] == "token":
                detok.push(event[1])
                if detok.stopped:
                    handle.cancel()
                    break
    finally:
        if not handle.done:
            handle.cancel()
    error = finish_error(handle, detok)
    if error is not None:
        ctx.count(route, error.status, t0)
        return error.response()
    detok.flush()
    reason = "stop" if detok.stopped else handle.finish_reason
    ctx.count(route, 200, t0)
    return JSONResponse(shape.full(detok.text, reason, usage_of(handle)), headers=headers)


async def _stream(ctx: ServerContext, handle: Any, engine: Any, stops: list, shape: Shape, include_usage: bool,
                  route: str, t0: float):
    detok = Detokenizer(engine.tokenizer, stops)
    code = 200
    try:
        if shape.chat:
            yield sse(shape.chunk({"role": "assistant", "content": ""}, None))
        async for event in handle.aevents():
            if event[0] == "token":
                text = detok.push(event[1])
                if text:
                    yield sse(shape.chunk(text, None))
                if detok.stopped:
                    handle.cancel()
                    break
        error = finish_error(handle, detok)
        if error is not None:  # headers are gone: the error travels as an event, as OpenAI does
            code = error.status
            yield sse({"error": {"message": error.message, "type": ApiError.TYPES.get(error.status),
                                 "param": None, "code": error.code}})
            return
        tail = detok.flush()
        if tail:
            yield sse(shape.chunk(tail, None))
        reason = "stop" if detok.stopped else handle.finish_reason
        yield sse(shape.chunk("" if not shape.chat else None, reason, usage=usage_of(handle)))
        if include_usage:
            yield sse(shape.usage_chunk(usage_of(handle)))
        yield "data: [DONE]\n\n"
    finally:
        if not handle.done:
            handle.cancel()  # the client went away, or a stop string matched
        ctx.count(route, code, t0)
