"""bench/continual_answers.py: the benchmark's answer columns and goals from known numbers, and LawBench's
multiple-choice sets as scorable records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import continual_answers as ca  # noqa: E402


def test_lawbench_mcq_rows_become_choice_records():
    from pipelines.scoring import options_of, record_kind

    sets = ca.mcq_sets(cap=5, seed=1)
    assert len(sets) == 6 and all(name.startswith("mcq/") for name in sets)   # 2-8 lost every option
    assert all(len(rows) == 5 for rows in sets.values())
    for rows in sets.values():
        for r in rows:
            prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            assert record_kind(r) == "choice" and answer in options_of(prompt)
    assert ca.mcq_sets(cap=5, seed=1) == sets and ca.mcq_sets(cap=5, seed=2) != sets   # seeded sample


def per_set(metric, score, n=4, by=None):
    return {"metric": metric, "score": score, "n": n, "by_metric": by or {metric: score}}


def test_arm_answers_per_group_domain_and_forgetting():
    first: dict = {}
    groups = {"cls": ["t1", "t2"]}
    month1 = ca.arm_answers({"cls/t1": per_set("accuracy", 0.8), "cls/t2": per_set("accuracy", 0.6),
                             "mcq/x": per_set("accuracy", 0.25)}, groups, first, "cls")
    assert month1["accuracy"]["cls"] == pytest.approx(0.7) and month1["domain_accuracy"] == pytest.approx(0.7)
    assert month1["domain_f1"] is None and month1["answer_forgetting"] is None
    assert month1["mcq_accuracy"] == {"x": 0.25} and first == {"cls": pytest.approx(0.7)}

    groups["ext"] = ["t3"]
    month2 = ca.arm_answers({"cls/t1": per_set("accuracy", 0.5), "cls/t2": per_set("accuracy", 0.3),
                             "ext/t3": per_set("f1", 0.9)}, groups, first, "ext")
    assert month2["answer_forgetting_by_group"] == {"cls": pytest.approx(0.3)}   # 0.7 then, 0.4 now
    assert month2["domain_answer_score"] == pytest.approx((0.4 + 0.9) / 2)
    assert month2["f1"] == {"cls": None, "ext": 0.9} and month2["domain_accuracy"] == pytest.approx(0.4)


def test_answer_goals_from_known_numbers():
    arm = {"domain_accuracy": 0.60, "answer_forgetting": 0.02}
    last = {"lorad": arm, "base": {"domain_accuracy": 0.30, "answer_forgetting": 0.0},
            "retrain": {"domain_accuracy": 0.61, "answer_forgetting": 0.0},
            "naive": {"domain_accuracy": 0.50, "answer_forgetting": 0.10}}
    v = ca.answer_goal_values(last)
    assert v["domain_accuracy_gain_vs_base"][0] == pytest.approx(0.30)
    assert v["domain_accuracy_gap_vs_retrain"][0] == pytest.approx(0.01)
    assert v["answer_forgetting_ratio_vs_naive"][0] == pytest.approx(0.2)
    missing = ca.answer_goal_values({"lorad": arm, "base": last["base"]})
    assert missing["domain_accuracy_gap_vs_retrain"][0] is None and "retrain" in missing["domain_accuracy_gap_vs_retrain"][1]
    older = ca.answer_goal_values({a: {} for a in last})   # a result written before answers were scored
    assert all(value is None for value, _ in older.values())


def test_a_small_sample_takes_its_class_labels_from_a_larger_set(tiny_tokenizer):
    """A 2-record test sample of a classification task repeats no label; given the task's labels (what the
    benchmark passes: the repeats in its train records), its short answers are labels, scored by exact match."""
    from pipelines.evaluate import answer_items

    payloads = [{"messages": [{"role": "user", "content": f"what is the {w}"},
                              {"role": "assistant", "content": w}]} for w in ("court", "judge")]
    new_tokens = {"choice": 1, "label": 4, "extraction": 8, "free": 8}
    alone = answer_items(payloads, tiny_tokenizer, 64, score_kinds={}, new_tokens=new_tokens)
    told = answer_items(payloads, tiny_tokenizer, 64, score_kinds={}, new_tokens=new_tokens, labels={"court", "judge"})
    assert [it["kind"] for it in alone] == ["free", "free"]
    assert [it["kind"] for it in told] == ["label", "label"]
