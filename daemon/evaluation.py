"""``lorad eval``: score a candidate adapter against the incumbent, decide with the pure policy, record both.

The scoring itself is pipelines/evaluate.py; the decision is daemon/policy.py's ``should_promote``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import registry
from daemon.config import Config
from daemon.store import Store

if TYPE_CHECKING:
    from pipelines.evaluate import ScoreCache


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
    # Each model's answers and regression-set losses, kept from one evaluation to the next: the incumbent's are
    # reused while it stays the champion, and the candidate's once it is promoted.
    folder, identity = Path(cfg.paths.state_dir) / "cache" / "eval-answers", base_identity(cfg)
    paths = {"candidate": folder / f"{candidate}.json", "base": folder / "base.json"}
    if inc_version is not None:
        paths["incumbent"] = folder / f"{inc_version}.json"
    caches = {which: read_score_cache(path, identity) for which, path in paths.items()}
    report = evaluate(model, tokenizer, candidate=Path(cand_row["path"]), incumbent=inc_path, holdout=holdout,
                      regression=regression, max_examples=cfg.eval.max_examples,
                      bootstrap_samples=cfg.eval.bootstrap_samples, latency_prompts=cfg.eval.latency_prompts,
                      max_seq_len=cfg.data.max_seq_len, seed=cfg.train.seed,
                      regression_base=cfg.promote.regression_reference == "base",
                      answers=answer_options(cfg) if cfg.eval.task_metrics else None, caches=caches)
    for which in ("candidate", "base", "incumbent"):   # the incumbent's last: the newest file, kept the longest
        if which in caches:
            write_score_cache(paths[which], identity, caches[which])
    decision = should_promote(report, cfg.promote, confidence=cfg.eval.confidence)
    summary = {k: v for k, v in report.items() if k != "per_example"}
    with store.transaction() as tx:
        tx.execute("UPDATE adapters SET eval_report = ? WHERE version = ?",
                   (json.dumps({**summary, "decision": decision.ok, "reason": decision.reason}), candidate))
        store.add_event("eval", subject=candidate, ok=decision.ok, reason=decision.reason,
                        data={"incumbent": inc_version or "base", "code": decision.code}, db=tx)
    return summarize(report, decision, candidate, inc_version)


def answer_options(cfg: Config) -> dict:
    """What ``pipelines.evaluate.evaluate`` needs to score answers, from the eval section."""
    from daemon.config import SCORE_KINDS, parse_category_map

    e = cfg.eval
    return {"examples": e.answer_examples, "score_kinds": parse_category_map(e.score_kinds, SCORE_KINDS),
            "new_tokens": {"label": e.label_new_tokens, "extraction": e.extraction_new_tokens,
                           "free": e.free_new_tokens}, "free_text_sets": e.free_text_sets}


def base_identity(cfg: Config) -> str:
    """The base model a cached score was made with (its name and revision): another one scores differently."""
    return f"{cfg.model.base_model}@{cfg.model.revision}" if cfg.model.revision else cfg.model.base_model


def read_score_cache(path: Path, base_model: str) -> ScoreCache:
    """A model's cached answers and losses (empty when missing, unreadable or made with another base model)."""
    from pipelines.evaluate import ScoreCache

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ScoreCache()
    if not isinstance(doc, dict) or doc.get("base_model") != base_model:
        return ScoreCache()
    answers, losses = doc.get("answers"), doc.get("losses")
    return ScoreCache(answers=dict(answers) if isinstance(answers, dict) else {},
                      losses=dict(losses) if isinstance(losses, dict) else {})


def write_score_cache(path: Path, base_model: str, cache: ScoreCache, keep: int = 8) -> None:
    """Write a model's cache atomically; keep the ``keep`` newest caches (older incumbents' and candidates')."""
    from pipelines.files import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump({"base_model": base_model, "answers": cache.answers, "losses": cache.losses}, f, ensure_ascii=False)
    for old in sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        old.unlink(missing_ok=True)


def summarize(report: dict, decision, candidate: str, inc_version: str | None) -> dict:
    """`lorad eval --json`: the decision, losses and answer scores per set (and per category), the tests."""
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
        "categories": {"holdout": h.get("categories") or {},
                       **{n: r.get("categories") or {} for n, r in report["regression"].items()}},
        "scores": report.get("scores") or {},
        "seconds": {"loss": report.get("loss_seconds"), "answers": report.get("answer_seconds"),
                    "total": report.get("seconds")},
    }


def format_summary(out: dict) -> str:
    """`lorad eval`'s text: the decision, then per set (and category) loss, perplexity and answer scores with
    their 95 % intervals, candidate vs incumbent."""
    import math

    lines = [f"{'PROMOTE' if out['decision'] == 'promote' else 'REJECT'}: {out['reason']}",
             f"{'set / category':<28} {'metric':<10} {'candidate':>10} {'incumbent':>10}  {'95 % CI of the change':<22} n"]

    def row(name: str, metric: str, c: float, i: float, ci: list | None = None, n: int | None = None) -> None:
        # negating an interval of zeros gives -0.0, which would print as "-0.000": add 0.0 to drop the sign
        band = (f"[{ci[0] + 0.0:+.3f}, {ci[1] + 0.0:+.3f}]" if ci and all(math.isfinite(x) for x in ci) else "")
        lines.append(f"{name:<28} {metric:<10} {c:>10.4f} {i:>10.4f}  {band:<22} {n if n is not None else ''}")

    t = out["tests"]
    m = out["metrics"]
    ci = t["holdout"]["ci95"]   # of the loss gain (incumbent - candidate): shown as the candidate's change
    row("holdout", "loss", m["candidate"]["holdout_loss"], m["incumbent"]["holdout_loss"], [-ci[1], -ci[0]],
        t["holdout"]["n"])
    row("holdout", "perplexity", m["candidate"]["holdout_perplexity"], m["incumbent"]["holdout_perplexity"])
    for name, r in t["regression"].items():
        row(name, "loss", r["candidate_loss"], r["incumbent_loss"], None, r["n"])
    for set_name, cats in out["categories"].items():
        for cat, r in cats.items():
            row(f"{set_name} / {cat}", "loss", r["candidate_loss"], r["incumbent_loss"], None, r["n"])
    for set_name, sc in out["scores"].items():
        groups = [(set_name, sc["metrics"])] + [(f"{set_name} / {c}", ms) for c, ms in sc["categories"].items()]
        for name, ms in groups:
            for metric, cmp in ms.items():
                drop = cmp["ci95"]
                row(name, metric, cmp["candidate"], cmp["incumbent"], [-drop[1], -drop[0]], cmp["n"])
    secs = out.get("seconds") or {}
    if secs.get("total") is not None:
        lines.append(f"time: {secs['total']:.1f} s (losses {secs.get('loss') or 0:.1f} s, "
                     f"answers {secs.get('answers') or 0:.1f} s)")
    return "\n".join(lines)
