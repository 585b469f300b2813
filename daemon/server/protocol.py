"""OpenAI's wire protocol as lorad speaks it: the error body, request parsing and validation, response shapes."""

from __future__ import annotations

import json
from typing import Any

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 512  # per stop string: bounds the matcher's tables and what the server holds back
# Parameters lorad does not implement: refusing them beats silently returning something else.
UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v not in (None, ""),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
             409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             499: "client_closed_request", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

# -- request parsing -------------------------------------------------------------------------------


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object whose strings are all valid Unicode, or a 400 that says why.

    Lone surrogates ("\\ud800") parse in Python but break the tokenizer and every later encoder; nesting
    beyond Python's recursion limit breaks the parser itself.
    """
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds a string that is not valid Unicode (a lone surrogate such as "
                            "\\ud800); send UTF-8 text") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def prompt_ids(tokenizer: Any, body: dict, *, chat: bool, max_prompt_tokens: int) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param="messages")
            role = "system" if m["role"] == "developer" else m["role"]
            plain.append({"role": role, "content": content})
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this base model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # bool is not a token
            vocab = len(tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) > max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens} "
                            f"(serve.max_prompt_tokens)", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    return ids


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (lo < value if lo_open else lo <= value) and value <= hi):
        raise ApiError(400, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}",
                       param=key)
    return float(value)


def sampling(body: dict, *, chat: bool, max_new_tokens: int):
    from daemon.engine import SamplingParams

    for key, bad in UNSUPPORTED.items():
        if key in body and bad(body[key]):
            raise ApiError(400, f"{key} is not supported by lorad", param=key)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = max_new_tokens if chat else min(16, max_new_tokens)  # OpenAI's completions default is 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
    if max_tokens > max_new_tokens:
        raise ApiError(400, f"{key} is {max_tokens}; this server allows at most {max_new_tokens} "
                            f"(serve.max_new_tokens)", param=key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"each stop string may have at most {MAX_STOP_CHARS} characters, got "
                            f"{max(len(s) for s in stops)}", param="stop")
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                              (bool, type(None)))):
        raise ApiError(400, "stream_options must be an object such as {\"include_usage\": true}",
                       param="stream_options")
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=seed)
    return params, stops


# -- response shapes ------------------------------------------------------------------------------


class Shape:
    """OpenAI's JSON shapes for one request (completion or chat, whole or chunked)."""

    def __init__(self, *, chat: bool, id: str, model: str, created: int):
        self.chat, self.id, self.model, self.created = chat, id, model, created
        self._text_event: tuple[bytes, bytes] | None = None

    def text_event(self, text: str) -> bytes:
        """``sse(self.chunk(text, None))`` as bytes, from a template encoded once per request: only the text
        is JSON-encoded per chunk."""
        if self._text_event is None:
            marker = "\x00lorad-text\x00"
            parts = sse(self.chunk(marker, None)).encode().split(json.dumps(marker).encode())
            self._text_event = (parts[0], parts[1]) if len(parts) == 2 else (b"", b"")
        head, tail = self._text_event
        if not head:  # the id or model held the marker itself: no template
            return sse(self.chunk(text, None)).encode()
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    def full(self, text: str, reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage}

    def chunk(self, content: Any, reason: str | None, usage: dict | None = None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}


def usage_of(handle: Any) -> dict:
    prompt, completion = len(handle.prompt_ids), len(handle.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_error(handle: Any, detok: Any) -> ApiError | None:
    """The error a finished generation maps to, or None when it produced a normal answer."""
    if detok.stopped or handle.finish_reason in ("stop", "length"):
        return None
    if handle.finish_reason == "timeout":
        return ApiError(504, "the request ran longer than serve.request_timeout_seconds", code="timeout")
    if handle.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down; retry", code="engine_closed")
    return ApiError(500, f"generation failed: {handle.error}", code="generation_failed")


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
