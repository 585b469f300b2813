"""Has the new data drifted from what the champion learned? A statistically honest answer.

Pure: numpy and scipy only (no torch, even indirectly; both imported inside the functions), deterministic
given a seed.

Windows. The reference window is the records the champion was trained on, capped by a
uniform reservoir (``Reservoir``, ``drift.reference_cap``); the current window is the records
that arrived since. Below ``drift.min_reference`` / ``drift.min_current`` records the answer
is "insufficient data" (drift False, status "insufficient_data"), never a guess.

Test families, each giving one or more (p-value, effect) pairs:

  embedding    MMD two-sample test on the base-model embeddings, projected onto their top
               ``drift.embedding_dims`` principal components. Gaussian kernel, bandwidth by the
               median heuristic. Null distribution by ``drift.permutations`` label permutations,
               p = (b + 1) / (B + 1) with b the permuted statistics >= the observed one.
               The PCA and the bandwidth are fitted on the POOLED windows without their labels,
               so they are the same function of the data under every permutation and the
               permutation test stays exact (a PCA fitted on the reference alone would project the
               two windows differently and break exchangeability).
  descriptors  two-sample Kolmogorov-Smirnov test per descriptor (lengths, script shares, ...).
               Ties make it conservative, never liberal.
  loss         one-sided Mann-Whitney U: is the current response loss under the champion
               HIGHER than the reference's? (Lower loss is not drift the champion needs to learn.)
               The reference losses must come from records the champion did NOT train on (e.g.
               its holdout), else the generalisation gap alone reads as drift.
  categories   chi-square test of homogeneity on the records' categories, when they have any;
               categories expected fewer than 5 times in the smaller window are pooled.

Combination. All p-values go through ONE weighted Holm step-down procedure at family-wise
level ``drift.alpha``: every family present gets weight 1/F, split equally among its tests.
That controls the probability of ANY false "drifted" test at alpha, keeps a single
embedding test from being swamped by many descriptors, and the report's ``p_value`` (the
smallest adjusted p) is a valid p-value for "no drift at all".

Effect-size floor. With thousands of records every tiny difference becomes significant, so a
test only counts as drifted when its adjusted p <= alpha AND its effect >= ``drift.effect_size_floor``.
Every effect is on a 0..1 scale and, by construction, roughly equals the share of the current
window that comes from a completely different distribution (each is linear in a mixture share):

  embedding    normalised MMD = sqrt(MMD^2_u / (mean k(x,x') + mean k(y,y'))), computed with the
               Gaussian bandwidth at the reference's own scale (median reference-reference
               distance; the test itself uses the pooled median): 0 for identical distributions,
               1 when current records lie far outside the reference's typical spread.
  descriptors  KS statistic D = max |F_ref - F_cur| (the largest gap between the two CDFs).
  loss         rank-biserial correlation 2 * P(loss_cur > loss_ref) - 1, clipped at 0.
  categories   total-variation distance between the category shares.

So the default floor 0.1 means "about a tenth of the batch is new": a real, large-sample
difference smaller than that is reported (significant, effect, explanation) but not called drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from monitors.features import Features, check_comparable

if TYPE_CHECKING:  # the config module is stdlib-only, but the type is all we need here
    import numpy as np

    from daemon.config import DriftConfig

# The MMD kernel matrix is (n + m)^2: subsample larger windows (uniformly, seeded) to this
# many records per side; power at that size is already high for any effect above the floor.
MMD_MAX_PER_SIDE = 2000
# Permutations are evaluated this many at a time (memory: N x chunk).
_PERMUTATION_CHUNK = 128
# Categories expected fewer times than this in the smaller window are pooled (chi-square validity).
_MIN_EXPECTED = 5.0


# ----------------------------------------------------------------------------- results


@dataclass
class DriftTestResult:
    """One two-sample test of the drift report."""

    name: str            # e.g. "embedding_mmd", "descriptor:share_cjk", "loss_increase", "categories"
    family: str          # embedding | descriptors | loss | categories
    statistic: float     # MMD^2_u, KS D, Mann-Whitney U or chi-square
    p_raw: float         # the test's own p-value
    p_value: float       # adjusted for multiplicity (weighted Holm across everything)
    effect: float        # 0..1, see the module docstring
    significant: bool = False  # p_value <= alpha
    drifted: bool = False      # significant and effect >= floor
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "statistic": _num(self.statistic),
                "p_value": _num(self.p_value), "p_raw": _num(self.p_raw), "effect": _num(self.effect),
                "significant": self.significant, "drifted": self.drifted,
                "detail": {k: _num(v) if isinstance(v, float) else v for k, v in self.detail.items()}}


@dataclass
class DriftReport:
    """The answer of one drift check, with everything needed to explain it."""

    drift: bool
    p_value: float | None      # smallest multiplicity-adjusted p-value; None when no test ran
    alpha: float
    n_reference: int           # records tested (after the reference cap)
    n_current: int
    effect: float | None       # largest effect among significant tests (else among all tests)
    tests: list[DriftTestResult]
    explanation: str
    status: str = "ok"         # "ok" | "insufficient_data"
    effect_floor: float = 0.0
    drifted_features: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "drift": bool(self.drift), "p_value": _num(self.p_value), "alpha": float(self.alpha),
            "n_reference": int(self.n_reference), "n_current": int(self.n_current), "effect": _num(self.effect),
            "tests": [t.to_dict() for t in self.tests], "explanation": self.explanation,
            "status": self.status, "effect_floor": float(self.effect_floor),
            "drifted_features": list(self.drifted_features), "examples": list(self.examples),
        }


def _num(x: Any) -> float | None:
    """JSON-safe float: NaN/inf/None -> None."""
    import numpy as np

    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


# ----------------------------------------------------------------------------- building blocks


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A Generator from a Generator, a seed, or None (= seed 0: the same inputs give the same answer)."""
    import numpy as np

    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """p = (b + 1) / (B + 1), b = permuted statistics >= observed (the observed labelling counts once).

    Never 0, and exactly valid for a statistic whose large values mean "different".
    """
    import numpy as np

    null = np.asarray(null, dtype=np.float64)
    # A relative tolerance so float noise in recomputing an identical statistic counts as a tie.
    tol = 1e-12 * max(1.0, abs(observed))
    b = int(np.count_nonzero(null >= observed - tol))
    return (b + 1) / (null.size + 1)


