"""The HTTP face of the daemon: OpenAI-compatible inference, health, readiness, metrics, status and admin.

Routes:
  GET  /v1/models                  "lorad" (the champion), "base", and every registered adapter version
  POST /v1/completions             OpenAI completions, ``stream: true`` for server-sent events
  POST /v1/chat/completions        OpenAI chat completions (the tokenizer's chat template), streaming or not
  POST /v1/feedback                {"model", "rating": 1 | -1}: user votes, watched after a promotion
  GET  /healthz /readyz /metrics /status
  POST /admin/promote {"version", "reason"}, /admin/rollback {"reason"}, /admin/reload
       (``Authorization: Bearer <serve.admin_token>``; an empty token disables them)

``model`` picks the version a request is pinned to for its whole life: "lorad", "champion" or nothing
= the champion at arrival, "base" = no adapter, "v0003-abcd1234" = that version. The response's
``model`` field and its ``x-lorad-adapter`` header name the version that produced it. Errors use
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, so the official client raises
its usual exceptions. Prompts and generated text are never logged above DEBUG.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request), which are
# imported inside create_app so that importing this module stays cheap.
import hmac
import json
import logging
import time
from typing import Any

log = logging.getLogger("lorad.server")

MAX_STOP_SEQUENCES = 4
# Parameters lorad does not implement: refusing them beats silently returning something else.
UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v not in (None, ""),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BodySizeLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413, whether or not they declare their length."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"request body exceeds serve.max_body_bytes ({self.max_bytes} bytes)",
                             code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await too_large.response()(scope, receive, send)
                    return
            except ValueError:
                await ApiError(400, "invalid Content-Length header").response()(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class Detokenizer:
    """Incremental detokenization with stop strings: releases only text that can no longer change or be cut.

    Decodes a sliding window of tokens (so multi-byte characters split over tokens come out whole) and
    holds back any tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended: release whatever is held back."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = self.text[:end]
        elif final:
            end = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def create_app(daemon: Any):
    """Build the FastAPI app around a running ``Daemon`` (anything with its attributes works in tests).

    Reads ``daemon.cfg``, ``daemon.store``, ``daemon.metrics``, ``daemon.ready``, ``daemon.model_error``,
    ``daemon.status()`` and ``daemon.engine`` (a daemon.engine.Engine, set once the model is loaded;
    inference answers 503 until then).
    """
    import asyncio

    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from daemon import engine as eng

    serve = daemon.cfg.serve
    app = FastAPI(title="lorad", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=serve.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail), code=None, headers=getattr(exc, "headers", None)).response()

    def count(route: str, code: int, t0: float) -> None:
        m = daemon.metrics
        if m is not None and hasattr(m, "serve_requests"):
            m.serve_requests.labels(route=route, code=str(code)).inc()
            m.serve_request_seconds.labels(route=route).observe(time.perf_counter() - t0)

    def engine_or_503() -> Any:
        engine = getattr(daemon, "engine", None)
        if engine is None or not engine.ready:
            raise ApiError(503, "the model is still loading (or failed to load); see GET /readyz",
                           code="model_not_ready", headers={"Retry-After": "5"})
        return engine

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    # -- health ----------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: 200 only once the base model and the champion are loaded in the engine.

        The engine's own readiness decides (not only ``daemon.ready``): an engine whose champion failed to
        load becomes ready when ``/admin/promote`` or ``/admin/reload`` succeeds.
        """
        engine = getattr(daemon, "engine", None)
        if engine is not None and engine.ready:
            return JSONResponse({"status": "ready", "champion": eng.label(engine.champion)})
        body = {"status": "loading" if daemon.model_error is None else "failed", "error": daemon.model_error}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    def metrics() -> Response:
        data, content_type = daemon.metrics.exposition()
        return Response(content=data, media_type=content_type)

    @app.get("/status")
    def status() -> dict:
        """The same document as `lorad status --json`, plus the engine's view when it runs."""
        out = daemon.status()
        engine = getattr(daemon, "engine", None)
        if engine is not None:
            out["engine"] = engine.snapshot()
        return out

    # -- OpenAI-compatible inference --------------------------------------------------------

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """A user's vote on answers: ``{"model": <version|lorad|base>, "rating": 1 | -1}``.

        ``model`` is the version the answer came from (the ``x-lorad-adapter`` header, or ``model`` in the
        response body); omitted or "lorad" means the current champion. Votes feed the post-promotion watch.
        """
        route = "/v1/feedback"
        t0 = time.perf_counter()
        try:
            engine = engine_or_503()
            body = await json_body(request)
            rating = body.get("rating")
            if rating not in (1, -1) or isinstance(rating, bool):
                raise ApiError(400, "rating must be 1 (good answer) or -1 (bad answer)", param="rating")
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise ApiError(400, "model must be a string: the version that produced the answer", param="model")
            try:
                version = engine.resolve(model)
            except eng.EngineError as e:
                raise ApiError(e.status, str(e), code=e.code, param="model") from None
            live = getattr(daemon, "live", None)
            if live is None:
                raise ApiError(503, "feedback is not collected by this server", code="feedback_disabled")
            totals = live.feedback(eng.label(version), rating == 1)
        except ApiError as e:
            count(route, e.status, t0)
            return e.response()
        count(route, 200, t0)
        return JSONResponse({"ok": True, **totals})

    async def _generate(request: Request, *, chat: bool) -> Response:
        route = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.perf_counter()
        try:
            engine = engine_or_503()
            body = await json_body(request)
            prompt_ids = _prompt_ids(engine.tokenizer, body, chat=chat, max_prompt_tokens=serve.max_prompt_tokens)
            params, stops = _sampling(body, chat=chat, max_new_tokens=serve.max_new_tokens)
            stream = body.get("stream") is True
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise ApiError(400, "model must be a string", param="model")
            try:
                handle = await run_in_threadpool(engine.submit, prompt_ids, model=model, params=params,
                                                 loop=asyncio.get_running_loop())
            except eng.EngineError as e:
                headers = {"Retry-After": "1"} if isinstance(e, eng.QueueFull) else None
                raise ApiError(e.status, str(e), code=e.code, param="model" if e.status == 404 else None,
                               headers=headers) from None
        except ApiError as e:
            count(route, e.status, t0)
            return e.response()
        request_id = ("chatcmpl-" if chat else "cmpl-") + handle.id
        headers = {"x-lorad-adapter": handle.label, "x-request-id": request_id}
        log.debug("request admitted", extra={"id": request_id, "model": handle.label,
                                             "prompt_tokens": len(prompt_ids), "stream": stream})
        shape = _Shape(chat=chat, id=request_id, model=handle.label, created=int(time.time()))
        if stream:
            return StreamingResponse(_stream(handle, engine, stops, shape, include_usage, route, t0),
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
        error = _finish_error(handle, detok)
        if error is not None:
            count(route, error.status, t0)
            return error.response()
        detok.flush()
        reason = "stop" if detok.stopped else handle.finish_reason
        count(route, 200, t0)
        return JSONResponse(shape.full(detok.text, reason, _usage(handle)), headers=headers)

    async def _stream(handle: Any, engine: Any, stops: list[str], shape: "_Shape", include_usage: bool,
                      route: str, t0: float):
        detok = Detokenizer(engine.tokenizer, stops)
        code = 200
        try:
            if shape.chat:
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
            async for event in handle.aevents():
                if event[0] == "token":
                    text = detok.push(event[1])
                    if text:
                        yield _sse(shape.chunk(text, None))
                    if detok.stopped:
                        handle.cancel()
                        break
            error = _finish_error(handle, detok)
            if error is not None:  # headers are gone: the error travels as an event, as OpenAI does
                code = error.status
                yield _sse({"error": {"message": error.message, "type": ApiError.TYPES.get(error.status),
                                      "param": None, "code": error.code}})
                return
            tail = detok.flush()
            if tail:
                yield _sse(shape.chunk(tail, None))
            reason = "stop" if detok.stopped else handle.finish_reason
            yield _sse(shape.chunk("" if not shape.chat else None, reason, usage=_usage(handle)))
            if include_usage:
                yield _sse(shape.usage_chunk(_usage(handle)))
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()  # the client went away, or a stop string matched
            count(route, code, t0)

    # -- admin ------------------------------------------------------------------------------

    def require_admin(request: Request) -> None:
        token = serve.admin_token
        if not token:
            raise ApiError(403, "admin endpoints are disabled: set serve.admin_token (or the "
                                "LORAD_SERVE__ADMIN_TOKEN environment variable) and restart lorad",
                           code="admin_disabled")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong admin token: send 'Authorization: Bearer <serve.admin_token>'",
                           code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})

    async def admin(request: Request, route: str, action) -> Response:
        from daemon.registry import AdapterError

        t0 = time.perf_counter()
        try:
            require_admin(request)
            body = await json_body(request) if (await request.body()) else {}
            engine = getattr(daemon, "engine", None)  # not ready is fine: a promotion or reload can fix that
            if engine is None:
                raise ApiError(503, "the model is still loading (or failed to load); see GET /readyz",
                               code="model_not_ready", headers={"Retry-After": "5"})
            if daemon.store is None:
                raise ApiError(503, "the state store is not open", code="store_not_ready")
            try:
                result = await run_in_threadpool(action, engine, body)
            except eng.EngineError as e:
                raise ApiError(409 if isinstance(e, eng.AdapterUnavailable) else e.status, str(e), code=e.code)
            except AdapterError as e:
                raise ApiError(409, str(e), code="registry_refused") from None
        except ApiError as e:
            count(route, e.status, t0)
            return e.response()
        count(route, 200, t0)
        return JSONResponse({"ok": True, **result})

    def _reason(body: dict, default: str) -> str:
        reason = body.get("reason", default)
        if not isinstance(reason, str) or not reason.strip():
            raise ApiError(400, "reason must be a non-empty string", param="reason")
        return reason

    def do_promote(engine: Any, body: dict) -> dict:
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise ApiError(400, "version is required: the adapter version to promote, e.g. 'v0003-abcd1234'",
                           param="version")
        return eng.promote_and_swap(engine, daemon.store, version, reason=_reason(body, "promoted via /admin/promote"),
                                    actor="admin", base_model=daemon.cfg.model.base_model)

    def do_rollback(engine: Any, body: dict) -> dict:
        return eng.rollback_and_swap(engine, daemon.store, reason=_reason(body, "rolled back via /admin/rollback"),
                                     actor="admin")

    def do_reload(engine: Any, body: dict) -> dict:
        return engine.reload().as_dict()

    @app.post("/admin/promote")
    async def admin_promote(request: Request) -> Response:
        """Verify a version, load it, make it the registry's champion and serve it."""
        return await admin(request, "/admin/promote", do_promote)

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request) -> Response:
        """Point the champion back at the previous champion (kept loaded: instant)."""
        return await admin(request, "/admin/rollback", do_rollback)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        """Serve whatever the registry's champion alias says now (after `lorad promote` from a shell)."""
        return await admin(request, "/admin/reload", do_reload)

    return app


