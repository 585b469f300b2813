"""Attack: fill the queue with fire-and-forget requests (issue 28).

Before the fix a non-streaming request ran to max_tokens after its client hung up (streaming ones were
freed in 0.5 s), so clients that send and leave could hold every row and every queue slot.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from _live import live, requests_counted
from test_engine import Blocker


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with live(tmp_path_factory.mktemp("hangup")) as s:
        yield s


def finished(api, reason: str) -> float:
    value = api.engine.metrics.registry.get_sample_value("lorad_serve_generations_total", {"reason": reason})
    return value or 0.0


def test_a_hung_up_non_streaming_request_is_cancelled_within_a_second(api):
    before = finished(api, "cancelled")
    hung_up = threading.Event()

    def fire_and_forget():
        try:
            httpx.post(api.url + "/v1/completions", timeout=0.5,
                       json={"model": "lorad", "prompt": "hello world", "max_tokens": 32, "temperature": 0})
        except httpx.TimeoutException:
            pass  # the client closes its connection here
        hung_up.set()

    with Blocker(api.engine):  # the request waits in the queue: only its cancellation can end it early
        threading.Thread(target=fire_and_forget, daemon=True).start()
        assert hung_up.wait(10)
        time.sleep(1.0)
    deadline = time.monotonic() + 5
    while finished(api, "cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished(api, "cancelled") == before + 1, "the row must be cancelled, not run to max_tokens"
    snap = api.engine.snapshot()
    assert (snap["waiting"], snap["running"]) == (0, 0)
    deadline = time.monotonic() + 5   # the handler counts the 499 once it sees the engine's "cancelled"
    while requests_counted(api.daemon, "/v1/completions", 499) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert requests_counted(api.daemon, "/v1/completions", 499) == 1


def test_a_hung_up_stream_is_cancelled_and_counted_499(api):
    before, counted = finished(api, "cancelled"), requests_counted(api.daemon, "/v1/completions", 499)
    body = {"model": "lorad", "prompt": "hello world", "max_tokens": 32, "temperature": 0, "stream": True}
    with Blocker(api.engine):  # queued: only the hang-up can end it early
        with httpx.Client(base_url=api.url, timeout=10) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        # the connection is closed here, before a single token
        deadline = time.monotonic() + 5
        while requests_counted(api.daemon, "/v1/completions", 499) == counted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert requests_counted(api.daemon, "/v1/completions", 499) == counted + 1
    deadline = time.monotonic() + 5
    while finished(api, "cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished(api, "cancelled") == before + 1, "the row must be cancelled, not run to max_tokens"
    assert (api.engine.snapshot()["waiting"], api.engine.snapshot()["running"]) == (0, 0)
