"""Automatic rollback: live signals per version, the post-promotion watch, and the whole path in a real
daemon (admin promotion -> user feedback through the API -> the alias and the served outputs flip back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from daemon.config import PromoteConfig
from daemon.watch import LiveStats, RollbackWatch, p95, since

RELAY_TOKEN = "relay-token-of-the-chat-front-end"


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_watch(**cfg):
    stats, clock, rolled, events = LiveStats(), FakeClock(), [], []
    watch = RollbackWatch(stats, PromoteConfig(**{"rollback_window_seconds": 600, **cfg}), rolled.append,
                          clock=clock, min_requests=10,
                          on_event=lambda kind, **kw: events.append((kind, kw)))
    return stats, clock, watch, rolled, events


def test_live_stats_count_requests_errors_feedback_and_ignore_cancelled():
    s = LiveStats()
    for reason in ("stop", "length", "error", "timeout", "cancelled"):
        s.record("v1", reason, 0.1)
    s.feedback("v1", positive=False, voter="alice")
    s.feedback("v1", positive=False, voter="alice")  # one voter, however often
    snap = s.snapshot("v1")
    assert (snap["requests"], snap["errors"], snap["timeouts"], snap["negative"], snap["positive"]) == (4, 1, 1, 1, 0)
    assert s.snapshot("unknown")["requests"] == 0
    s.feedback("v1", positive=True, voter="alice")  # a later vote replaces the earlier one
    s.feedback("v1", positive=False, voter="bob")
    assert (s.snapshot("v1")["positive"], s.snapshot("v1")["negative"]) == (1, 1)
    assert s.snapshot("v1", votes_after=snap["vote_seq"])["negative"] == 1, "only votes cast after the start count"
    later = dict(snap, requests=9, errors=1, ttft_seen=snap["ttft_seen"] + 2, ttft=snap["ttft"] + [0.5, 0.7],
                 positive=0, negative=0)
    assert since(snap, later) == {"requests": 5, "errors": 0, "timeouts": 0, "positive": 0, "negative": 0,
                                  "ttft": [0.5, 0.7]}
    assert p95([]) is None and p95([3.0, 1.0, 2.0]) == 3.0


def test_error_rate_after_promotion_rolls_back_once_with_the_reason():
    stats, clock, watch, rolled, _ = make_watch(rollback_max_error_rate=0.1)
    for _ in range(50):  # errors of the *previous* champion before the promotion do not count against v2
        stats.record("v2", "error", 0.1)
    watch.promoted("v2", "v1")
    for i in range(9):
        stats.record("v2", "error", 0.1)
    assert watch.check().code == "too_few" and not rolled, "below min_requests nothing is decided"
    stats.record("v2", "stop", 0.1)
    d = watch.check()
    assert d.ok and d.code == "errors" and len(rolled) == 1
    assert "automatic rollback of v2" in rolled[0] and "error rate 90.0 %" in rolled[0]
    assert watch.watching is None and watch.check() is None, "a rolled-back champion is no longer watched"


def test_healthy_champion_is_kept_when_the_window_closes():
    stats, clock, watch, rolled, events = make_watch()
    watch.promoted("v2", "v1")
    for _ in range(30):
        stats.record("v2", "stop", 0.1)
    assert watch.check().code == "healthy" and watch.watching == "v2"
    clock.t += 601
    assert watch.check().code == "window_over" and not rolled and watch.watching is None
    assert events and events[-1][0] == "rollback_watch" and events[-1][1]["ok"] is True
    assert "kept" in events[-1][1]["reason"]


def test_latency_against_the_previous_champions_baseline():
    stats, clock, watch, rolled, _ = make_watch(max_latency_ratio=1.5, latency_floor_ms=0)
    for _ in range(40):
        stats.record("v1", "stop", 0.10)
    watch.promoted("v2", "v1")
    for _ in range(20):
        stats.record("v2", "stop", 0.12)
    assert not watch.check().ok, "20 % slower is within a 1.5x bound"
    for _ in range(40):
        stats.record("v2", "stop", 0.40)
    d = watch.check()
    assert d.ok and d.code == "latency" and rolled


def test_no_latency_verdict_from_a_baseline_of_a_few_samples():
    stats, clock, watch, rolled, _ = make_watch(max_latency_ratio=1.5, latency_floor_ms=0)
    for _ in range(3):  # fewer than min_requests: a p95 of three requests is noise
        stats.record("v1", "stop", 0.01)
    watch.promoted("v2", "v1")
    for _ in range(20):
        stats.record("v2", "stop", 0.40)
    assert watch.check().code == "healthy" and not rolled


def test_negative_feedback_rolls_back_and_a_manual_change_cancels_the_watch():
    stats, clock, watch, rolled, _ = make_watch()
    watch.promoted("v2", "v1")
    watch.cancel()
    for i in range(12):
        stats.feedback("v2", positive=False, voter=f"user{i}")
        stats.record("v2", "stop", 0.1)
    assert watch.check() is None and not rolled
    watch.promoted("v3", "v2")
    for i in range(12):
        stats.record("v3", "stop", 0.1)
        stats.feedback("v3", positive=False, voter=f"user{i}")
    d = watch.check()
    assert d.ok and d.code == "feedback" and "12 of 12 distinct voters negative" in rolled[0]


def test_the_watch_thread_acts_on_signals_without_polling():
    stats, clock, watch, rolled, _ = make_watch(rollback_max_error_rate=0.1)
    watch.check_seconds = 3600  # only the signals themselves can wake it within this test
    watch.start()
    try:
        watch.promoted("v2", "v1")
        for _ in range(10):
            stats.record("v2", "error", None)
        deadline = time.monotonic() + 10
        while not rolled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rolled, "recorded errors must wake the watch thread"
    finally:
        watch.stop()


def test_a_failing_rollback_is_recorded_not_raised():
    stats = LiveStats()
    events = []

    def broken(reason):
        raise RuntimeError("disk on fire")

    watch = RollbackWatch(stats, PromoteConfig(), broken, clock=FakeClock(), min_requests=1,
                          on_event=lambda kind, **kw: events.append(kw))
    watch.promoted("v2", "v1")
    stats.record("v2", "error", 0.1)
    assert watch.check().ok
    assert events and events[-1]["ok"] is False and "disk on fire" in events[-1]["reason"]


@pytest.mark.integration
def test_daemon_rolls_back_a_champion_users_dislike(tmp_path):
    from test_engine import PROMPTS, make_world
    from test_server import TOKEN, free_port

    from daemon import registry
    from daemon.config import build_config
    from daemon.service import Daemon

    world = make_world(tmp_path, n_adapters=2)
    v1, v2 = world["versions"]
    world["store"].close()
    port = free_port()
    cfg = build_config({"paths": {"state_dir": str(world["state"]), "inbox": str(tmp_path / "inbox")},
                        "model": {"base_model": str(world["model_dir"])},
                        "serve": {"port": port, "admin_token": TOKEN, "max_new_tokens": 16,
                                  "feedback_token": RELAY_TOKEN},
                        "promote": {"rollback_min_requests": 5, "rollback_min_voters": 5,
                                    "rollback_window_seconds": 600}})
    d = Daemon(cfg)
    d.serve_only = True
    d.startup()
    server = threading.Thread(target=d.serve_forever, daemon=True)
    server.start()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "daemon did not become ready"
                time.sleep(0.1)

            def answer(model="lorad"):
                r = http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 8,
                                                       "temperature": 0})
                assert r.status_code == 200, r.text
                return r.headers["x-lorad-adapter"], r.json()["choices"][0]["text"]

            assert http.post("/admin/promote", headers=auth, json={"version": v1}).status_code == 200
            served_v1 = answer()
            assert served_v1[0] == v1
            assert http.post("/admin/promote", headers=auth, json={"version": v2}).status_code == 200
            assert d.watch.watching == v2, "a promotion starts the post-promotion watch"
            assert answer()[0] == v2 and answer()[1] != served_v1[1], "the adapters must differ to prove the flip"

            relay = {"Authorization": f"Bearer {RELAY_TOKEN}"}
            bad = http.post("/v1/feedback", json={"rating": 5, "user": "u"}, headers=relay)
            assert bad.status_code == 400 and "rating" in bad.json()["error"]["message"]
            nope = http.post("/v1/feedback", json={"model": "nope", "rating": -1, "user": "u"}, headers=relay)
            assert nope.status_code == 404
            assert http.post("/v1/feedback", json={"rating": -1}).status_code == 401, "anonymous votes are refused"
            for i in range(5):
                version, _text = answer()
                vote = {"model": version, "rating": -1, "user": f"user{i}"}
                assert http.post("/v1/feedback", json=vote, headers=relay).status_code == 200

            deadline = time.monotonic() + 30
            while registry.champion(d.store) != v1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert registry.champion(d.store) == v1, "negative feedback on the new champion must roll it back"
            assert answer() == served_v1, "after the rollback the previous champion's exact outputs are served"
            ev = [e for e in d.store.events(limit=50) if e["kind"] == "alias" or e["kind"] == "rollback"]
            assert any("automatic rollback of " + v2 in (e.get("reason") or "") for e in ev), ev
            assert d.metrics.registry.get_sample_value("lorad_rollbacks_total", {"reason": "feedback"}) == 1

            # `lorad promote` from a shell goes through the running daemon, so the engine swaps at once
            env = {**os.environ, "LORAD_SERVE__ADMIN_TOKEN": TOKEN}
            cli = subprocess.run([sys.executable, "-m", "daemon.cli", "promote", v2, "--state", str(world["state"]),
                                  "--reason", "operator says so", "--json"], capture_output=True, text=True, env=env,
                                 timeout=120)
            assert cli.returncode == 0, cli.stderr
            assert json.loads(cli.stdout)["to"] == v2 and d.engine.champion == v2 and answer()[0] == v2
            env["LORAD_SERVE__ADMIN_TOKEN"] = "wrong"
            cli = subprocess.run([sys.executable, "-m", "daemon.cli", "rollback", "--state", str(world["state"])],
                                 capture_output=True, text=True, env=env, timeout=120)
            assert cli.returncode != 0 and "admin token" in cli.stderr and d.engine.champion == v2
    finally:
        d.request_stop()
        server.join(30)
        d.shutdown()
