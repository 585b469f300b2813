"""What every route needs from the daemon: its settings, the engine, the request counter, a JSON body."""

from __future__ import annotations

import time
from typing import Any

from daemon.server.protocol import ApiError


class ServerContext:
    """The daemon as the routes see it (anything with the Daemon's attributes works in tests)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.serve = daemon.cfg.serve

    def count(self, route: str, code: int, t0: float) -> None:
        """One answered request: lorad_serve_requests_total and its latency histogram."""
        m = self.daemon.metrics
        if m is not None and hasattr(m, "serve_requests"):
            m.serve_requests.labels(route=route, code=str(code)).inc()
            m.serve_request_seconds.labels(route=route).observe(time.perf_counter() - t0)

    def engine_or_503(self) -> Any:
        engine = getattr(self.daemon, "engine", None)
        if engine is None or not engine.ready:
            raise ApiError(503, "the model is still loading (or failed to load); see GET /readyz",
                           code="model_not_ready", headers={"Retry-After": "5"})
        return engine

    async def json_body(self, request: Any) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body
