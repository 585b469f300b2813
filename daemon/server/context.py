"""What every route needs from the daemon: its settings, the engine, the request counter, a JSON body, and a
bounded pool for per-request CPU work on large bodies (JSON parsing, tokenization) so the event loop only
schedules."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from daemon.server.protocol import ApiError, parse_json_object

log = logging.getLogger("lorad.server")

CPU_WORKERS = 4  # per-request CPU work runs here, never on the event loop; more requests wait their turn
# Requests whose body is at most this many bytes are parsed and tokenized on the event loop: well under a
# millisecond of work, less than the hand-off to the pool and back (which also waits for the GIL).
INLINE_BYTES = 8192
# Route labels of lorad_serve_requests_total: anything else is "other", so scanners cannot grow the series.
ROUTES = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/feedback", "/healthz",
                    "/readyz", "/metrics", "/status", "/admin/promote", "/admin/rollback", "/admin/reload",
                    "/admin/champion", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/fleet/adapters"})


class ServerContext:
    """The daemon as the routes see it (anything with the Daemon's attributes works in tests)."""

    def __init__(self, daemon: Any):
        from concurrent.futures import ThreadPoolExecutor

        self.daemon = daemon
        self.serve = daemon.cfg.serve
        self._pool = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="lorad-request")

    def count(self, route: str, code: int, t0: float | None = None) -> None:
        """One answered request: lorad_serve_requests_total and its latency histogram."""
        m = self.daemon.metrics
        if m is not None and hasattr(m, "serve_requests"):
            route = route if route in ROUTES else "other"
            m.serve_requests.labels(route=route, code=str(code)).inc()
            if t0 is not None:
                m.serve_request_seconds.labels(route=route).observe(time.perf_counter() - t0)

    async def cpu(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the request pool and await its result."""
        import functools

        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def engine_or_503(self) -> Any:
        engine = getattr(self.daemon, "engine", None)
        if engine is None or not engine.ready:
            raise ApiError(503, "the model is still loading (or failed to load); see GET /readyz",
                           code="model_not_ready", headers={"Retry-After": "5"})
        return engine

    async def json_body(self, request: Any) -> dict:
        """The request's body as a JSON object, or an ApiError saying what is wrong (see ``json_body_sized``)."""
        return (await self.json_body_sized(request))[0]

    async def json_body_sized(self, request: Any) -> tuple[dict, int]:
        """The request's body as a JSON object and its size in bytes, or an ApiError saying what is wrong.

        A body of at most INLINE_BYTES is parsed right here (a trip through the pool costs more than parsing
        it); a larger one in the pool. A client that hangs up before its body is complete gets 499 (nobody
        reads it) and one log line.
        """
        from starlette.requests import ClientDisconnect

        try:
            raw = await request.body()
        except ClientDisconnect:
            log.info("client disconnected before sending its whole request body", extra={"path": request.url.path})
            raise ApiError(499, "the client closed the connection before sending its whole body",
                           code="client_disconnected") from None
        if len(raw) <= INLINE_BYTES:
            return parse_json_object(raw), len(raw)
        return await self.cpu(parse_json_object, raw), len(raw)
