"""``lorad eval``: score a candidate adapter against the incumbent, decide with the pure policy, record both.

The scoring itself is pipelines/evaluate.py; the decision is daemon/policy.py's ``should_promote``.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon import registry
from daemon.config import Config
from daemon.store import Store


def read_files(paths: list[str]) -> tuple[list[dict], list[str]]:
    """The payloads of several data files (``pipelines.ingest.read_payloads``); returns (payloads, problems)."""
    from pipelines.ingest import FileRejected, read_payloads

    payloads, problems = [], []
    for path in paths:
        try:
            ok, rejected = read_payloads(path)
        except (FileRejected, FileNotFoundError) as e:
            problems.append(f"{path}: {e}")
            continue
        payloads += ok
        problems += [f"{path}: {r}" for r in rejected]
    return payloads, problems


def adapter_path(store: Store, cfg: Config, which: str | None) -> tuple[str | None, Path | None]:
    """'base' / None -> (None, None); 'champion' -> the champion (or base); a version -> verified path."""
    if which in (None, "base"):
        return None, None
    if which == "champion":
        which = registry.champion(store)
        if which is None:
            return None, None
    row = registry.verify_adapter(store, which, base_model=cfg.model.base_model)
    return which, Path(row["path"])


def evaluate_candidate(store: Store, cfg: Config, candidate: str, incumbent: str = "champion", *,
                       holdout_file: str | None = None) -> dict:
    """Score candidate vs incumbent, decide with the pure policy, record the report and the decision."""
    from daemon.policy import should_promote
    from daemon.runs import snapshot_payloads
    from pipelines.evaluate import EvalError, evaluate, load_regression_set
    from pipelines.models import load_for

    cand_row = registry.verify_adapter(store, candidate, base_model=cfg.model.base_model)
    inc_version, inc_path = adapter_path(store, cfg, incumbent)
    if inc_version == candidate:
        raise EvalError(f"candidate {candidate} is the incumbent; compare it with another version or 'base'")
    if holdout_file:
        holdout, _ = read_files([holdout_file])
    elif cand_row["snapshot_id"]:
        holdout = [p for _, _, p in snapshot_payloads(store, cand_row["snapshot_id"], roles=("holdout",))]
    else:
        raise EvalError(f"{candidate} has no data snapshot (trained with `lorad train --data`); pass --holdout FILE")
    regression = {name: load_regression_set(name) for name in cfg.eval.regression_sets}
    model, tokenizer, _, _ = load_for("eval", cfg)
    report = evaluate(model, tokenizer, candidate=Path(cand_row["path"]), incumbent=inc_path, holdout=holdout,
                      regression=regression, max_examples=cfg.eval.max_examples,
                      bootstrap_samples=cfg.eval.bootstrap_samples, latency_prompts=cfg.eval.latency_prompts,
                      max_seq_len=cfg.data.max_seq_len, seed=cfg.train.seed,
                      regression_base=cfg.promote.regression_reference == "base")
    decision = should_promote(report, cfg.promote, confidence=cfg.eval.confidence)
    summary = {k: v for k, v in report.items() if k != "per_example"}
    with store.transaction() as tx:
        tx.execute("UPDATE adapters SET eval_report = ? WHERE version = ?",
                   (json.dumps({**summary, "decision": decision.ok, "reason": decision.reason}), candidate))
        store.add_event("eval", subject=candidate, ok=decision.ok, reason=decision.reason,
                        data={"incumbent": inc_version or "base", "code": decision.code}, db=tx)
    h = report["holdout"]
    return {
        "decision": "promote" if decision.ok else "reject", "reason": decision.reason, "code": decision.code,
        "candidate": candidate, "incumbent": inc_version or "base",
        "metrics": {
            "candidate": {"holdout_loss": h["candidate_loss"], "holdout_perplexity": h["candidate_perplexity"],
                          **{f"{n}_loss": r["candidate_loss"] for n, r in report["regression"].items()},
                          "ttft_s": (report.get("latency") or {}).get("candidate_ttft_s")},
            "incumbent": {"holdout_loss": h["incumbent_loss"], "holdout_perplexity": h["incumbent_perplexity"],
                          **{f"{n}_loss": r["incumbent_loss"] for n, r in report["regression"].items()},
                          "ttft_s": (report.get("latency") or {}).get("incumbent_ttft_s")},
        },
        "tests": {"holdout": {k: h[k] for k in ("n", "p_value", "mean_diff", "ci95")},
                  "regression": report["regression"], "latency": report.get("latency")},
    }
