"""Who may call what: API keys on /v1/*, the admin token on /admin/*, voters and their rate on /v1/feedback.

Every comparison of a secret uses ``hmac.compare_digest`` against each configured value, so neither the
answer time nor an early exit tells how much of a guess was right.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import threading
import time
from typing import Any, Callable

from daemon.server.protocol import ApiError

MAX_USER_CHARS = 256  # the relay's user names are ids, not essays
MAX_TRACKED_VOTERS = 100_000  # rate-limit state kept; the least recently seen voters are forgotten beyond this


def bearer(request: Any) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def _matches(given: str | None, secrets: list[str]) -> str | None:
    """The configured secret equal to ``given``, or None; every secret is compared, match or not."""
    found = None
    for secret in secrets:
        if secret and hmac.compare_digest((given or "").encode(), secret.encode()):
            found = secret
    return found if given else None


def is_admin(serve: Any, request: Any) -> bool:
    return _matches(bearer(request), [serve.admin_token]) is not None


def require_admin(serve: Any, request: Any) -> None:
    """401/403 unless the request carries ``Authorization: Bearer <serve.admin_token>``."""
    if not serve.admin_token:
        raise ApiError(403, "admin endpoints are disabled: set serve.admin_token (or the "
                            "LORAD_SERVE__ADMIN_TOKEN environment variable) and restart lorad",
                       code="admin_disabled")
    if not is_admin(serve, request):
        raise ApiError(401, "missing or wrong admin token: send 'Authorization: Bearer <serve.admin_token>'",
                       code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(serve: Any, request: Any) -> None:
    """With ``serve.api_keys`` set, /v1/* answers only requests that carry one of them (401 otherwise)."""
    if serve.api_keys and _matches(bearer(request), serve.api_keys) is None:
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <one of serve.api_keys>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def voter(serve: Any, request: Any, body: dict) -> str:
    """Who casts a feedback vote: an API key (hashed: keys never sit in memory tables or logs), or the user
    a trusted relay names in ``body["user"]`` when it authenticates with ``serve.feedback_token``.

    Raises:
        ApiError: 403 when no credential is configured, 401 for a missing or wrong one, 400 for a relay
            vote without a ``user``.
    """
    if not serve.api_keys and not serve.feedback_token:
        raise ApiError(403, "feedback is disabled: votes need a credential; set serve.api_keys (each key votes "
                            "once) or serve.feedback_token (a front end that names its users) and restart lorad",
                       code="feedback_disabled")
    given = bearer(request)
    key = _matches(given, serve.api_keys)
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    if _matches(given, [serve.feedback_token]) is None:
        raise ApiError(401, "feedback needs 'Authorization: Bearer <an API key or serve.feedback_token>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    user = body.get("user")
    if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_CHARS:
        raise ApiError(400, f"user is required with the feedback token: the id of the person who votes "
                            f"(a string of 1 to {MAX_USER_CHARS} characters)", param="user")
    return "user:" + user


class RateLimiter:
    """At most ``per_minute`` events per key in any 60 s (a sliding window of timestamps), thread-safe."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def allow(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            times = self._seen.pop(key, None) or collections.deque()
            while times and now - times[0] >= 60.0:
                times.popleft()
            allowed = len(times) < self.per_minute
            if allowed:
                times.append(now)
            self._seen[key] = times
            while len(self._seen) > MAX_TRACKED_VOTERS:
                self._seen.popitem(last=False)
            return allowed
