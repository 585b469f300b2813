"""Policy decisions are pure: tables of cases, no model, no clock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.config import PromoteConfig, ScheduleConfig
from daemon.policy import should_promote, should_rollback, should_train

SCHED = ScheduleConfig(min_new_records=50, cooldown_minutes=60, train_on_drift=True)
NOW = 1_800_000_000.0
DRIFT = {"drift": True, "p_value": 0.001, "status": "ok", "explanation": "embedding MMD"}
NO_DRIFT = {"drift": False, "p_value": 0.4, "status": "ok"}


@pytest.mark.parametrize("kw, ok, code", [
    (dict(trigger="drift", drift=DRIFT, pending=200, last_run_at=None, job_running=False), True, "drift"),
    (dict(trigger="drift", drift=DRIFT, pending=200, last_run_at=None, job_running=True), False, "busy"),
    (dict(trigger="drift", drift=NO_DRIFT, pending=200, last_run_at=None, job_running=False), False, "no_drift"),
    (dict(trigger="drift", drift=None, pending=200, last_run_at=None, job_running=False), False, "no_drift_result"),
    (dict(trigger="drift", drift={"drift": False, "status": "insufficient_data", "explanation": "12 < 50"},
          pending=200, last_run_at=None, job_running=False), False, "insufficient_data"),
    (dict(trigger="drift", drift=DRIFT, pending=49, last_run_at=None, job_running=False), False, "too_few"),
    (dict(trigger="drift", drift=DRIFT, pending=0, last_run_at=None, job_running=False), False, "no_data"),
    (dict(trigger="drift", drift=DRIFT, pending=200, last_run_at=NOW - 59 * 60, job_running=False), False, "cooldown"),
    (dict(trigger="drift", drift=DRIFT, pending=200, last_run_at=NOW - 61 * 60, job_running=False), True, "drift"),
    (dict(trigger="monthly", drift=NO_DRIFT, pending=50, last_run_at=None, job_running=False), True, "monthly"),
    (dict(trigger="monthly", drift=None, pending=10, last_run_at=None, job_running=False), False, "too_few"),
    (dict(trigger="monthly", drift=None, pending=100, last_run_at=NOW - 60, job_running=False), False, "cooldown"),
    (dict(trigger="manual", drift=None, pending=3, last_run_at=NOW - 60, job_running=False), True, "manual"),
    (dict(trigger="manual", drift=None, pending=3, last_run_at=None, job_running=True), False, "busy"),
])
def test_should_train(kw, ok, code):
    d = should_train(now=NOW, cfg=SCHED, **kw)
    assert (d.ok, d.code) == (ok, code), d.reason
    assert d.reason


def test_should_train_respects_disabled_drift_runs():
    d = should_train(trigger="drift", drift=DRIFT, pending=500, last_run_at=None, now=NOW, job_running=False,
                     cfg=ScheduleConfig(train_on_drift=False))
    assert not d and "train_on_drift" in d.reason


def test_should_train_rejects_unknown_trigger():
    with pytest.raises(ValueError, match="trigger"):
        should_train(trigger="whim", drift=None, pending=1, last_run_at=None, now=NOW, job_running=False, cfg=SCHED)


PROMOTE = PromoteConfig(min_improvement=0.0, regression_tolerance=0.02, max_latency_ratio=1.25, latency_floor_ms=0)


def report(cand=1.8, inc=2.0, p=0.001, n=50, regression=None, latency=None):
    return {"holdout": {"candidate_loss": cand, "incumbent_loss": inc, "p_value": p, "n": n},
            "regression": regression or {"chatterbot-en": {"candidate_loss": 3.0, "incumbent_loss": 3.0, "n": 40}},
            "latency": latency or {}}


@pytest.mark.parametrize("rep, ok, code, needle", [
    (report(), True, "better", "-10.0 %"),
    (report(n=0), False, "no_holdout", "no new-data holdout"),
    (report(cand=2.0), False, "not_better", "not better"),
    (report(cand=2.1), False, "not_better", "+5.0 %"),
    (report(p=0.2), False, "not_significant", "p = 0.2 > 0.05"),
    (report(cand=float("nan")), False, "invalid", "nan"),
    (report(regression={"chatterbot-zh": {"candidate_loss": 2.082, "incumbent_loss": 2.0, "n": 40}}),
     False, "regression", "regression set chatterbot-zh loss +4.1 % vs the incumbent > 2 % tolerance"),
    (report(regression={"chatterbot-zh": {"candidate_loss": 2.03, "incumbent_loss": 2.0, "n": 40}}),
     True, "better", ""),
    (report(regression={"a": {"candidate_loss": 1.0, "incumbent_loss": 1.0, "n": 9},
                        "b": {"candidate_loss": float("inf"), "incumbent_loss": 1.0, "n": 9}}),
     False, "regression", "regression set b"),
    (report(latency={"candidate_ttft_s": 0.40, "incumbent_ttft_s": 0.30}), False, "latency", "1.33x"),
    (report(latency={"candidate_ttft_s": 0.33, "incumbent_ttft_s": 0.30}), True, "better", ""),
])
def test_should_promote(rep, ok, code, needle):
    d = should_promote(rep, PROMOTE, confidence=0.95)
    assert (d.ok, d.code) == (ok, code), d.reason
    assert needle in d.reason


def test_regression_reference_base_does_not_ratchet_on_the_champion():
    """The continual benchmark's month 2: the champion improved general chat 22 % over the base; a candidate
    5.5 % worse than the champion but 18 % better than the base is promoted under "base", refused under
    "incumbent"; a candidate worse than the base is refused under both."""
    rep = report(regression={"chatterbot-en": {"candidate_loss": 2.90, "incumbent_loss": 2.75, "base_loss": 3.515,
                                               "n": 40}})
    assert should_promote(rep, PromoteConfig(regression_reference="base"), confidence=0.95).ok
    d = should_promote(rep, PromoteConfig(regression_reference="incumbent"), confidence=0.95)
    assert (d.ok, d.code) == (False, "regression") and "+5.5 % vs the incumbent" in d.reason
    worse = report(regression={"chatterbot-en": {"candidate_loss": 3.60, "incumbent_loss": 2.75, "base_loss": 3.515,
                                                 "n": 40}})
    d = should_promote(worse, PromoteConfig(regression_reference="base"), confidence=0.95)
    assert (d.ok, d.code) == (False, "regression") and "+2.4 % vs the base model" in d.reason
    # a report without base_loss (an older one) falls back to the incumbent
    old = report(regression={"chatterbot-en": {"candidate_loss": 2.90, "incumbent_loss": 2.75, "n": 40}})
    assert not should_promote(old, PromoteConfig(regression_reference="base"), confidence=0.95).ok


def test_the_first_adapter_is_not_refused_for_being_slower_than_the_bare_base():
    # Measured on 2 CPU cores (e2e_latency_cpu): 723 ms vs the bare base's 566 ms for 400-token prompts.
    first = report(latency={"candidate_ttft_s": 0.723, "incumbent_ttft_s": 0.566, "incumbent": "base"})
    d = should_promote(first, PromoteConfig(latency_floor_ms=500), confidence=0.95)
    assert d.ok and "first adapter" in d.reason and "723 ms" in d.reason
    later = report(latency={"candidate_ttft_s": 0.723, "incumbent_ttft_s": 0.566, "incumbent": "adapter"})
    d = should_promote(later, PromoteConfig(latency_floor_ms=500), confidence=0.95)
    assert not d.ok and d.code == "latency"
    quick = report(latency={"candidate_ttft_s": 0.60, "incumbent_ttft_s": 0.566, "incumbent": "base"})
    assert "first adapter" not in should_promote(quick, PromoteConfig(latency_floor_ms=500), confidence=0.95).reason


def test_latency_floor_lets_fast_enough_candidates_through():
    # GPU, the first adapter against the bare base: 3.6x slower, but far below 500 ms -> not refused
    gpu = report(latency={"candidate_ttft_s": 0.150, "incumbent_ttft_s": 0.042})
    assert should_promote(gpu, PromoteConfig(latency_floor_ms=500), confidence=0.95).ok
    d = should_promote(gpu, PromoteConfig(latency_floor_ms=100), confidence=0.95)
    assert not d.ok and d.code == "latency" and "3.57x" in d.reason and "latency_floor_ms 100" in d.reason
    slow = report(latency={"candidate_ttft_s": 0.9, "incumbent_ttft_s": 0.6})
    assert should_promote(slow, PromoteConfig(latency_floor_ms=500), confidence=0.95).code == "latency"
    live = dict(seconds_since_promotion=10, requests=100, errors=0, baseline_ttft_p95_s=0.04)
    assert not should_rollback(ttft_p95_s=0.15, cfg=PromoteConfig(latency_floor_ms=500), **live).ok
    assert should_rollback(ttft_p95_s=0.15, cfg=PromoteConfig(latency_floor_ms=0), **live).code == "latency"


def test_min_improvement_is_a_floor():
    cfg = PromoteConfig(min_improvement=0.15)
    assert not should_promote(report(cand=1.8, inc=2.0), cfg, confidence=0.95)
    assert should_promote(report(cand=1.6, inc=2.0), cfg, confidence=0.95)


def cmp(cand, inc, p, n=40):
    return {"candidate": cand, "incumbent": inc, "p_value": p, "n": n}


def scored(scores, **kw):
    return {**report(**kw), "scores": scores}


COLLAPSE = {"holdout": {"categories": {"mcq": {"accuracy": cmp(0.25, 0.90, 0.001)}}, "uncategorized": {}}}


@pytest.mark.parametrize("rep, cfg, ok, code, needle", [
    # the loss improves by 10 % and is significant, but the answers collapse: refused, and the reason says where
    (scored(COLLAPSE), PROMOTE, False, "answer_drop", "holdout category mcq accuracy 0.250 vs incumbent 0.900"),
    # the same drop, not significant (p = 0.2): promoted
    (scored({"holdout": {"categories": {"mcq": {"accuracy": cmp(0.25, 0.90, 0.2)}}}}), PROMOTE, True, "better", ""),
    # significant but within promote.max_score_drop: promoted
    (scored({"holdout": {"categories": {"mcq": {"accuracy": cmp(0.89, 0.90, 0.001)}}}}), PROMOTE, True, "better", ""),
    # a regression set's F1 (records without a category) collapses
    (scored({"chatterbot-zh": {"categories": {}, "uncategorized": {"f1": cmp(0.10, 0.50, 0.001)}}}), PROMOTE,
     False, "answer_drop", "chatterbot-zh f1 0.100 vs incumbent 0.500"),
    # ROUGE-L is reported, not guarded, unless a category's primary metric says so
    (scored({"holdout": {"categories": {"qa": {"rouge_l": cmp(0.1, 0.5, 0.001)}}}}), PROMOTE, True, "better", ""),
    (scored({"holdout": {"categories": {"qa": {"rouge_l": cmp(0.1, 0.5, 0.001)}}}}),
     PromoteConfig(primary_metric=["qa=rouge_l"]), False, "answer_drop", "category qa rouge_l"),
    # primary metric "loss": the category's accuracy is not guarded
    (scored(COLLAPSE), PromoteConfig(primary_metric=["mcq=loss"]), True, "better", ""),
    # candidates that answer better pass
    (scored({"holdout": {"categories": {"mcq": {"accuracy": cmp(0.9, 0.5, 1.0)}}}}), PROMOTE, True, "better", ""),
    # a loss refusal still comes first
    (scored(COLLAPSE, cand=2.1), PROMOTE, False, "not_better", "not better"),
])
def test_should_promote_guards_answer_scores(rep, cfg, ok, code, needle):
    d = should_promote(rep, cfg, confidence=0.95)
    assert (d.ok, d.code) == (ok, code), d.reason
    assert needle in d.reason


@pytest.mark.parametrize("kw, ok, code", [
    (dict(seconds_since_promotion=10, requests=100, errors=10), True, "errors"),
    (dict(seconds_since_promotion=10, requests=100, errors=5), False, "healthy"),
    (dict(seconds_since_promotion=10, requests=5, errors=5), False, "too_few"),
    (dict(seconds_since_promotion=10_000, requests=100, errors=100), False, "window_over"),
    (dict(seconds_since_promotion=10, requests=100, errors=0, ttft_p95_s=0.5, baseline_ttft_p95_s=0.3),
     True, "latency"),
    (dict(seconds_since_promotion=10, requests=100, errors=0, negative_feedback=30, positive_feedback=10),
     True, "feedback"),
    # fewer distinct voters than promote.rollback_min_voters (10) decide nothing, however negative
    (dict(seconds_since_promotion=10, requests=100, errors=0, negative_feedback=9, positive_feedback=0),
     False, "healthy"),
    # ten distinct voters suffice, even before min_requests requests were served
    (dict(seconds_since_promotion=10, requests=3, errors=0, negative_feedback=10, positive_feedback=0),
     True, "feedback"),
])
def test_should_rollback(kw, ok, code):
    kw = {"ttft_p95_s": None, "baseline_ttft_p95_s": None, **kw}
    d = should_rollback(cfg=PromoteConfig(rollback_window_seconds=900, rollback_max_error_rate=0.05,
                                          latency_floor_ms=0), **kw)
    assert (d.ok, d.code) == (ok, code), d.reason


def test_policy_imports_no_torch():
    code = "import daemon.policy, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
