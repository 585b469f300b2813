"""Attack: use the API, or read the daemon's paths and files through /status, as anyone on the port (issue 28).

With ``serve.api_keys`` the OpenAI-compatible endpoints answer only requests with one of the keys (as vLLM's
``--api-key``); without the admin token /status shows states and counts, no paths, PIDs or reasons.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from _live import API_KEY, live


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with live(tmp_path_factory.mktemp("keys"), api_keys=[API_KEY]) as s:
        s.daemon.status = lambda: {"state_dir": "/srv/lorad-state", "inbox": "/srv/inbox", "base_model": "/models/x",
                                   "daemon": {"running": True, "pid": 4242, "url": s.url, "model_ready": True},
                                   "initialized": True, "counts": {"records": 3}, "runs": [],
                                   "events": [{"reason": "root:x:0:0:root:/root:/bin/bash"}],
                                   "last_drift": {"reason": "secret line of a file"}}
        yield s


def test_the_api_needs_a_key_when_keys_are_set(keyed):
    prompt = {"model": "lorad", "prompt": "hello world", "max_tokens": 2}
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": API_KEY}):
            r = http.post("/v1/completions", json=prompt, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.get("/healthz").status_code == 200, "probes need no key"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).completions.create(**prompt)
    oai = OpenAI(base_url=keyed.url + "/v1", api_key=API_KEY, max_retries=0)
    ok = oai.completions.create(**prompt)
    assert ok.choices[0].finish_reason in ("stop", "length")
    base = [m for m in oai.models.list().data if m.id == "base"][0]
    assert base.root == keyed.world["model_dir"].name, "the base model's folder, not its path on the host"


def test_status_without_the_admin_token_shows_no_paths_pids_or_contents(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        public = http.get("/status")
        full = http.get("/status", headers=keyed.admin)
    text = public.text
    for leak in ("/srv/", "/models/", "4242", "root:x:0", "secret line"):
        assert leak not in text, leak
    assert public.json()["counts"] == {"records": 3} and public.json()["engine"]["champion"] == "base"
    assert full.json()["daemon"]["pid"] == 4242 and full.json()["state_dir"] == "/srv/lorad-state"


def test_a_warning_when_the_port_is_exposed_without_keys(caplog):
    from daemon.server import uvicorn_config

    serve = SimpleNamespace(host="0.0.0.0", port=8000, api_keys=[], header_timeout_seconds=10.0)
    with caplog.at_level(logging.WARNING, logger="lorad.server"):
        uvicorn_config(object(), serve)
        assert any("without API keys" in r.getMessage() for r in caplog.records)
        caplog.clear()
        uvicorn_config(object(), SimpleNamespace(**{**vars(serve), "api_keys": [API_KEY]}))
        for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
            uvicorn_config(object(), SimpleNamespace(**{**vars(serve), "host": loopback}))
        assert not caplog.records
        uvicorn_config(object(), SimpleNamespace(**{**vars(serve), "host": "::"}))
        assert caplog.records


def test_keys_can_come_from_the_environment_and_are_never_shown():
    from daemon.config import ConfigError, load_config, render_yaml

    cfg = load_config(None, environ={"LORAD_SERVE__API_KEYS": f"{API_KEY}, k-second-key-0123456789",
                                     "LORAD_SERVE__ADMIN_TOKEN": "12345678901234567890"})
    assert cfg.serve.api_keys == [API_KEY, "k-second-key-0123456789"]
    assert cfg.serve.admin_token == "12345678901234567890", "a numeric token stays the string it was"
    assert API_KEY not in render_yaml(cfg) and "1234567890" not in json.dumps(cfg.to_dict())
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={"LORAD_SERVE__API_KEYS": "[[nested-secret-value]]",
                                   "LORAD_SERVE__FEEDBACK_TOKEN": "[another-secret-value]"})
    assert "serve.api_keys" in str(e.value) and "secret-value" not in str(e.value)