# -- request parsing -------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, body: dict, *, chat: bool, max_prompt_tokens: int) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param="messages")
            role = "system" if m["role"] == "developer" else m["role"]
            plain.append({"role": role, "content": content})
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this base model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # bool is not a token
            vocab = len(tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) > max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens} "
                            f"(serve.max_prompt_tokens)", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    return ids


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (lo < value if lo_open else lo <= value) and value <= hi):
        raise ApiError(400, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}",
                       param=key)
    return float(value)


def _sampling(body: dict, *, chat: bool, max_new_tokens: int):
    from daemon.engine import SamplingParams

    for key, bad in UNSUPPORTED.items():
        if key in body and bad(body[key]):
            raise ApiError(400, f"{key} is not supported by lorad", param=key)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = max_new_tokens if chat else min(16, max_new_tokens)  # OpenAI's completions default is 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
    if max_tokens > max_new_tokens:
        raise ApiError(400, f"{key} is {max_tokens}; this server allows at most {max_new_tokens} "
                            f"(serve.max_new_tokens)", param=key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise ApiError(400, "stream must be true or false", param="stream")
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=seed)
    return params, stops


# -- response shapes ------------------------------------------------------------------------------


class _Shape:
    """OpenAI's JSON shapes for one request (completion or chat, whole or chunked)."""

    def __init__(self, *, chat: bool, id: str, model: str, created: int):
        self.chat, self.id, self.model, self.created = chat, id, model, created

    def full(self, text: str, reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage}

    def chunk(self, content: Any, reason: str | None, usage: dict | None = None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}


def _usage(handle: Any) -> dict:
    prompt, completion = len(handle.prompt_ids), len(handle.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_error(handle: Any, detok: Detokenizer) -> ApiError | None:
    """The error a finished generation maps to, or None when it produced a normal answer."""
    if detok.stopped or handle.finish_reason in ("stop", "length"):
        return None
    if handle.finish_reason == "timeout":
        return ApiError(504, "the request ran longer than serve.request_timeout_seconds", code="timeout")
    if handle.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down; retry", code="engine_closed")
    return ApiError(500, f"generation failed: {handle.error}", code="generation_failed")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
