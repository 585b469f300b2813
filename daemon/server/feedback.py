"""User votes on answers (POST /v1/feedback), the signal the post-promotion watch listens to."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition time.
import time
from typing import Any

from daemon.server.auth import RateLimiter, voter
from daemon.server.context import ServerContext
from daemon.server.protocol import ApiError


def routes(ctx: ServerContext) -> Any:
    """POST /v1/feedback."""
    from fastapi import APIRouter, Request, Response
    from fastapi.responses import JSONResponse

    from daemon import engine as eng

    daemon = ctx.daemon
    router = APIRouter()
    limiter = RateLimiter(ctx.serve.feedback_per_minute)

    @router.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """A user's vote on answers: ``{"model": <version|lorad|base>, "rating": 1 | -1, "user": <id>}``.

        ``model`` is the version the answer came from (the ``x-lorad-adapter`` header, or ``model`` in the
        response body); omitted or "lorad" means the current champion. Votes feed the post-promotion watch,
        one per voter: an API key, or the ``user`` a front end names when it sends ``serve.feedback_token``.
        """
        route = "/v1/feedback"
        t0 = time.perf_counter()
        try:
            engine = ctx.engine_or_503()
            body = await ctx.json_body(request)
            who = voter(ctx.serve, request, body)
            if not limiter.allow(who):
                raise ApiError(429, f"more than serve.feedback_per_minute ({ctx.serve.feedback_per_minute}) votes "
                                    f"from one voter in a minute; retry later", code="rate_limited",
                               headers={"Retry-After": "60"})
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
            totals = live.feedback(eng.label(version), rating == 1, who)
        except ApiError as e:
            ctx.count(route, e.status, t0)
            return e.response()
        ctx.count(route, 200, t0)
        return JSONResponse({"ok": True, **totals})

    return router
