"""Fuzzing the HTTP API from its OpenAPI description (schemathesis) against a real ``lorad serve``.

``OPENAPI`` below describes lorad's public surface (OpenAI-compatible requests, health, admin). lorad
itself publishes no /openapi.json (its handlers parse bodies by hand, so FastAPI's would be empty);
this document is what clients may send. Schemathesis generates valid and invalid requests from it;
every answer must be below 500 with OpenAI's error body, the server must stay up, and its memory
bounded. Oversized bodies and prompts are checked explicitly (413 / 400). The example count per
operation is LORAD_FUZZ_EXAMPLES (CI default below; bench/reliability.py runs more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-admin-token"
EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "25"))
MAX_BODY = 8192
MAX_RSS_GROWTH_MB = 150

_text = {"type": "string", "maxLength": 400}
_error = {"description": "OpenAI error body", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message"]}}}}}}
_sampling = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
    "top_p": {"type": "number"}, "seed": {"type": "integer"}, "n": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": _text}]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "logprobs": {"type": "boolean"}, "presence_penalty": {"type": "number"},
}
_errors = {str(code): _error for code in (400, 401, 403, 404, 408, 409, 413, 429, 499, 503)}


def _post(body: dict, summary: str) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
        "schema": body}}}, "responses": {"200": {"description": "ok"}, **_errors}}}


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "lorad", "version": "0.1.0"},
    "paths": {
        "/v1/chat/completions": _post({"type": "object", "required": ["messages"], "properties": {
            "messages": {"type": "array", "items": {"type": "object", "required": ["role", "content"], "properties": {
                "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"oneOf": [_text, {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "text": _text}}}]}}}},
            "max_completion_tokens": {"type": "integer"}, **_sampling}}, "chat completion"),
        "/v1/completions": _post({"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"oneOf": [_text, {"type": "array", "items": {"type": "integer"}},
                                 {"type": "array", "items": _text}]},
            "echo": {"type": "boolean"}, "best_of": {"type": "integer"}, "suffix": {"type": "string"},
            **_sampling}}, "completion"),
        "/v1/feedback": _post({"type": "object", "required": ["rating"], "properties": {
            "rating": {"type": "integer"}, "model": {"type": "string"}, "user": _text}}, "feedback vote"),
        "/admin/promote": _post({"type": "object", "properties": {"version": {"type": "string"}, "reason": _text}},
                                "promote a version"),
        "/admin/rollback": _post({"type": "object", "properties": {"reason": _text}}, "roll back"),
        "/admin/reload": _post({"type": "object"}, "reload the champion"),
        "/v1/models": {"get": {"responses": {"200": {"description": "models"}}}},
        "/healthz": {"get": {"responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"responses": {"200": {"description": "ready"}, "503": {"description": "loading"}}}},
        "/metrics": {"get": {"responses": {"200": {"description": "prometheus text"}}}},
        "/status": {"get": {"responses": {"200": {"description": "status document"}}}},
    },
}

schema = schemathesis.openapi.from_dict(OPENAPI)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_serve(root: Path, *, max_body: int = MAX_BODY, max_queue: int = 16, token: str = TOKEN,
                n_adapters: int = 2) -> tuple[subprocess.Popen, str, dict]:
    """A real ``lorad serve`` on a free port of 127.0.0.1, tiny random Llama + registered adapters."""
    import yaml

    from test_engine import make_world
    from test_service import free_port, get, wait_for

    world = make_world(root, n_adapters=n_adapters)
    world["store"].close()
    port = free_port()
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "paths": {"state_dir": str(world["state"]), "inbox": str(root / "inbox")},
        "model": {"base_model": str(world["model_dir"])},
        "serve": {"port": port, "max_new_tokens": 8, "max_prompt_tokens": 64, "max_body_bytes": max_body,
                  "max_queue": max_queue, "max_batch_size": 4, "request_timeout_seconds": 30,
                  "feedback_per_minute": 1_000_000},
        "metrics": {"log_format": "json"}}))
    log = open(root / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "-c", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=log, env={**os.environ, "LORAD_SERVE__ADMIN_TOKEN": token,
                                                         "LORAD_SERVE__FEEDBACK_TOKEN": token})
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(url + "/readyz")[0] == 200, timeout=180)
    except AssertionError:
        proc.kill()
        raise AssertionError((root / "serve.log").read_text()[-3000:])
    return proc, url, world


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-api")
    proc, url, world = start_serve(root)
    import httpx

    for _ in range(5):  # warm up: the first requests allocate the decode buffers
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                       "max_tokens": 8}, timeout=60)
    proc.rss_start = rss_mb(proc.pid)
    proc.cases = 0
    yield proc, url, world
    if os.environ.get("LORAD_FUZZ_REPORT"):  # bench/reliability.py counts the cases
        with open(os.environ["LORAD_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps({"suite": "api", "cases": proc.cases, "rss_start_mb": round(proc.rss_start, 1),
                                "rss_end_mb": round(rss_mb(proc.pid), 1) if proc.poll() is None else None}) + "\n")
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("LORAD_FUZZ_RANDOM") is None,
          suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case, serve):
    proc, url, _ = serve
    # The admin token opens /admin/*; as the feedback token it lets votes through to their validation.
    headers = {"Authorization": f"Bearer {TOKEN}"} if case.path.startswith(("/admin", "/v1/feedback")) else None
    response = case.call(base_url=url, headers=headers, timeout=60)
    proc.cases += 1
    assert response.status_code < 500 or (case.path == "/readyz" and response.status_code == 503), \
        f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:500]}"
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert response.json()["error"]["message"], response.text
    assert proc.poll() is None, "the server process died"


@pytest.mark.integration
def test_limits_and_bounded_memory_after_fuzzing(serve):
    """Runs after the fuzz cases (same module): still serving, memory bounded, big inputs refused."""
    import httpx

    proc, url, _ = serve
    chat = url + "/v1/chat/completions"
    r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    growth = rss_mb(proc.pid) - proc.rss_start
    assert growth < MAX_RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB over {proc.cases} fuzz cases"

    big = {"messages": [{"role": "user", "content": "x " * MAX_BODY}], "max_tokens": 4}
    r = httpx.post(chat, json=big, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(2 * MAX_BODY // 1024 + 1):
            yield b" " * 1024

    r = httpx.post(chat, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    long_prompt = {"messages": [{"role": "user", "content": "the law " * 100}], "max_tokens": 4}
    r = httpx.post(chat, json=long_prompt, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, timeout=60)
    assert r.status_code == 400 and "serve.max_new_tokens" in r.json()["error"]["message"]
    r = httpx.post(chat, content=b"\xff\xfe{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert proc.poll() is None
