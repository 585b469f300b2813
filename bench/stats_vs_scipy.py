"""lorad's hand-written statistics against scipy's, on the same data and seed; writes bench/results/stats_vs_scipy.json.

Two questions from docs/decisions.md, each answered by speed and by agreement:
  * the paired bootstrap of the evaluation gate (``pipelines.evaluate.paired_bootstrap``) against
    ``scipy.stats.bootstrap`` (percentile and BCa), with the promotion p-value taken from scipy's
    ``bootstrap_distribution``;
  * the MMD permutation test of the drift check (``monitors.drift.mmd_test``) against
    ``scipy.stats.permutation_test`` with a vectorized statistic over the same precomputed kernel.

Synthetic data shaped like lorad's (right-skewed per-example losses; embeddings after PCA), seeded. CPU only,
well under a minute:

    .venv/bin/python bench/stats_vs_scipy.py [--out bench/results/stats_vs_scipy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy import stats  # noqa: E402

from bench._common import commit, cpu_name, dirty  # noqa: E402
from monitors.drift import mmd_test  # noqa: E402
from pipelines.evaluate import paired_bootstrap  # noqa: E402

SAMPLES = 1000       # eval.bootstrap_samples default
PERMUTATIONS = 500   # drift.permutations default


def paired_losses(n: int, improvement: float, seed: int) -> tuple[list[float], list[float]]:
    """(candidate, incumbent) per-example losses: gamma-distributed, paired, candidate better by ``improvement``."""
    rng = np.random.default_rng(seed)
    incumbent = rng.gamma(2.0, 1.0, n)
    candidate = incumbent * (1 - improvement) + rng.normal(0, 0.3, n)
    return candidate.tolist(), incumbent.tolist()


def scipy_paired_bootstrap(candidate: list[float], incumbent: list[float], seed: int, method: str) -> dict:
    """What paired_bootstrap returns, computed by scipy.stats.bootstrap."""
    diff = np.asarray(incumbent) - np.asarray(candidate)
    res = stats.bootstrap((diff,), np.mean, n_resamples=SAMPLES, method=method, confidence_level=0.95,
                          vectorized=True, rng=np.random.default_rng(seed))
    not_better = int((res.bootstrap_distribution <= 0).sum())
    return {"mean_diff": float(diff.mean()), "ci_low": float(res.confidence_interval.low),
            "ci_high": float(res.confidence_interval.high), "p_value": (not_better + 1) / (SAMPLES + 1)}


def best_ms(fn, repeat: int) -> float:
    return 1000 * min(timeit.repeat(fn, number=1, repeat=repeat))


def bootstrap_case(n: int, improvement: float) -> dict:
    c, i = paired_losses(n, improvement, seed=7)
    row = {"examples": n, "improvement": improvement, "lorad": paired_bootstrap(c, i, samples=SAMPLES, seed=0)}
    for method in ("percentile", "BCa"):
        row[f"scipy_{method}"] = scipy_paired_bootstrap(c, i, 0, method)
    row["ms"] = {"lorad": best_ms(lambda: paired_bootstrap(c, i, samples=SAMPLES, seed=0), 20)}
    for method in ("percentile", "BCa"):
        row["ms"][f"scipy_{method}"] = best_ms(lambda: scipy_paired_bootstrap(c, i, 0, method), 20)
    # How far scipy's percentile interval is from lorad's at the same seed, against lorad's own seed-to-seed noise.
    cross, noise = [], []
    for seed in range(30):
        ours = paired_bootstrap(c, i, samples=SAMPLES, seed=seed)["ci_low"]
        cross.append(abs(ours - scipy_paired_bootstrap(c, i, seed, "percentile")["ci_low"]))
        noise.append(abs(ours - paired_bootstrap(c, i, samples=SAMPLES, seed=seed + 1000)["ci_low"]))
    row["ci_low_mean_abs_diff"] = {"lorad_vs_scipy_percentile_same_seed": float(np.mean(cross)),
                                   "lorad_vs_lorad_other_seed": float(np.mean(noise))}
    return row


def mmd_case(n: int, dims: int, shift: float) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, dims)), rng.normal(size=(n, dims))
    y[:, 0] += shift
    z = np.concatenate([x, y])
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    med = float(np.median(d2[~np.eye(2 * n, dtype=bool)]))  # the pooled median heuristic, as mmd_test
    k = np.exp(d2 * (-0.5 / med))
    np.fill_diagonal(k, 0.0)

    def mmd2(xi, yi, axis=-1):  # unbiased MMD^2 of index sets, batched over the leading axis
        xi, yi = np.atleast_2d(xi).astype(int), np.atleast_2d(yi).astype(int)
        kxx = k[xi[:, :, None], xi[:, None, :]].sum((1, 2)) / (n * (n - 1))
        kyy = k[yi[:, :, None], yi[:, None, :]].sum((1, 2)) / (n * (n - 1))
        kxy = k[xi[:, :, None], yi[:, None, :]].sum((1, 2)) / (n * n)
        return kxx + kyy - 2 * kxy

    def ours():
        return mmd_test(x, y, permutations=PERMUTATIONS, rng=np.random.default_rng(1))

    def theirs():
        return stats.permutation_test((np.arange(n), np.arange(n, 2 * n)), mmd2, permutation_type="independent",
                                      vectorized=True, n_resamples=PERMUTATIONS, alternative="greater", batch=25,
                                      rng=np.random.default_rng(1))

    a, b = ours(), theirs()
    return {"points_per_side": n, "dims": dims, "shift": shift, "permutations": PERMUTATIONS,
            "lorad": {"mmd2": a["mmd2"], "p": a["p_raw"], "s": best_ms(ours, 3) / 1000},
            "scipy_permutation_test": {"mmd2": float(np.ravel(b.statistic)[0]), "p": float(np.ravel(b.pvalue)[0]),
                                       "s": best_ms(theirs, 2) / 1000}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stats_vs_scipy.json")
    args = ap.parse_args()
    result = {
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "load_average_1m": os.getloadavg()[0]},
        "commit": commit(), "dirty": dirty("pipelines/evaluate.py", "monitors/drift.py", "bench/stats_vs_scipy.py"),
        "paired_bootstrap": [bootstrap_case(200, 0.02), bootstrap_case(200, 0.0), bootstrap_case(1000, 0.01)],
        "mmd_permutation": mmd_case(500, 32, 0.25),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for row in result["paired_bootstrap"]:
        print(f"bootstrap n={row['examples']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()))
    mmd = result["mmd_permutation"]
    print(f"MMD: lorad {mmd['lorad']['s']:.2f} s, scipy {mmd['scipy_permutation_test']['s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
