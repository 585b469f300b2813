"""Pure decisions: should we train, promote, roll back? Plain values in, ``Decision(ok, reason)`` out.

No clock, no model, no I/O: the caller passes ``now`` and the reports, logs the reason, stores it
as an event and exports it as a metric label. Each reason is specific enough to act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from daemon.config import PRIMARY_METRICS, PromoteConfig, ScheduleConfig, parse_category_map


@dataclass(frozen=True)
class Decision:
    """The outcome of a policy question and the one-line reason for it."""

    ok: bool
    reason: str
    code: str = ""  # short machine label for metrics, e.g. "cooldown", "regression"

    def __bool__(self) -> bool:
        return self.ok


TRIGGERS = ("drift", "monthly", "manual")


def should_train(*, trigger: str, drift: Mapping[str, Any] | None, pending: int, last_run_at: float | None,
                 now: float, job_running: bool, cfg: ScheduleConfig) -> Decision:
    """Decide whether a training run starts now.

    Args:
        trigger: why we are asking: "drift" (after a drift check), "monthly" (the cron refresh), "manual".
        drift: the latest DriftReport dict (``{"drift": bool, "status": ..., "explanation": ...}``) or None.
        pending: train-split records not yet trained on.
        last_run_at: when the last training run started (None = never).
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    if job_running:
        return Decision(False, "a training job is already running", "busy")
    if pending <= 0:
        return Decision(False, "no new records to train on", "no_data")
    if trigger == "manual":
        return Decision(True, f"manual request with {pending} new records", "manual")
    if pending < cfg.min_new_records:
        return Decision(False, f"{pending} new records < schedule.min_new_records {cfg.min_new_records}", "too_few")
    if last_run_at is not None and now - last_run_at < cfg.cooldown_minutes * 60:
        wait = cfg.cooldown_minutes * 60 - (now - last_run_at)
        return Decision(False, f"cooldown: last run started {(now - last_run_at) / 60:.0f} min ago, "
                               f"{wait / 60:.0f} min left of schedule.cooldown_minutes {cfg.cooldown_minutes}",
                        "cooldown")
    if trigger == "monthly":
        return Decision(True, f"monthly refresh with {pending} new records", "monthly")
    # trigger == "drift"
    if not cfg.train_on_drift:
        return Decision(False, "drift runs disabled (schedule.train_on_drift = false); waiting for the monthly refresh",
                        "disabled")
    if drift is None:
        return Decision(False, "no drift result yet", "no_drift_result")
    if drift.get("status") == "insufficient_data":
        return Decision(False, f"drift test had insufficient data: {drift.get('explanation', '')}".rstrip(": "),
                        "insufficient_data")
    if not drift.get("drift"):
        return Decision(False, f"no drift (p = {_fmt_p(drift.get('p_value'))}); waiting for the monthly refresh",
                        "no_drift")
    return Decision(True, f"drift detected (p = {_fmt_p(drift.get('p_value'))}): {drift.get('explanation', '')}"
                    .rstrip(": "), "drift")


