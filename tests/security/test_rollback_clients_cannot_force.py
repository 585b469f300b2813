"""Attack: roll back a freshly promoted champion as an anonymous client (issue 28).

Before the fix, twenty timeouts a client provoked (answers longer than the timeout) or twenty anonymous
``POST /v1/feedback {"rating": -1}`` rolled a champion back within seconds.
"""

from __future__ import annotations

import httpx
import pytest

from _live import API_KEY, OTHER_KEY, live

from daemon.config import PromoteConfig
from daemon.watch import LiveStats, RollbackWatch


def watch_v2(**cfg):
    stats, rolled = LiveStats(), []
    watch = RollbackWatch(stats, PromoteConfig(**{"rollback_window_seconds": 600, **cfg}), rolled.append,
                          clock=lambda: 1000.0, min_requests=20)
    watch.promoted("v2", "v1")
    return stats, watch, rolled


def test_client_caused_timeouts_and_hangups_do_not_roll_back():
    stats, watch, rolled = watch_v2()
    for _ in range(20):
        stats.record("v2", "timeout", None)  # max_tokens too long for serve.request_timeout_seconds
        stats.record("v2", "cancelled", None)  # the client hung up
    d = watch.check()
    assert not d.ok and not rolled, d.reason
    for _ in range(2):
        stats.record("v2", "error", 0.1)  # a generation the server failed: that one counts
    assert watch.check().code == "errors" and rolled


def test_one_voter_voting_many_times_is_one_voter():
    stats, watch, rolled = watch_v2(rollback_min_voters=5)
    for _ in range(50):
        stats.feedback("v2", positive=False, voter="key:attacker")
    assert not watch.check().ok and not rolled
    for i in range(4):
        stats.feedback("v2", positive=False, voter=f"key:user{i}")
    assert watch.check().code == "feedback" and rolled


@pytest.fixture(scope="module")
def open_api(tmp_path_factory):
    with live(tmp_path_factory.mktemp("open")) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory):
    with live(tmp_path_factory.mktemp("keyed"), api_keys=[API_KEY, OTHER_KEY], feedback_per_minute=3) as s:
        yield s


def test_anonymous_feedback_is_refused(open_api):
    with httpx.Client(base_url=open_api.url, timeout=30) as http:
        for _ in range(20):
            r = http.post("/v1/feedback", json={"rating": -1})
            assert r.status_code == 403 and "serve.api_keys" in r.json()["error"]["message"], r.text
    assert open_api.daemon.live.snapshot("base")["negative"] == 0


def test_feedback_counts_per_key_and_is_rate_limited(keyed_api):
    with httpx.Client(base_url=keyed_api.url, timeout=30) as http:
        assert http.post("/v1/feedback", json={"rating": -1}).status_code == 401
        wrong = {"Authorization": "Bearer not-a-key-at-all-123"}
        assert http.post("/v1/feedback", json={"rating": -1}, headers=wrong).status_code == 401
        key = {"Authorization": f"Bearer {API_KEY}"}
        codes = [http.post("/v1/feedback", json={"rating": -1}, headers=key).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429], codes
        other = http.post("/v1/feedback", json={"rating": 1}, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert other.status_code == 200 and (other.json()["positive"], other.json()["negative"]) == (1, 1)
