"""The HTTP face of the daemon: health, readiness, metrics and status.

The OpenAI-compatible inference routes and the authenticated /admin/* routes are added
by the serving work (see issue "Serving with zero-downtime adapter hot-swap").
"""

from __future__ import annotations

from typing import Any


def create_app(daemon: Any):
    """Build the FastAPI app around a running ``Daemon`` (anything with its attributes works in tests)."""
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse

    app = FastAPI(title="lorad", version="0.1.0", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: 200 only once the base model (and champion) is loaded."""
        if daemon.ready.is_set():
            return JSONResponse({"status": "ready"})
        body = {"status": "loading" if daemon.model_error is None else "failed", "error": daemon.model_error}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    def metrics() -> Response:
        data, content_type = daemon.metrics.exposition()
        return Response(content=data, media_type=content_type)

    @app.get("/status")
    def status() -> dict:
        """The same document as `lorad status --json`."""
        return daemon.status()

    return app
