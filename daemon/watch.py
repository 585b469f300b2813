"""Live signals per served version, and the post-promotion watch that rolls a bad champion back.

``LiveStats`` is fed by the engine (every finished request: its version, finish reason and time to
first token) and by the API (user feedback votes, one per distinct authenticated voter).
``RollbackWatch`` starts when a version is promoted: for ``promote.rollback_window_seconds`` it asks
the pure ``policy.should_rollback`` about the new champion's server errors, latency and feedback since
the promotion, and flips the champion back (registry alias and engine, in one step) the moment the
answer is yes. Outside a window its thread sleeps on a condition: no polling while nothing is watched.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from daemon.config import PromoteConfig
from daemon.policy import Decision, should_rollback

log = logging.getLogger("lorad.watch")

# Finish reasons the server caused. A timeout is not one: clients choose max_tokens and the load, so
# anyone could time requests out; a slow champion is caught by the latency rule against the previous one.
SERVER_FAILURES = frozenset({"error"})
TTFT_SAMPLES = 1024  # recent time-to-first-token samples kept per version
MAX_VOTERS = 10_000  # latest vote per voter kept per version; the oldest voters are forgotten beyond this


@dataclass
class _Counters:
    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    votes: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # voter -> (positive, seq)
    ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TTFT_SAMPLES))
    ttft_seen: int = 0  # samples ever appended (the deque forgets old ones)


class LiveStats:
    """Thread-safe per-version counters of what the server actually delivered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_version: dict[str, _Counters] = collections.defaultdict(_Counters)
        self._listeners: list[Callable[[str], None]] = []
        self._vote_seq = 0

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """``listener(version)`` is called (from the recording thread) after every recorded signal."""
        self._listeners.append(listener)

    def record(self, version: str, finish_reason: str, ttft_seconds: float | None) -> None:
        """One finished request. Cancelled requests (the client left) say nothing about the version."""
        if finish_reason == "cancelled":
            return
        with self._lock:
            c = self._by_version[version]
            c.requests += 1
            c.errors += finish_reason in SERVER_FAILURES
            c.timeouts += finish_reason == "timeout"
            if ttft_seconds is not None:
                c.ttft.append(ttft_seconds)
                c.ttft_seen += 1
        self._notify(version)

    def feedback(self, version: str, positive: bool, voter: str) -> dict:
        """One vote on a version's answers; a voter's later vote replaces its earlier one.

        Args:
            voter: a stable id of who votes (a hash of the API key, or a user named by the trusted relay),
                so that one client voting many times is still one voter.
        Returns:
            the version's totals: distinct voters whose latest vote is positive / negative.
        """
        with self._lock:
            c = self._by_version[version]
            self._vote_seq += 1
            c.votes.pop(voter, None)
            c.votes[voter] = (positive, self._vote_seq)
            while len(c.votes) > MAX_VOTERS:
                c.votes.popitem(last=False)
            positives = sum(1 for p, _ in c.votes.values() if p)
            totals = {"version": version, "positive": positives, "negative": len(c.votes) - positives}
        self._notify(version)
        return totals

    def snapshot(self, version: str, votes_after: int = 0) -> dict:
        """Plain totals for one version: requests, errors, TTFT samples seen so far, and the distinct voters
        whose latest vote came after vote number ``votes_after`` (``vote_seq`` of an earlier snapshot)."""
        with self._lock:
            c = self._by_version.get(version) or _Counters()
            recent = [p for p, seq in c.votes.values() if seq > votes_after]
            return {"requests": c.requests, "errors": c.errors, "timeouts": c.timeouts,
                    "positive": sum(recent), "negative": len(recent) - sum(recent), "vote_seq": self._vote_seq,
                    "ttft_seen": c.ttft_seen, "ttft": list(c.ttft)}

    def _notify(self, version: str) -> None:
        for listener in self._listeners:
            try:
                listener(version)
            except Exception:  # a broken listener must never fail a request
                log.exception("live-stats listener failed")


