"""The FastAPI app: middleware, OpenAI-shaped error handlers, and the routers of each concern."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
from typing import Any

from daemon.server import admin, feedback, health, openai_api
from daemon.server.context import ServerContext
from daemon.server.middleware import BodySizeLimit
from daemon.server.protocol import ApiError


def create_app(daemon: Any) -> Any:
    """Build the FastAPI app around a running ``Daemon`` (anything with its attributes works in tests).

    Reads ``daemon.cfg``, ``daemon.store``, ``daemon.metrics``, ``daemon.ready``, ``daemon.model_error``,
    ``daemon.status()`` and ``daemon.engine`` (a daemon.engine.Engine, set once the model is loaded;
    inference answers 503 until then).
    """
    from fastapi import FastAPI, Request, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ctx = ServerContext(daemon)
    app = FastAPI(title="lorad", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=ctx.serve.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail), code=None, headers=getattr(exc, "headers", None)).response()

    for concern in (health, openai_api, feedback, admin):
        app.include_router(concern.routes(ctx))
    return app