def should_promote(report: Mapping[str, Any], cfg: PromoteConfig, *, confidence: float) -> Decision:
    """Promote only on evidence: better on the new-data holdout, no regression, latency in bounds.

    Args:
        report: an EvalReport dict with
            ``holdout = {"candidate_loss", "incumbent_loss", "p_value", "n"}`` where ``p_value`` is the
            paired test's probability of seeing this improvement if the candidate were not better;
            ``regression = {set_name: {"candidate_loss", "incumbent_loss", "n"[, "base_loss"]}}``, compared
            with ``base_loss`` when ``promote.regression_reference`` is "base" and the report has it;
            ``latency = {"candidate_ttft_s", "incumbent_ttft_s"[, "incumbent": "base"|"adapter"]}``
            (optional; an incumbent "base" is the bare base model, which no adapter is compared with);
            ``scores = {set_name: {"categories": {category: {metric: cmp}}, "uncategorized": {metric: cmp}}}``
            (optional) with cmp ``{"candidate", "incumbent", "n", "p_value"}``: see ``answer_score_drop``.
        confidence: eval.confidence; the holdout p-value must be <= 1 - confidence.
    """
    holdout = report.get("holdout") or {}
    n = holdout.get("n", 0)
    if not n:
        return Decision(False, "no new-data holdout examples to judge the candidate on", "no_holdout")
    cand, inc = holdout["candidate_loss"], holdout["incumbent_loss"]
    if not _finite(cand):
        return Decision(False, f"candidate holdout loss is {cand}", "invalid")
    gain = (inc - cand) / inc if inc > 0 else 0.0
    if gain <= cfg.min_improvement:
        return Decision(False, f"holdout loss {cand:.4f} vs incumbent {inc:.4f} ({-gain * 100:+.1f} %): "
                               f"not better by more than promote.min_improvement {cfg.min_improvement * 100:.1f} %",
                        "not_better")
    p = holdout.get("p_value", 1.0)
    if p > 1 - confidence:
        return Decision(False, f"holdout loss {cand:.4f} vs {inc:.4f} ({-gain * 100:+.1f} %) is not significant: "
                               f"p = {_fmt_p(p)} > {1 - confidence:.3g} (n = {n})", "not_significant")
    for name, r in sorted((report.get("regression") or {}).items()):
        # promote.regression_reference: the base model's loss when the report has it, else the incumbent's
        use_base = cfg.regression_reference == "base" and r.get("base_loss") is not None
        c, i = r["candidate_loss"], (r["base_loss"] if use_base else r["incumbent_loss"])
        change = (c - i) / i if i > 0 else 0.0
        if not _finite(c) or change > cfg.regression_tolerance:
            return Decision(False, f"regression set {name} loss {change * 100:+.1f} % vs the "
                                   f"{'base model' if use_base else 'incumbent'} > "
                                   f"{cfg.regression_tolerance * 100:.0f} % tolerance", "regression")
    dropped = answer_score_drop(report.get("scores") or {}, cfg, confidence=confidence)
    if dropped is not None:
        return dropped
    lat = report.get("latency") or {}
    ct, it = lat.get("candidate_ttft_s"), lat.get("incumbent_ttft_s")
    slower = ct is not None and it and ct / it > cfg.max_latency_ratio and ct * 1000 > cfg.latency_floor_ms
    # Below promote.latency_floor_ms a slowdown is not worth refusing a better model. And the first adapter
    # is not compared with the bare base at all: serving any adapter adds its LoRA matmuls (on a GPU up to 3x
    # at tens of ms; on 2 CPU cores +28 % at ~600 ms for 400-token prompts), a cost of serving adapters, not
    # of this candidate; it would refuse every first adapter where the base itself misses the floor.
    # From the second adapter on, candidates are timed against the champion adapter.
    if slower and lat.get("incumbent") != "base":
        return Decision(False, f"time to first token {ct * 1000:.0f} ms is {ct / it:.2f}x the incumbent's "
                               f"{it * 1000:.0f} ms > promote.max_latency_ratio {cfg.max_latency_ratio} "
                               f"(and above promote.latency_floor_ms {cfg.latency_floor_ms:g})", "latency")
    note = (f"; first adapter: time to first token {ct * 1000:.0f} ms vs the bare base's {it * 1000:.0f} ms "
            f"(the LoRA path's cost, not gated)" if slower else "")
    return Decision(True, f"holdout loss {cand:.4f} vs {inc:.4f} ({-gain * 100:+.1f} %, p = {_fmt_p(p)}), "
                          f"no regression beyond {cfg.regression_tolerance * 100:.0f} %{note}", "better")


GUARDED_BY_DEFAULT = ("accuracy", "f1")   # ROUGE-L is reported; loss already guards free text


