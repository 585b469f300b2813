"""Liveness, readiness, Prometheus metrics and the status document."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
from typing import Any

from daemon.server.auth import is_admin
from daemon.server.context import ServerContext


def routes(ctx: ServerContext) -> Any:
    """GET /healthz /readyz /metrics /status."""
    from fastapi import APIRouter, Request, Response
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
    def status(request: Request) -> dict:
        """The same document as `lorad status --json`, plus the engine's view when it runs.

        Without the admin token only the public part: no paths, process ids, reasons or events (a reason
        can quote a file's content).
        """
        out = daemon.status()
        engine = getattr(daemon, "engine", None)
        if engine is not None:
            out["engine"] = engine.snapshot()
        return out if is_admin(ctx.serve, request) else public_status(out)

    return router


def public_status(doc: dict) -> dict:
    """The part of a status document anyone who reaches the port may see: states, counts and versions."""
    daemon = doc.get("daemon") or {}
    champion = doc.get("champion")
    job = doc.get("job")
    return {
        "redacted": "paths, process ids, reasons and events need 'Authorization: Bearer <serve.admin_token>'",
        "daemon": {k: daemon[k] for k in ("running", "started_at", "model_ready", "serve_only") if k in daemon},
        "initialized": doc.get("initialized"),
        "champion": {k: champion.get(k) for k in ("version", "parent", "created_at")} if champion else None,
        "counts": doc.get("counts", {}),
        "runs": [{k: r.get(k) for k in ("id", "kind", "status", "trigger", "step", "total_steps", "started_at",
                                        "eta_seconds")} for r in doc.get("runs", [])],
        "job": {k: job.get(k) for k in ("stage", "run_id", "version", "trigger", "since")} if job else None,
        "inbox_pending": doc.get("inbox_pending", 0),
        "engine": doc.get("engine"),
        **({"fleet": {"replicas": len(doc["fleet"]), "up": sum(1 for r in doc["fleet"] if r.get("up"))}}
           if doc.get("fleet") is not None else {}),
    }
