"""Attack: crash request handling with malformed input (issue 28).

Before the fix lone surrogates, ``stream_options`` of the wrong type and deeply nested JSON gave unhandled
500s that lorad_serve_requests_total did not count; a client hanging up mid-body logged a traceback; a
config error printed the admin token.
"""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from _live import live, requests_counted

MALFORMED = [
    ("/v1/completions", b'{"model": "lorad", "prompt": "hello \\ud800 world", "max_tokens": 2}', "Unicode"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', "Unicode"),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 2, "stop": "\\ud83d"}', "Unicode"),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 2, "stream": true, "stream_options": "yes"}',
     "stream_options"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
                             b'"stream_options": [true]}', "stream_options"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "nested"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested"),
    ("/v1/completions", b'"just a string"', "JSON object"),
    ("/v1/completions", b"[1, 2, 3]", "JSON object"),
    ("/v1/completions", b"null", "JSON object"),
    ("/v1/feedback", b"42", "JSON object"),
    ("/v1/completions", b"\xff\xfe not utf-8", "not valid JSON"),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with live(tmp_path_factory.mktemp("malformed"), feedback_token="relay-token-0123456789") as s:
        yield s


@pytest.mark.parametrize("route, body, says", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_get_a_counted_4xx_with_a_message(api, route, body, says):
    before = requests_counted(api.daemon, route, 400)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer relay-token-0123456789"}
    r = httpx.post(api.url + route, content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert says in r.json()["error"]["message"]
    assert requests_counted(api.daemon, route, 400) == before + 1


def test_unknown_paths_and_methods_are_counted(api):
    assert httpx.get(api.url + "/etc/passwd", timeout=30).status_code == 404
    assert httpx.get(api.url + "/v1/completions", timeout=30).status_code == 405
    assert requests_counted(api.daemon, "other", 404) >= 1
    assert requests_counted(api.daemon, "/v1/completions", 405) >= 1


def test_a_client_that_hangs_up_mid_body_is_one_log_line(api, caplog):
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", api.server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while requests_counted(api.daemon, "/v1/completions", 499) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert requests_counted(api.daemon, "/v1/completions", 499) == 1
    lines = [r for r in caplog.records if "disconnected before sending its whole" in r.getMessage()]
    assert len(lines) == 1 and not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert httpx.get(api.url + "/healthz", timeout=30).status_code == 200


def test_config_errors_never_print_secrets(tmp_path):
    from daemon.config import ConfigError, build_config, load_config

    broken = tmp_path / "lorad.yaml"
    broken.write_text('serve:\n  admin_token: "tok-in-a-broken-line\n  port: 1\n')
    with pytest.raises(ConfigError) as e:
        load_config(broken, environ={})
    assert "invalid YAML" in str(e.value) and "line" in str(e.value) and "tok-in-a-broken-line" not in str(e.value)

    with pytest.raises(ConfigError) as e:
        build_config({"serve": {"admin_token": 987654321987, "feedback_token": ["s3cr3t-relay"],
                                "api_keys": "k-single-string-key-0123"}})
    text = str(e.value)
    assert "serve.admin_token" in text and "serve.feedback_token" in text and "serve.api_keys" in text
    for secret in ("987654321987", "s3cr3t-relay", "k-single-string-key-0123"):
        assert secret not in text, text