def answer_score_drop(scores: Mapping[str, Any], cfg: PromoteConfig, *, confidence: float) -> Decision | None:
    """A refusal when a guarded answer score dropped significantly on some set and category, else None.

    Each category guards its ``promote.primary_metric`` (accuracy and F1 when unlisted, nothing for "loss");
    records without a category guard accuracy and F1. A drop counts when the incumbent's mean exceeds the
    candidate's by more than ``promote.max_score_drop`` and the paired bootstrap's ``p_value`` (the probability
    that the candidate is not worse) is <= 1 - confidence. The first such drop (by set, then category) is named.
    """
    primary = parse_category_map(cfg.primary_metric, PRIMARY_METRICS)
    for set_name, s in sorted(scores.items()):
        groups = [(c, m, primary.get(c)) for c, m in sorted((s.get("categories") or {}).items())]
        groups.append(("", s.get("uncategorized") or {}, None))
        for category, metrics, chosen in groups:
            guarded = (chosen,) if chosen else GUARDED_BY_DEFAULT
            for metric in guarded:
                cmp = metrics.get(metric)
                if not cmp or not cmp.get("n"):
                    continue
                c, i, p = cmp["candidate"], cmp["incumbent"], cmp.get("p_value", 1.0)
                if _finite(c) and _finite(i) and i - c > cfg.max_score_drop and p <= 1 - confidence:
                    where = f"{set_name}" + (f" category {category}" if category else "")
                    return Decision(False, f"{where} {metric} {c:.3f} vs incumbent {i:.3f} ({(c - i) * 100:+.1f} "
                                           f"points, p = {_fmt_p(p)}, n = {cmp['n']}): a significant drop of more "
                                           f"than promote.max_score_drop {cfg.max_score_drop:g}, whatever the loss "
                                           f"says", "answer_drop")
    return None


def should_rollback(*, seconds_since_promotion: float, requests: int, errors: int,
                    ttft_p95_s: float | None, baseline_ttft_p95_s: float | None, cfg: PromoteConfig,
                    min_requests: int = 20, negative_feedback: int = 0, positive_feedback: int = 0) -> Decision:
    """Watch live signals after a promotion; flip back when they say the new champion hurts.

    Only what the server caused may count: a client can send malformed requests, ask for answers longer
    than the timeout, hang up, or vote from many connections, and none of that may roll a champion back.

    Args:
        requests/errors: served by the new champion since promotion; ``errors`` are server-caused failures
            only (generation errors), never 4xx answers, client hang-ups or timeouts.
        ttft_p95_s / baseline_ttft_p95_s: time to first token, new champion vs before the promotion.
        negative_feedback/positive_feedback: distinct authenticated voters whose latest vote is negative /
            positive; they count from ``cfg.rollback_min_voters`` voters on.
    """
    if seconds_since_promotion > cfg.rollback_window_seconds:
        return Decision(False, "outside the post-promotion watch window", "window_over")
    voters = negative_feedback + positive_feedback
    if voters >= cfg.rollback_min_voters and negative_feedback / voters > 0.5:
        return Decision(True, f"{negative_feedback} of {voters} distinct voters negative "
                              f"(>= promote.rollback_min_voters {cfg.rollback_min_voters})", "feedback")
    if requests < min_requests:
        return Decision(False, f"only {requests} requests since promotion (< {min_requests}); watching", "too_few")
    rate = errors / requests
    if rate > cfg.rollback_max_error_rate:
        return Decision(True, f"server error rate {rate * 100:.1f} % over {requests} requests > "
                              f"promote.rollback_max_error_rate {cfg.rollback_max_error_rate * 100:.1f} %", "errors")
    if (ttft_p95_s is not None and baseline_ttft_p95_s and ttft_p95_s / baseline_ttft_p95_s > cfg.max_latency_ratio
            and ttft_p95_s * 1000 > cfg.latency_floor_ms):
        return Decision(True, f"p95 time to first token {ttft_p95_s * 1000:.0f} ms is "
                              f"{ttft_p95_s / baseline_ttft_p95_s:.2f}x the previous champion's "
                              f"> promote.max_latency_ratio {cfg.max_latency_ratio}", "latency")
    return Decision(False, f"healthy: {rate * 100:.1f} % server errors over {requests} requests", "healthy")


def _finite(x: Any) -> bool:
    try:
        return x == x and abs(float(x)) != float("inf")
    except (TypeError, ValueError):
        return False


def _fmt_p(p: Any) -> str:
    return "?" if p is None else f"{p:.3g}"
