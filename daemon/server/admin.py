"""Authenticated operations: POST /admin/promote, /admin/rollback, /admin/reload."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import time
from typing import Any, Callable

from daemon.server.auth import require_admin
from daemon.server.context import ServerContext
from daemon.server.protocol import ApiError


def routes(ctx: ServerContext) -> Any:
    """The /admin/* routes; each runs its action in a worker thread (loading an adapter blocks)."""
    from fastapi import APIRouter, Request, Response

    from daemon import engine as eng

    daemon = ctx.daemon
    router = APIRouter()

    def do_promote(engine: Any, body: dict) -> dict:
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise ApiError(400, "version is required: the adapter version to promote, e.g. 'v0003-abcd1234'",
                           param="version")
        reason = _reason(body, "promoted via /admin/promote")
        apply = lambda: eng.promote_and_swap(engine, daemon.store, version, reason=reason,  # noqa: E731
                                             actor="admin", base_model=daemon.cfg.model.base_model)
        fleet = getattr(daemon, "fleet", None)  # replicas load it first; the champion moves only if all could
        return fleet.promote(version, apply) if fleet is not None else apply()

    def do_rollback(engine: Any, body: dict) -> dict:
        reason = _reason(body, "rolled back via /admin/rollback")
        apply = lambda: eng.rollback_and_swap(engine, daemon.store, reason=reason, actor="admin")  # noqa: E731
        fleet = getattr(daemon, "fleet", None)
        return fleet.rollback(apply) if fleet is not None else apply()

    def do_reload(engine: Any, body: dict) -> dict:
        return engine.reload().as_dict()

    @router.post("/admin/promote")
    async def admin_promote(request: Request) -> Response:
        """Verify a version, load it, make it the registry's champion and serve it."""
        return await _admin(ctx, request, "/admin/promote", do_promote)

    @router.post("/admin/rollback")
    async def admin_rollback(request: Request) -> Response:
        """Point the champion back at the previous champion (kept loaded: instant)."""
        return await _admin(ctx, request, "/admin/rollback", do_rollback)

    @router.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        """Serve whatever the registry's champion alias says now (after `lorad promote` from a shell)."""
        return await _admin(ctx, request, "/admin/reload", do_reload)

    return router


async def _admin(ctx: ServerContext, request: Any, route: str, action: Callable[[Any, dict], dict]) -> Any:
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from daemon import engine as eng
    from daemon.registry import AdapterError

    daemon = ctx.daemon
    t0 = time.perf_counter()
    try:
        require_admin(ctx.serve, request)
        body = await ctx.json_body(request) if (await request.body()) else {}
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
        ctx.count(route, e.status, t0)
        return e.response()
    ctx.count(route, 200, t0)
    return JSONResponse({"ok": True, **result})


def _reason(body: dict, default: str) -> str:
    reason = body.get("reason", default)
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, "reason must be a non-empty string", param="reason")
    return reason
