"""ASGI middleware in front of every route: request bodies that are too large or too slow."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from daemon.server.protocol import ApiError

log = logging.getLogger("lorad.server")


class BodySizeLimit:
    """Request bodies over ``max_bytes`` get 413, whether or not they declare their length; a body that has
    not fully arrived ``timeout`` seconds after the request head gets 408 (a slow sender holds no task).

    Args:
        on_refused: ``on_refused(path, status)`` counts each refusal (lorad_serve_requests_total).
    """

    def __init__(self, app: Any, max_bytes: int, timeout: float = 30.0,
                 on_refused: Callable[[str, int], None] | None = None):
        self.app, self.max_bytes, self.timeout, self.on_refused = app, max_bytes, timeout, on_refused

    async def _refuse(self, error: ApiError, scope: dict, receive: Any, send: Any) -> None:
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""), error.status)
        await error.response()(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"request body exceeds serve.max_body_bytes ({self.max_bytes} bytes)",
                             code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await self._refuse(too_large, scope, receive, send)
                    return
            except ValueError:
                await self._refuse(ApiError(400, "invalid Content-Length header"), scope, receive, send)
                return
        received = 0
        body_done = False
        started = False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # afterwards the app only listens for a disconnect: no deadline on that
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise _BodyTooSlow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(too_large, scope, receive, send)
        except _BodyTooSlow:
            log.info("request body too slow: answered 408", extra={"path": scope.get("path")})
            if not started:
                await self._refuse(ApiError(408, f"the request body did not arrive within "
                                                 f"serve.body_timeout_seconds ({self.timeout:g} s)",
                                            code="body_timeout"), scope, receive, send)


class BodyRefused(Exception):
    """Raised through the app from its ``receive`` when the body is refused; the app must let it pass."""


class _BodyTooLarge(BodyRefused):
    pass


class _BodyTooSlow(BodyRefused):
    pass