def holm_adjust(p_values: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """Holm step-down adjusted p-values (weighted Holm 1979 when ``weights`` are given).

    Rejecting every hypothesis with adjusted p <= alpha controls the family-wise error rate at
    alpha. Hypotheses are ordered by p / w; the i-th gets p * (sum of the weights not yet
    rejected) / w, made monotone. Equal weights give the textbook Holm procedure.
    """
    import numpy as np

    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != p.shape or np.any(w <= 0):
        raise ValueError("weights must be positive, one per p-value")
    order = np.argsort(p / w, kind="stable")
    remaining = np.cumsum(w[order][::-1])[::-1]  # weight of the hypotheses not yet rejected
    adj_sorted = np.minimum(1.0, np.maximum.accumulate(p[order] * remaining / w[order]))
    out = np.empty_like(p)
    out[order] = adj_sorted
    return out


def _pca_scores(fit: np.ndarray, apply: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Project ``apply`` onto the top-k principal axes of ``fit`` (centred on fit's mean)."""
    import numpy as np

    mean = fit.mean(axis=0)
    a = fit - mean
    k = max(1, min(k, a.shape[0] - 1, a.shape[1]))
    if min(a.shape) <= 1500:
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        basis = vt[:k].T
    else:  # randomized range finder (Halko et al.) with power iterations: O(N d k)
        q = a @ rng.standard_normal((a.shape[1], k + 10))
        for _ in range(4):
            q, _ = np.linalg.qr(q)
            q = a @ (a.T @ q)
        q, _ = np.linalg.qr(q)
        _, _, vt = np.linalg.svd(q.T @ a, full_matrices=False)
        basis = vt[:k].T
    return (apply - mean) @ basis


def _median_off_diagonal(d2: np.ndarray) -> float:
    """Median of the off-diagonal entries of a square distance matrix (positive fallback)."""
    import numpy as np

    n = d2.shape[0]
    off = np.delete(d2.ravel(), np.arange(n) * (n + 1))
    med = float(np.median(off)) if off.size else 0.0
    if med <= 0.0:  # mostly duplicate points: fall back to the mean positive distance
        pos = off[off > 0]
        med = float(pos.mean()) if pos.size else 1.0
    return med


def _squared_distances(z: np.ndarray) -> np.ndarray:
    import numpy as np

    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    return np.maximum(d2, 0.0, out=d2)


def _mmd2_for_labels(k0: np.ndarray, row_sums: np.ndarray, total: float, a: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of ``a`` (N x B indicators of the reference group)."""
    import numpy as np

    ka = k0 @ a
    sxx = np.einsum("ij,ij->j", a, ka)
    sxy = row_sums @ a - sxx
    syy = total - 2.0 * sxy - sxx
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)


def mmd_test(x: np.ndarray, y: np.ndarray, *, permutations: int, rng: np.random.Generator) -> dict:
    """Permutation MMD test of x (reference) vs y (current), both already projected.

    Returns a dict with mmd2 (unbiased), p_raw, effect (normalised MMD), bandwidth and the
    witness score of each current point (how much more it resembles the current window than
    the reference; the largest explain the drift).
    """
    import numpy as np

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 points per side, got {n} and {m}")
    d2 = _squared_distances(np.concatenate([x, y]).astype(np.float64))
    # Test kernel: median heuristic on the POOLED sample, label-blind, so permutations stay exact.
    med = _median_off_diagonal(d2)
    # Effect kernel: bandwidth at the reference's own scale, so "1" means current records lie
    # far outside the reference's typical spread. It is not used for the p-value.
    med_ref = _median_off_diagonal(d2[:n, :n])
    k0 = np.exp(d2 * (-0.5 / med))
    np.fill_diagonal(k0, 0.0)
    row_sums = k0.sum(axis=1)
    total = float(row_sums.sum())
    labels = np.zeros((n + m, 1))
    labels[:n] = 1.0
    observed = float(_mmd2_for_labels(k0, row_sums, total, labels, n, m)[0])
    null = np.empty(permutations)
    base = np.tile(np.arange(n + m), (min(_PERMUTATION_CHUNK, permutations), 1))
    for start in range(0, permutations, _PERMUTATION_CHUNK):
        b = min(_PERMUTATION_CHUNK, permutations - start)
        chosen = rng.permuted(base[:b], axis=1)[:, :n]
        a = np.zeros((n + m, b))
        a[chosen, np.arange(b)[:, None]] = 1.0
        null[start:start + b] = _mmd2_for_labels(k0, row_sums, total, a, n, m)
    ke = np.exp(d2 * (-0.5 / med_ref), out=d2)
    np.fill_diagonal(ke, 0.0)
    sxx = ke[:n, :n].sum() / (n * (n - 1))
    syy = ke[n:, n:].sum() / (m * (m - 1))
    sxy = ke[:n, n:].sum() / (n * m)
    mmd2_ref_scale = sxx + syy - 2.0 * sxy
    effect = float(np.sqrt(max(mmd2_ref_scale, 0.0) / (sxx + syy))) if sxx + syy > 0 else 0.0
    witness = ke[n:, n:].sum(axis=1) / (m - 1) - ke[n:, :n].sum(axis=1) / n
    return {"mmd2": observed, "p_raw": permutation_p_value(observed, null), "effect": min(effect, 1.0),
            "bandwidth": float(np.sqrt(med)), "effect_bandwidth": float(np.sqrt(med_ref)), "witness": witness}


def _ks(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    res = stats.ks_2samp(ref, cur, alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue)


def _loss_test(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float, float]:
    """One-sided Mann-Whitney U (current higher): (U, p, rank-biserial effect clipped at 0)."""
    from scipy import stats

    res = stats.mannwhitneyu(cur, ref, alternative="greater", method="asymptotic")
    auc = float(res.statistic) / (len(cur) * len(ref))
    return float(res.statistic), float(res.pvalue), max(0.0, 2.0 * auc - 1.0)


def _category_test(ref: np.ndarray, cur: np.ndarray) -> dict | None:
    """Chi-square homogeneity test on category counts; None when fewer than 2 categories remain."""
    import numpy as np
    from scipy import stats

    pooled, counts = np.unique(np.concatenate([ref, cur]), return_counts=True)
    small = min(len(ref), len(cur))
    total = len(ref) + len(cur)
    # Label-blind pooling (decided on pooled counts only) of categories too rare for chi-square.
    rare = {c for c, k in zip(pooled, counts) if k * small / total < _MIN_EXPECTED}
    keep = [c for c in pooled if c not in rare]
    cols = keep + (["(other)"] if rare else [])
    if len(cols) < 2:
        return None

    def tally(arr: np.ndarray) -> np.ndarray:
        mapped = np.where(np.isin(arr, list(rare)), "(other)", arr) if rare else arr
        return np.array([np.count_nonzero(mapped == c) for c in cols], dtype=np.float64)

    table = np.vstack([tally(ref), tally(cur)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return None
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    share_ref, share_cur = table[0] / table[0].sum(), table[1] / table[1].sum()
    tv = 0.5 * float(np.abs(share_ref - share_cur).sum())
    moved = np.argsort(-(share_cur - share_ref))[:3]
    grown = {str(cols[i]): [round(float(share_ref[i]), 3), round(float(share_cur[i]), 3)]
             for i in moved if share_cur[i] > share_ref[i]}
    return {"chi2": float(chi2), "p": float(p), "effect": tv, "grown": grown, "n_categories": len(cols)}


# ----------------------------------------------------------------------------- windows


class Reservoir:
    """A uniform random sample of at most ``capacity`` items from a stream (Algorithm R).

    After ``seen`` items every one of them is in the sample with probability capacity/seen,
    independently of arrival order. Seeded: the same stream and seed give the same sample.
    """

    def __init__(self, capacity: int, rng: np.random.Generator | int | None = None):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.rng = as_generator(rng)
        self.items: list[Any] = []
        self.seen = 0

    def add(self, item: Any) -> bool:
        """Offer one item; True when it entered the sample."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return True
        j = int(self.rng.integers(0, self.seen))
        if j < self.capacity:
            self.items[j] = item
            return True
        return False

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.add(item)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        """Everything needed to continue the stream after a restart (JSON-able if the items are)."""
        return {"capacity": self.capacity, "seen": self.seen, "items": list(self.items),
                "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Reservoir":
        import numpy as np

        res = cls(state["capacity"])
        bitgen = getattr(np.random, state["rng"]["bit_generator"])()
        bitgen.state = state["rng"]
        res.rng = np.random.Generator(bitgen)
        res.items, res.seen = list(state["items"]), int(state["seen"])
        return res


# ----------------------------------------------------------------------------- the test


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """All of range(n), or a uniform sorted sample of ``cap`` of them."""
    import numpy as np

    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def _insufficient(n_ref: int, n_cur: int, cfg: "DriftConfig") -> DriftReport:
    missing = []
    if n_ref < cfg.min_reference:
        missing.append(f"{n_ref} reference records, need at least {cfg.min_reference} (drift.min_reference)")
    if n_cur < cfg.min_current:
        missing.append(f"{n_cur} current records, need at least {cfg.min_current} (drift.min_current)")
    return DriftReport(
        drift=False, p_value=None, alpha=cfg.alpha, n_reference=n_ref, n_current=n_cur, effect=None, tests=[],
        explanation="insufficient data: " + "; ".join(missing) + ". No test was run; drift is not assumed.",
        status="insufficient_data", effect_floor=cfg.effect_size_floor)


def detect_drift(reference: Features, current: Features, cfg: "DriftConfig", *,
                 rng: np.random.Generator | int | None = None, n_examples: int = 3,
                 pca_fit: str = "pooled") -> DriftReport:
    """Test whether ``current`` differs from ``reference``; see the module docstring for the method.

    Args:
        reference: features of the records the champion learned (capped to cfg.reference_cap here).
        current: features of the records that arrived since.
        cfg: the drift config section (alpha, permutations, effect_size_floor, min sizes, caps, dims).
        rng: Generator or seed for subsampling, PCA and permutations; None = seed 0.
        n_examples: current records listed per explaining feature (embedding, loss).
        pca_fit: "pooled" (label-blind, exact; the default) or "reference" (for comparison only).

    Raises:
        FeatureMismatchError: the two windows were featurized differently.
    """
    import numpy as np

    if pca_fit not in ("pooled", "reference"):
        raise ValueError(f"pca_fit must be 'pooled' or 'reference', got {pca_fit!r}")
    gen = as_generator(rng)
    n_ref_all, n_cur = len(reference), len(current)
    if n_ref_all < cfg.min_reference or n_cur < cfg.min_current:
        return _insufficient(n_ref_all, n_cur, cfg)
    check_comparable(reference, current)
    notes = []
    if n_ref_all > cfg.reference_cap:
        reference = reference.take(_subsample(n_ref_all, cfg.reference_cap, gen))
        notes.append(f"reference subsampled to {cfg.reference_cap} of {n_ref_all} (drift.reference_cap)")
    n_ref = len(reference)

    raw: list[DriftTestResult] = []
    witness: tuple[np.ndarray, np.ndarray] | None = None  # (current indices, scores)

    # -- embedding: MMD on PCA scores
    if reference.embeddings.shape[1] > 0:
        ri, ci = _subsample(n_ref, MMD_MAX_PER_SIDE, gen), _subsample(n_cur, MMD_MAX_PER_SIDE, gen)
        x = reference.embeddings[ri].astype(np.float64)
        y = current.embeddings[ci].astype(np.float64)
        pooled = np.concatenate([x, y])
        if np.ptp(pooled, axis=0).max() > 0:
            scores = _pca_scores(pooled if pca_fit == "pooled" else x, pooled, cfg.embedding_dims, gen)
            res = mmd_test(scores[:len(x)], scores[len(x):], permutations=cfg.permutations, rng=gen)
            detail = {"bandwidth": res["bandwidth"], "effect_bandwidth": res["effect_bandwidth"],
                      "pca_dims": int(scores.shape[1]), "permutations": cfg.permutations}
            if len(ri) < n_ref or len(ci) < n_cur:
                detail["subsampled_to"] = [len(ri), len(ci)]
            raw.append(DriftTestResult("embedding_mmd", "embedding", res["mmd2"], res["p_raw"], np.nan, res["effect"],
                                       detail=detail))
            witness = (ci, res["witness"])

    # -- descriptors: KS per column (columns constant over both windows carry no information)
    for j, name in enumerate(reference.descriptor_names):
        r, c = reference.descriptors[:, j], current.descriptors[:, j]
        r, c = r[np.isfinite(r)], c[np.isfinite(c)]
        if len(r) < 2 or len(c) < 2 or np.ptp(np.concatenate([r, c])) == 0:
            continue
        d, p = _ks(r, c)
        raw.append(DriftTestResult(f"descriptor:{name}", "descriptors", d, p, np.nan, d, detail={
            "reference_median": float(np.median(r)), "current_median": float(np.median(c)),
            "reference_mean": float(r.mean()), "current_mean": float(c.mean())}))

    # -- loss under the champion: one-sided, current higher
    lr, lc = reference.loss[np.isfinite(reference.loss)], current.loss[np.isfinite(current.loss)]
    loss_ok = len(lr) >= 2 and len(lc) >= 2 and np.ptp(np.concatenate([lr, lc])) > 0
    if loss_ok:
        u, p, eff = _loss_test(lr, lc)
        raw.append(DriftTestResult("loss_increase", "loss", u, p, np.nan, eff, detail={
            "reference_median": float(np.median(lr)), "current_median": float(np.median(lc))}))

    # -- categories
    if reference.categories is not None or current.categories is not None:
        rc = reference.categories if reference.categories is not None else np.full(n_ref, "")
        cc = current.categories if current.categories is not None else np.full(n_cur, "")
        cat = _category_test(rc, cc)
        if cat is not None:
            raw.append(DriftTestResult("categories", "categories", cat["chi2"], cat["p"], np.nan, cat["effect"],
                                       detail={"grown": cat["grown"], "n_categories": cat["n_categories"]}))

    if not raw:
        return DriftReport(False, None, cfg.alpha, n_ref, n_cur, None, [],
                           "no test could run: every feature is constant over both windows", "ok",
                           cfg.effect_size_floor)

    # -- one weighted Holm procedure over everything: each family 1/F, split within the family
    families = sorted({t.family for t in raw})
    size = {f: sum(t.family == f for t in raw) for f in families}
    weights = np.array([1.0 / (len(families) * size[t.family]) for t in raw])
    adjusted = holm_adjust([t.p_raw for t in raw], weights)
    for t, adj in zip(raw, adjusted):
        t.p_value = float(adj)
        t.significant = bool(adj <= cfg.alpha)
        t.drifted = bool(t.significant and t.effect >= cfg.effect_size_floor)

    significant = [t for t in raw if t.significant]
    drifted = sorted([t for t in raw if t.drifted], key=lambda t: -t.effect)
    effect = max(t.effect for t in (significant or raw))
    report = DriftReport(
        drift=bool(drifted), p_value=float(adjusted.min()), alpha=cfg.alpha, n_reference=n_ref, n_current=n_cur,
        effect=float(effect), tests=raw, explanation="", status="ok", effect_floor=cfg.effect_size_floor,
        drifted_features=[t.name for t in drifted],
        examples=_examples(current, witness, lr if loss_ok else None, n_examples),
    )
    report.explanation = _explain(report, significant, drifted, notes, cfg)
    # The smallest permutation p is 1/(B+1), and the embedding test is first tried at alpha/F.
    needed = int(np.ceil(len(families) / cfg.alpha))
    if witness is not None and cfg.permutations + 1 < needed:
        report.explanation += (f" Note: with {cfg.permutations} permutations the embedding test alone can never "
                               f"reach alpha {cfg.alpha}; raise drift.permutations to at least {needed - 1}.")
    return report


def _examples(current: Features, witness: tuple[np.ndarray, np.ndarray] | None, ref_loss: np.ndarray | None,
              k: int) -> list[dict]:
    """Current records that explain a drift: unlike the reference in embedding space, or surprising to the champion."""
    import numpy as np

    out = []
    if witness is not None and k > 0:
        idx, score = witness
        for j in np.argsort(-score, kind="stable")[:k]:
            i = int(idx[j])
            out.append({"index": i, "reason": "embedding", "score": float(score[j]), "preview": current.previews[i]})
    if ref_loss is not None and k > 0:
        finite = np.where(np.isfinite(current.loss))[0]
        ref_sorted = np.sort(ref_loss)
        for i in finite[np.argsort(-current.loss[finite], kind="stable")[:k]]:
            pct = np.searchsorted(ref_sorted, current.loss[i], side="right") / len(ref_sorted)
            out.append({"index": int(i), "reason": "loss", "score": float(current.loss[i]),
                        "reference_percentile": float(pct), "preview": current.previews[int(i)]})
    return out


def _describe(t: DriftTestResult) -> str:
    if t.family == "embedding":
        what = f"embedding (normalised MMD {t.effect:.2f}"
    elif t.family == "descriptors":
        name = t.name.split(":", 1)[1]
        what = (f"{name} (KS D {t.effect:.2f}, median {t.detail['reference_median']:.3g} -> "
                f"{t.detail['current_median']:.3g}")
    elif t.family == "loss":
        what = (f"loss under the champion (rank-biserial {t.effect:.2f}, median {t.detail['reference_median']:.3g} -> "
                f"{t.detail['current_median']:.3g} nats/token")
    else:
        grown = ", ".join(f"{c} {a:.0%}->{b:.0%}" for c, (a, b) in t.detail["grown"].items())
        what = f"categories (total variation {t.effect:.2f}{'; ' + grown if grown else ''}"
    return f"{what}, adjusted p {t.p_value:.3g})"


def _explain(report: DriftReport, significant: list[DriftTestResult], drifted: list[DriftTestResult],
             notes: list[str], cfg: "DriftConfig") -> str:
    n_tests = len(report.tests)
    head = f"{report.n_current} current vs {report.n_reference} reference records, {n_tests} tests"
    if drifted:
        shown = "; ".join(_describe(t) for t in drifted[:5])  # the largest effects first
        more = f"; and {len(drifted) - 5} more" if len(drifted) > 5 else ""
        text = (f"drift: {len(drifted)} of {n_tests} tests are significant at family-wise alpha {cfg.alpha} with "
                f"effect >= {cfg.effect_size_floor}: {shown}{more}.")
    elif significant:
        small = sorted(significant, key=lambda t: -t.effect)
        text = (f"no drift: {len(significant)} test(s) differ significantly but every effect is below the floor "
                f"{cfg.effect_size_floor} (drift.effect_size_floor), a real but negligible change: "
                + "; ".join(_describe(t) for t in small[:3]) + ".")
    else:
        best = min(report.tests, key=lambda t: t.p_value)
        text = (f"no drift: no test is significant at family-wise alpha {cfg.alpha} (smallest adjusted p "
                f"{best.p_value:.3g}, {best.name}; largest effect {report.effect:.2f}).")
    return f"{text} [{head}{'; ' + '; '.join(notes) if notes else ''}]"
