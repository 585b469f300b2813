"""Liveness, readiness, Prometheus metrics and the status document."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
from typing import Any

from daemon.server.context import ServerContext


def routes(ctx: ServerContext) -> Any:
    """GET /healthz /readyz /metrics /status."""
    from fastapi import APIRouter, Response
    from fastapi.responses import JSONResponse

    from daemon import engine as eng

    daemon = ctx.daemon
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @router.get("/readyz")
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

    @router.get("/metrics")
    def metrics() -> Response:
        data, content_type = daemon.metrics.exposition()
        return Response(content=data, media_type=content_type)

    @router.get("/status")
    def status() -> dict:
        """The same document as `lorad status --json`, plus the engine's view when it runs."""
        out = daemon.status()
        engine = getattr(daemon, "engine", None)
        if engine is not None:
            out["engine"] = engine.snapshot()
        return out

    return router
