"""Unit tests of monitors/drift.py on synthetic features where the right answer is known."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from daemon.config import DriftConfig
from monitors.drift import (
    DriftReport,
    Reservoir,
    detect_drift,
    holm_adjust,
    mmd_test,
    permutation_p_value,
)
from monitors.features import FeatureMismatchError, Features

REPO = Path(__file__).resolve().parents[1]
# Fewer permutations than production keeps the replays fast; 200 still resolves p down to 0.005.
CFG = DriftConfig(permutations=200, min_reference=20, min_current=20)
REQUIRED_KEYS = {"drift", "p_value", "alpha", "n_reference", "n_current", "effect", "tests", "explanation"}


def make_features(rng: np.random.Generator, n: int, *, emb_shift: float = 0.0, desc_shift: float = 0.0,
                  loss_shift: float = 0.0, dims: int = 16, categories: np.ndarray | None = None) -> Features:
    emb = rng.standard_normal((n, dims))
    emb[:, 0] += emb_shift
    desc = rng.standard_normal((n, 3))
    desc[:, 1] += desc_shift
    loss = rng.gamma(4.0, 0.5, n) + loss_shift
    return Features(emb, desc, ("length", "share_x", "share_y"), loss, categories,
                    [f"record {i}" for i in range(n)], {"model": "synthetic"})


# ----------------------------------------------------------------------------- building blocks


def test_permutation_p_value_counts_ties_and_never_reaches_zero():
    null = np.array([0.1, 0.2, 0.3, 0.3, 0.5])
    assert permutation_p_value(0.3, null) == pytest.approx((3 + 1) / (5 + 1))  # ties count as ">="
    assert permutation_p_value(9.0, null) == pytest.approx(1 / 6)
    assert permutation_p_value(-1.0, null) == pytest.approx(1.0)


def test_holm_adjust_known_table():
    # sorted p: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> monotone .06
    adj = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]).max() <= 1.0
    # Equal weights of any scale are the plain procedure.
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005], [0.25] * 4), adj)
    # Weighted, by p/w: .01/.5 first with all weight (1) left -> .02; then .02 * .5/.25 = .04;
    # then .02 * .25/.25 = .02, made monotone -> .04.
    np.testing.assert_allclose(holm_adjust([0.01, 0.02, 0.02], [0.5, 0.25, 0.25]), [0.02, 0.04, 0.04])


def test_mmd_effect_is_zero_for_identical_and_near_one_for_disjoint():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 4))
    same = mmd_test(x, rng.standard_normal((150, 4)), permutations=100, rng=rng)
    far = mmd_test(x, rng.standard_normal((150, 4)) + 50.0, permutations=100, rng=rng)
    assert same["effect"] < 0.1 and same["p_raw"] > 0.01
    assert far["effect"] > 0.95 and far["p_raw"] == pytest.approx(1 / 101)


def test_reservoir_is_uniform_capped_and_reproducible():
    counts = np.zeros(100)
    for seed in range(400):
        res = Reservoir(10, rng=seed)
        res.extend(range(100))
        assert len(res) == 10 and res.seen == 100
        counts[res.items] += 1
    # Each item is kept with probability 0.1: 40 expected of 400; chi-square goodness of fit.
    assert stats.chisquare(counts).pvalue > 0.001
    a, b = Reservoir(5, rng=3), Reservoir(5, rng=3)
    a.extend(range(50))
    b.extend(range(50))
    assert a.items == b.items


def test_reservoir_state_round_trip_continues_the_same_stream():
    a = Reservoir(5, rng=7)
    a.extend(range(30))
    b = Reservoir.from_state_dict(json.loads(json.dumps(a.state_dict())))
    a.extend(range(30, 80))
    b.extend(range(30, 80))
    assert a.items == b.items and a.seen == b.seen == 80


# ----------------------------------------------------------------------------- detect_drift


def test_identical_distributions_false_alarm_rate_and_uniform_p_values():
    rng = np.random.default_rng(123)
    alarms, mmd_p = 0, []
    for i in range(120):
        report = detect_drift(make_features(rng, 60), make_features(rng, 40), CFG, rng=i)
        alarms += report.drift
        mmd_p.append(next(t.p_raw for t in report.tests if t.name == "embedding_mmd"))
    # alpha 0.05 over 120 replays: 6 expected; > 14 would be a binomial tail of < 0.3 %.
    assert alarms <= 14
    # Permutation p-values under the null are (discretely) uniform.
    assert 0.4 < np.mean(mmd_p) < 0.6
    assert stats.kstest(mmd_p, "uniform").pvalue > 0.001


def test_shifted_means_are_detected_and_named():
    rng = np.random.default_rng(1)
    report = detect_drift(make_features(rng, 300), make_features(rng, 200, emb_shift=3.0, desc_shift=1.0), CFG, rng=0)
    assert report.drift and report.status == "ok"
    assert "embedding_mmd" in report.drifted_features and "descriptor:share_x" in report.drifted_features
    assert "descriptor:length" not in report.drifted_features
    assert report.p_value <= CFG.alpha and report.effect >= CFG.effect_size_floor
    assert report.explanation.startswith("drift:")
    # The explaining examples are current records, with their previews.
    emb = [e for e in report.examples if e["reason"] == "embedding"]
    assert len(emb) == 3 and all(0 <= e["index"] < 200 and e["preview"].startswith("record") for e in emb)


def test_huge_batches_with_tiny_shift_are_significant_but_below_the_effect_floor():
    rng = np.random.default_rng(2)
    ref, cur = make_features(rng, 4000), make_features(rng, 4000, desc_shift=0.15)
    cfg = replace(CFG, reference_cap=4000)
    report = detect_drift(ref, cur, cfg, rng=0)
    share_x = next(t for t in report.tests if t.name == "descriptor:share_x")
    assert share_x.significant and share_x.effect < cfg.effect_size_floor
    assert not report.drift and "below the floor" in report.explanation
    # The floor is what stops it: without one the same data is called drift.
    assert detect_drift(ref, cur, replace(cfg, effect_size_floor=0.0), rng=0).drift


def test_loss_test_is_one_sided():
    rng = np.random.default_rng(3)
    ref = make_features(rng, 200)
    higher = detect_drift(ref, make_features(rng, 200, loss_shift=1.5), CFG, rng=0)
    lower = detect_drift(ref, make_features(rng, 200, loss_shift=-1.5), CFG, rng=0)
    assert higher.drifted_features == ["loss_increase"]
    assert not lower.drift and next(t for t in lower.tests if t.name == "loss_increase").p_raw > 0.5
    assert any(e["reason"] == "loss" for e in higher.examples)


def test_category_shift_is_detected_and_absent_categories_skip_the_test():
    rng = np.random.default_rng(4)
    ref_cats = rng.choice(["civil", "criminal"], 200)
    cur_cats = rng.choice(["civil", "criminal", "tax"], 200, p=[0.3, 0.3, 0.4])
    report = detect_drift(make_features(rng, 200, categories=ref_cats), make_features(rng, 200, categories=cur_cats),
                          CFG, rng=0)
    assert report.drifted_features == ["categories"]
    assert "tax" in report.explanation
    plain = detect_drift(make_features(rng, 200), make_features(rng, 200), CFG, rng=0)
    assert all(t.family != "categories" for t in plain.tests)


@pytest.mark.parametrize("n_ref,n_cur", [(0, 0), (5, 100), (100, 19), (100, 0)])
def test_small_or_empty_windows_are_insufficient_data(n_ref, n_cur):
    rng = np.random.default_rng(5)
    report = detect_drift(make_features(rng, n_ref), make_features(rng, n_cur), CFG, rng=0)
    d = report.to_dict()
    assert d["status"] == "insufficient_data" and d["drift"] is False and d["tests"] == []
    assert d["p_value"] is None and "insufficient data" in d["explanation"]
    assert "min_" in d["explanation"]


def test_same_seed_same_report_and_json_shape():
    rng = np.random.default_rng(6)
    ref, cur = make_features(rng, 100), make_features(rng, 80, emb_shift=0.5)
    a = detect_drift(ref, cur, CFG, rng=42).to_dict()
    b = detect_drift(ref, cur, CFG, rng=np.random.default_rng(42)).to_dict()
    assert a == b
    assert REQUIRED_KEYS <= set(a) and {"status", "examples", "drifted_features"} <= set(a)
    assert set(a["tests"][0]) >= {"name", "statistic", "p_value", "drifted"}
    json.dumps(a, allow_nan=False)  # strictly valid JSON: no NaN or inf anywhere
    assert isinstance(detect_drift(ref, cur, CFG), DriftReport)


def test_reference_cap_subsamples_reproducibly():
    rng = np.random.default_rng(7)
    ref, cur = make_features(rng, 300), make_features(rng, 50)
    cfg = replace(CFG, reference_cap=100)
    report = detect_drift(ref, cur, cfg, rng=1)
    assert report.n_reference == 100 and "reference_cap" in report.explanation


def test_incomparable_features_are_refused():
    rng = np.random.default_rng(8)
    ref, cur = make_features(rng, 50), make_features(rng, 50)
    cur.meta = {"model": "another-model"}
    with pytest.raises(FeatureMismatchError, match="model differs"):
        detect_drift(ref, cur, CFG)


def test_importing_drift_does_not_import_torch():
    code = ("import sys, monitors.drift; "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_too_few_permutations_for_alpha_are_flagged():
    rng = np.random.default_rng(9)
    # 3 families at alpha 0.05: the embedding test first faces alpha/3, below 1/(50 + 1).
    report = detect_drift(make_features(rng, 60), make_features(rng, 60, emb_shift=5.0), replace(CFG, permutations=50))
    assert "raise drift.permutations to at least 59" in report.explanation
    assert "raise drift.permutations" not in detect_drift(make_features(rng, 60), make_features(rng, 60), CFG).explanation
