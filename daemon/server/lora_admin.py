"""A serving fleet over HTTP: vLLM's runtime LoRA API and the champion on a replica, adapter files on the daemon.

Replica side (admin token): ``POST /v1/load_lora_adapter {lora_name, lora_path}`` and
``POST /v1/unload_lora_adapter {lora_name}`` as vLLM documents them (success: 200 and a plain-text message;
errors: OpenAI's error body), ``GET /admin/champion`` (what is loaded, pinned and served) and
``POST /admin/champion {version}`` (serve exactly this loaded version, or "base": what the control plane sends
once every replica has loaded it). Control-plane side (``fleet.token``): ``GET /fleet/adapters/<version>``
(the registered files' sha256 and lineage) and ``GET /fleet/adapters/<version>/<file>`` (the file, streamed).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import time
from typing import Any, Callable

from daemon.server.auth import bearer, require_admin
from daemon.server.context import ServerContext
from daemon.server.protocol import ApiError

FILES_ROUTE = "/fleet/adapters"


def routes(ctx: ServerContext) -> Any:
    """The fleet routes of both sides (each process answers both; config decides what is allowed)."""
    from fastapi import APIRouter, Request, Response
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

    from daemon import engine as eng
    from daemon import registry, replica

    daemon = ctx.daemon
    router = APIRouter()

    def do_load(body: dict) -> Response:
        return PlainTextResponse(replica.load(daemon, body.get("lora_name"), body.get("lora_path")))

    def do_unload(body: dict) -> Response:
        return PlainTextResponse(replica.unload(daemon, body.get("lora_name")))

    def do_follow(body: dict) -> Response:
        name = body.get("version")
        version = None if name == eng.BASE_LABEL else replica.check_name(name)
        engine = _engine(daemon)
        reason = body.get("reason") or "set by the control plane"
        if not isinstance(reason, str) or len(reason) > 1000:
            raise ApiError(400, "reason must be a string of at most 1000 characters", param="reason")
        try:
            result = eng.follow_champion(engine, daemon.store, version, reason=reason,
                                         base_model=daemon.cfg.model.base_model)
        except eng.EngineError as e:
            raise ApiError(409 if isinstance(e, eng.AdapterUnavailable) else e.status, str(e), code=e.code) from None
        except registry.AdapterError as e:
            raise ApiError(409, str(e), code="registry_refused") from None
        return JSONResponse({"ok": True, **result, "state": _state(engine)})

    def do_state(body: dict) -> Response:
        return JSONResponse(_state(_engine(daemon)))

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        """Fetch (when new), verify and load an adapter version into a free slot; the champion is unchanged."""
        return await _call(ctx, request, "/v1/load_lora_adapter", require_admin, do_load)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        """Let a version go; its slot is freed once its requests have drained. Never the champion."""
        return await _call(ctx, request, "/v1/unload_lora_adapter", require_admin, do_unload)

    @router.get("/admin/champion")
    async def champion_state(request: Request) -> Response:
        """The engine's champion, previous champion, loaded and pinned versions (what the control plane checks)."""
        return await _call(ctx, request, "/admin/champion", require_admin, do_state, body=False)

    @router.post("/admin/champion")
    async def follow(request: Request) -> Response:
        """Serve exactly ``version`` (loaded first; "base" = no adapter): a promotion or rollback of the fleet."""
        return await _call(ctx, request, "/admin/champion", require_admin, do_follow)

    @router.get(FILES_ROUTE + "/{version}")
    async def adapter_manifest(version: str, request: Request) -> Response:
        """A registered version's files with their sha256 (as the registry recorded them) and its lineage."""
        def manifest(body: dict) -> Response:
            try:
                return JSONResponse(registry.manifest(daemon.store, replica.check_name(version)))
            except registry.AdapterError as e:
                raise ApiError(404, str(e), code="model_not_found") from None
        return await _call(ctx, request, FILES_ROUTE, _require_fleet, manifest, body=False)

    @router.get(FILES_ROUTE + "/{version}/{name}")
    async def adapter_file(version: str, name: str, request: Request) -> Response:
        """One file of a registered version, streamed as stored (the replica checks it against the manifest)."""
        def file(body: dict) -> Response:
            if name not in registry.ADAPTER_FILES:
                raise ApiError(404, f"a version's files are {', '.join(registry.ADAPTER_FILES)}", code="not_found")
            try:
                row = registry.get_adapter(daemon.store, replica.check_name(version))
            except registry.AdapterError as e:
                raise ApiError(404, str(e), code="model_not_found") from None
            path = registry.adapters_dir(daemon.state_dir).resolve() / row["version"] / name
            if not path.is_file():
                raise ApiError(404, f"adapter {version}: {name} is missing", code="not_found")
            return FileResponse(path, media_type="application/octet-stream")
        return await _call(ctx, request, FILES_ROUTE, _require_fleet, file, body=False)

    return router


def _state(engine: Any) -> dict:
    from daemon import engine as eng

    return {"ready": engine.ready, "champion": eng.label(engine.champion),
            "previous": eng.label(engine.previous) if engine.previous else None,
            "loaded": engine.loaded_versions(), "pinned": engine.pinned()}


def _engine(daemon: Any) -> Any:
    engine = getattr(daemon, "engine", None)
    if engine is None or daemon.store is None:
        raise ApiError(503, "the model is still loading (or failed to load); see GET /readyz", code="model_not_ready",
                       headers={"Retry-After": "5"})
    return engine


def _require_fleet(serve: Any, request: Any, cfg: Any = None) -> None:
    """401/403 unless the request carries the fleet token (``fleet.token``, else ``serve.admin_token``)."""
    import hmac

    from daemon.config import fleet_token

    token = fleet_token(cfg)
    if not token:
        raise ApiError(403, "adapter files are served to replicas only: set fleet.token or serve.admin_token",
                       code="fleet_disabled")
    given = bearer(request) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "missing or wrong fleet token: send 'Authorization: Bearer <fleet.token>'",
                       code="invalid_fleet_token", headers={"WWW-Authenticate": "Bearer"})


async def _call(ctx: ServerContext, request: Any, route: str, auth: Callable, action: Callable[[dict], Any], *,
                body: bool = True) -> Any:
    """Authenticate, parse the body, run ``action`` in a worker thread (loads block), count the answer."""
    from starlette.concurrency import run_in_threadpool

    from daemon import replica

    t0 = time.perf_counter()
    try:
        if auth is _require_fleet:
            auth(ctx.serve, request, ctx.daemon.cfg)
        else:
            auth(ctx.serve, request)
        parsed = await ctx.json_body(request) if body and (await request.body()) else {}
        try:
            response = await run_in_threadpool(action, parsed)
        except replica.LoadRefused as e:
            raise ApiError(e.status, str(e), code=e.code) from None
    except ApiError as e:
        ctx.count(route, e.status, t0)
        return e.response()
    ctx.count(route, response.status_code, t0)
    return response
