"""ASGI middleware in front of every route."""

from typing import Any

from daemon.server.protocol import ApiError


class BodySizeLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413, whether or not they declare their length."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

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
                    await too_large.response()(scope, receive, send)
                    return
            except ValueError:
                await ApiError(400, "invalid Content-Length header").response()(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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
                await too_large.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
