"""The HTTP face of the daemon: OpenAI-compatible inference, health, readiness, metrics, status and admin.

Routes:
  GET  /v1/models                  "lorad" (the champion), "base", and every registered adapter version
  POST /v1/completions             OpenAI completions, ``stream: true`` for server-sent events
  POST /v1/chat/completions        OpenAI chat completions (the tokenizer's chat template), streaming or not
  POST /v1/feedback                {"model", "rating": 1 | -1, "user"}: votes of authenticated voters,
                                   watched after a promotion (docs/security.md says who may vote)
  GET  /healthz /readyz /metrics /status (public part; the full document with the admin token)
  POST /admin/promote {"version", "reason"}, /admin/rollback {"reason"}, /admin/reload
       (``Authorization: Bearer <serve.admin_token>``; an empty token disables them)

With ``serve.api_keys`` set, /v1/* needs ``Authorization: Bearer <key>`` (as vLLM's ``--api-key``).

``model`` picks the version a request is pinned to for its whole life: "lorad", "champion" or nothing
= the champion at arrival, "base" = no adapter, "v0003-abcd1234" = that version. The response's
``model`` field and its ``x-lorad-adapter`` header name the version that produced it. Errors use
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, so the official client raises
its usual exceptions. Prompts and generated text are never logged above DEBUG.

Rooms:
  app.py         create_app: middleware, OpenAI-shaped error handlers, one router per concern, the completion
                 routes in front; uvicorn_config: uvloop/httptools, the request-head deadline and the warning
                 for an exposed port without keys
  context.py     ServerContext: what every route needs (settings, engine or 503, request counter, JSON body,
                 the bounded pool for per-request CPU work)
  auth.py        API keys, the admin token, feedback voters and their rate limit
  openai_api.py  /v1/models, /v1/completions, /v1/chat/completions (whole answers and server-sent events);
                 Completions answers the two completion routes in front of FastAPI
  feedback.py    /v1/feedback
  admin.py       /admin/* and the bearer-token check
  health.py      /healthz, /readyz, /metrics, /status
  protocol.py    ApiError (OpenAI's error body), request parsing and validation, response shapes
  text.py        Detokenizer: token ids to released text, stop strings
  middleware.py  BodySizeLimit
"""

from daemon.server.app import create_app, uvicorn_config
from daemon.server.protocol import ApiError
from daemon.server.text import Detokenizer

__all__ = ["ApiError", "Detokenizer", "create_app", "uvicorn_config"]
