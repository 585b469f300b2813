"""The FastAPI app: middleware, OpenAI-shaped error handlers, and the routers of each concern."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import logging
from typing import Any

from daemon.server import admin, feedback, health, lora_admin, openai_api
from daemon.server.context import ServerContext
from daemon.server.middleware import BodySizeLimit
from daemon.server.protocol import ApiError

log = logging.getLogger("lorad.server")


def create_app(daemon: Any) -> Any:
    """Build the ASGI app around a running ``Daemon`` (anything with its attributes works in tests): the FastAPI
    app, with ``POST /v1/completions`` and ``/v1/chat/completions`` answered in front of it (openai_api.Completions).

    Reads ``daemon.cfg``, ``daemon.store``, ``daemon.metrics``, ``daemon.ready``, ``daemon.model_error``,
    ``daemon.status()`` and ``daemon.engine`` (a daemon.engine.Engine, set once the model is loaded;
    inference answers 503 until then).
    """
    from fastapi import FastAPI, Request, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ctx = ServerContext(daemon)
    app = FastAPI(title="lorad", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=ctx.serve.max_body_bytes, timeout=ctx.serve.body_timeout_seconds,
                       on_refused=ctx.count)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        ctx.count(request.url.path, exc.status)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        ctx.count(request.url.path, exc.status_code)  # unknown paths and methods are counted too
        return ApiError(exc.status_code, str(exc.detail), code=None, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault: counted and logged with its traceback, answered in OpenAI's shape.
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        ctx.count(request.url.path, 500)
        return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                        code="internal_error").response()

    for concern in (health, openai_api, feedback, admin, lora_admin):
        app.include_router(concern.routes(ctx))
    return openai_api.Completions(app, ctx)  # the two completion routes skip FastAPI's stack


def uvicorn_config(app: Any, serve: Any, **kwargs: Any) -> Any:
    """uvicorn settings for lorad: uvloop and the httptools parser where installed (uvicorn's ``standard`` extra;
    asyncio and h11 otherwise), a deadline on the request head, and a warning when the API is reachable from
    other hosts without API keys."""
    import uvicorn

    if not _loopback(serve.host) and not serve.api_keys:
        log.warning("serving on a non-loopback address without API keys: anyone who reaches the port may use the "
                    "API; set serve.api_keys (LORAD_SERVE__API_KEYS) or keep serve.host 127.0.0.1 behind a proxy",
                    extra={"host": serve.host})
    kwargs.setdefault("loop", "uvloop" if _installed("uvloop") else "asyncio")
    return uvicorn.Config(app, host=serve.host, port=serve.port,
                          http=_head_deadline_protocol(serve.header_timeout_seconds, _installed("httptools")),
                          **kwargs)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _head_deadline_protocol(seconds: float, httptools: bool = False) -> type:
    """uvicorn's httptools (or h11) protocol, closing a connection whose request head is not complete
    ``seconds`` after the connection opened or the previous response ended (uvicorn itself waits forever for a
    slow head). Both protocols create ``cycle`` when a head is complete and call ``on_response_complete``."""
    if httptools:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeadDeadline(Base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            cycle = self.cycle
            self.loop.call_later(seconds, self._head_deadline, cycle)

        def _head_deadline(self, cycle: Any) -> None:
            # Still the cycle of the deadline's start (or none): no new request head arrived in time.
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    HeadDeadline.__name__ = HeadDeadline.__qualname__ = f"HeadDeadline{Base.__name__}"
    return HeadDeadline
