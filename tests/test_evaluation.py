"""daemon/evaluation.py: what `lorad eval` prints and returns, and the incumbent's answer cache."""

from __future__ import annotations

import json

from daemon.evaluation import format_summary, read_score_cache, summarize, write_score_cache
from daemon.policy import Decision


def cmp(c, i, n=10):
    return {"candidate": c, "incumbent": i, "n": n, "drop": i - c, "ci95": [i - c - 0.1, i - c + 0.1],
            "p_value": 0.01}


REPORT = {
    "holdout": {"candidate_loss": 1.5, "incumbent_loss": 2.0, "n": 10, "p_value": 0.001, "mean_diff": 0.5,
                "ci95": [0.3, 0.7], "candidate_perplexity": 4.48, "incumbent_perplexity": 7.39,
                "categories": {"mcq": {"candidate_loss": 1.4, "incumbent_loss": 2.1, "n": 6}}},
    "regression": {"chat": {"candidate_loss": 3.0, "incumbent_loss": 3.1, "n": 20, "categories": {}}},
    "scores": {"holdout": {"metrics": {"accuracy": cmp(0.2, 0.9)}, "categories": {"mcq": {"accuracy": cmp(0.2, 0.9)}},
                           "uncategorized": {}, "kinds": {"choice": 10}}},
    "per_example": {"candidate": [1.5], "incumbent": [2.0]},
    "loss_seconds": 3.0, "answer_seconds": 1.5, "seconds": 4.6,
}


def test_lorad_eval_reports_every_set_category_and_metric_with_intervals():
    out = summarize(REPORT, Decision(False, "holdout category mcq accuracy 0.200 vs incumbent 0.900", "answer_drop"),
                    "v2", "v1")
    assert out["decision"] == "reject" and out["code"] == "answer_drop"
    assert out["scores"]["holdout"]["categories"]["mcq"]["accuracy"]["incumbent"] == 0.9
    assert out["categories"]["holdout"]["mcq"]["n"] == 6
    assert out["seconds"] == {"loss": 3.0, "answers": 1.5, "total": 4.6}
    json.dumps(out)                                           # --json carries it all
    text = format_summary(out)
    lines = text.splitlines()
    assert lines[0].startswith("REJECT: holdout category mcq accuracy")
    acc = [ln for ln in lines if ln.startswith("holdout / mcq") and "accuracy" in ln][0]
    # candidate, incumbent, the 95 % interval of the change (candidate - incumbent), n
    assert acc.split()[3:6] == ["accuracy", "0.2000", "0.9000"] and "[-0.800, -0.600]" in acc and acc.endswith("10")
    loss = [ln for ln in lines if ln.startswith("holdout ") and " loss " in ln][0]
    assert "[-0.700, -0.300]" in loss                          # the loss fell by 0.3 to 0.7
    assert "time: 4.6 s (losses 3.0 s, answers 1.5 s)" in text


def test_an_interval_of_zeros_prints_without_a_minus_sign():
    same = {"candidate": 0.0, "incumbent": 0.0, "n": 11, "drop": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0}
    report = {**REPORT, "scores": {"holdout": {"metrics": {"accuracy": same}, "categories": {},
                                               "uncategorized": {}, "kinds": {"choice": 11}}}}
    text = format_summary(summarize(report, Decision(True, "ok", "ok"), "v2", "v1"))
    acc = [ln for ln in text.splitlines() if ln.startswith("holdout ") and "accuracy" in ln][0]
    assert "[+0.000, +0.000]" in acc, acc


def test_score_cache_round_trip_and_base_model_check(tmp_path):
    from pipelines.evaluate import ScoreCache

    path = tmp_path / "eval-answers" / "v1.json"
    write_score_cache(path, "model-a", ScoreCache(answers={"k": "B"}, losses={"s": [1.5, 2.0]}))
    assert read_score_cache(path, "model-a") == ScoreCache(answers={"k": "B"}, losses={"s": [1.5, 2.0]})
    assert read_score_cache(path, "model-b") == ScoreCache()      # another base model scores differently
    assert read_score_cache(tmp_path / "missing.json", "model-a") == ScoreCache()
    path.write_text('{"base_model": "model-a", "answers": {"k": "B"}}', encoding="utf-8")   # written before losses
    assert read_score_cache(path, "model-a") == ScoreCache(answers={"k": "B"})
    path.write_text('["not", "a", "cache"]', encoding="utf-8")
    assert read_score_cache(path, "model-a") == ScoreCache()
    for i in range(10):
        write_score_cache(tmp_path / "eval-answers" / f"v{i + 2}.json", "model-a", ScoreCache())
    assert len(list((tmp_path / "eval-answers").glob("*.json"))) == 8   # the newest eight models' caches