def p95(samples: list[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def since(start: dict, now: dict) -> dict:
    """Signals recorded between two snapshots of one version (TTFT: the samples that arrived after ``start``).

    Votes are not differences: ``now`` must be taken with ``votes_after=start["vote_seq"]``, so it already
    counts only the voters who voted since ``start``.
    """
    new_ttft = now["ttft_seen"] - start["ttft_seen"]
    return {"requests": now["requests"] - start["requests"], "errors": now["errors"] - start["errors"],
            "timeouts": now["timeouts"] - start["timeouts"], "positive": now["positive"],
            "negative": now["negative"], "ttft": now["ttft"][-new_ttft:] if new_ttft > 0 else []}


@dataclass
class _Watched:
    version: str
    previous: str | None
    started: float
    start: dict
    baseline_ttft_p95: float | None


class RollbackWatch:
    """After each promotion, watch the new champion's live signals and roll back when policy says so.

    Args:
        stats: the LiveStats the engine and API feed.
        cfg: promote settings (window, error-rate limit, latency ratio).
        rollback: ``rollback(reason) -> dict`` flips registry alias and engine back (engine.rollback_and_swap).
        clock: wall clock for the window (tests pass a fake one).
        min_requests: requests the new champion must have served before error rate and latency count.
        check_seconds: how often the window is re-checked without new signals (so the window can end).
        metrics: LoradMetrics or None; ``on_event(kind, ok, reason, data)`` records decisions (store events).
    """

    def __init__(self, stats: LiveStats, cfg: PromoteConfig, rollback: Callable[[str], Any], *,
                 clock: Callable[[], float] = time.time, min_requests: int = 20, check_seconds: float = 5.0,
                 metrics: Any = None, on_event: Callable[..., Any] | None = None):
        self.stats = stats
        self.cfg = cfg
        self._rollback = rollback
        self.clock = clock
        self.min_requests = min_requests
        self.check_seconds = check_seconds
        self.metrics = metrics
        self.on_event = on_event
        self._cond = threading.Condition()
        self._watched: _Watched | None = None
        self._dirty = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_decision: Decision | None = None
        stats.subscribe(self._poke)

    # -- control --------------------------------------------------------------------------

    def start(self) -> "RollbackWatch":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rollback-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    def promoted(self, version: str | None, previous: str | None) -> None:
        """A promotion happened: watch ``version`` against ``previous`` from now on (the base is not watched)."""
        if version is None or self.cfg.rollback_window_seconds <= 0:
            self.cancel()
            return
        # The latency baseline is the previous champion adapter's recent p95, but only from enough samples: a
        # p95 of three requests is noise, and a noisy baseline would roll back healthy champions. The bare
        # base is no latency baseline (as in policy.should_promote): every adapter adds its LoRA matmuls.
        before = self.stats.snapshot(previous)["ttft"] if previous is not None else []
        baseline = p95(before) if len(before) >= self.min_requests else None
        with self._cond:
            self._watched = _Watched(version, previous, self.clock(), self.stats.snapshot(version), baseline)
            self._dirty = True
            self._cond.notify_all()
        log.info("watching new champion", extra={"version": version, "window_s": self.cfg.rollback_window_seconds})

    def cancel(self) -> None:
        """Stop watching (a manual rollback or another promotion supersedes the watch)."""
        with self._cond:
            self._watched = None

    @property
    def watching(self) -> str | None:
        w = self._watched
        return w.version if w is not None else None

    # -- the decision ------------------------------------------------------------------------

    def check(self) -> Decision | None:
        """Ask the policy about the watched version now; roll back if it says so. None when nothing is watched."""
        with self._cond:
            w = self._watched
        if w is None:
            return None
        live = since(w.start, self.stats.snapshot(w.version, votes_after=w.start["vote_seq"]))
        decision = should_rollback(seconds_since_promotion=self.clock() - w.started, requests=live["requests"],
                                   errors=live["errors"], ttft_p95_s=p95(live["ttft"]),
                                   baseline_ttft_p95_s=w.baseline_ttft_p95, cfg=self.cfg,
                                   min_requests=self.min_requests, negative_feedback=live["negative"],
                                   positive_feedback=live["positive"])
        self.last_decision = decision
        if decision.code == "window_over":
            with self._cond:
                if self._watched is w:
                    self._watched = None
            self._event(True, f"{w.version} kept: healthy through the {self.cfg.rollback_window_seconds} s "
                              f"watch window ({live['requests']} requests, {live['errors']} errors)", w, live)
        elif decision.ok:
            with self._cond:
                if self._watched is not w:  # superseded while we decided
                    return decision
                self._watched = None
            log.warning("automatic rollback", extra={"version": w.version, "reason": decision.reason})
            try:
                self._rollback(f"automatic rollback of {w.version}: {decision.reason}")
            except Exception as e:  # keep serving; the event says why the rollback itself failed
                log.exception("automatic rollback failed")
                self._event(False, f"automatic rollback of {w.version} failed: {type(e).__name__}: {e}", w, live)
                return decision
            if self.metrics is not None:
                self.metrics.rollbacks.labels(decision.code).inc()
        return decision

    def _event(self, ok: bool, reason: str, w: _Watched, live: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event("rollback_watch", subject=w.version, ok=ok, reason=reason,
                              data={k: v for k, v in live.items() if k != "ttft"})
            except Exception:
                log.exception("recording the watch event failed")

    # -- thread ------------------------------------------------------------------------------

    def _poke(self, version: str) -> None:
        w = self._watched
        if w is not None and w.version == version:
            with self._cond:
                self._dirty = True
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._watched is None or not self._dirty):
                    if self._watched is None:
                        self._cond.wait()  # idle: nothing promoted recently, nothing to do
                    elif not self._cond.wait(self.check_seconds):
                        break  # periodic re-check so the window can close without traffic
                if self._stopping:
                    return
                self._dirty = False
            try:
                self.check()
            except Exception:
                log.exception("rollback watch check failed")
