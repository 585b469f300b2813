"""The drift check: its reference window, and ``lorad drift`` (featurize both windows, test, report).

The job runner (daemon/jobs.py) writes the reference window (``reference_payloads``: what the champion
learned) and the current one (the pending records) to files and runs ``lorad drift`` on them in a
subprocess, which calls ``cli_drift``. The features are monitors/features.py's and the test
monitors/drift.py's, imported inside the functions: the runner's side stays free of numpy and torch.
The reference window's features are cached under ``<state>/cache/drift-features``, keyed by everything
they depend on, so a check featurizes only the new records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import registry
from daemon.config import Config
from daemon.store import Store

if TYPE_CHECKING:  # pragma: no cover
    from monitors.features import Features


DRIFT_CACHE = "drift-features"   # under <state>/cache: reference-window features, a few newest kept
DRIFT_CACHE_KEEP = 4


def _reference_cache_path(folder: Path, records: list[dict], model: Any, dtype: str, adapter: str | Path | None,
                          max_tokens: int) -> Path:
    """The cache file of these records' features under this model (+ adapter), dtype and token budget."""
    import hashlib

    from monitors.features import FEATURES_VERSION

    h = hashlib.sha256()
    identity = {"version": FEATURES_VERSION, "max_tokens": int(max_tokens), "dtype": str(dtype),
                "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
                "params": sum(p.numel() for p in model.parameters())}
    if adapter is not None:   # adapter folders are immutable once written; their weights' size and time say which
        weights = Path(adapter) / "adapter_model.safetensors"
        st = weights.stat() if weights.exists() else None
        identity["adapter"] = [str(Path(adapter).resolve()), st.st_size if st else 0, st.st_mtime_ns if st else 0]
    h.update(json.dumps(identity, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return folder / f"{h.hexdigest()[:32]}.npz"


def _load_cached(path: Path) -> "Features | None":
    from monitors.features import Features

    try:
        features = Features.load(path)
    except Exception:   # none yet, or unreadable (cut short, corrupt): computed again
        return None
    try:
        os.utime(path)   # newest first when old entries are dropped
    except OSError:
        pass
    return features


def _store_cached(path: Path, features: "Features") -> None:
    """Best effort: a full disk or a read-only state only costs the next check its speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        features.save(path)
        entries = sorted(path.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[DRIFT_CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def cli_drift(reference_path: str | Path, current_path: str | Path | None, cfg: Any, *, seed: int = 0,
              loader: Any = None, batch_size: int = 8, max_tokens: int = 256,
              adapter: str | Path | None = None, adapter_version: str | None = None) -> dict:
    """``lorad drift --reference PATH --current PATH``: featurize both files, test, report.

    With ``adapter`` (the champion's adapter folder, verified by the caller) both windows are
    featurized by base + adapter in one pass: the loss feature is then the champion's own view of
    novelty, and both windows still come from the same model, so the test stays fair.

    The reference window's features are cached in ``<state>/cache/drift-features``; with
    ``current_path`` None (``lorad drift --warm``) only that is done, so the next check is quick.

    Args:
        reference_path / current_path: data files (JSONL in any record shape ingest accepts).
        cfg: the full lorad Config (model, paths and drift sections are used).
        seed: seeds the reservoir cap, MMD subsampling and permutations (same seed, same answer).
        loader: ``load_base_model``-compatible callable (tests pass a tiny model).
        adapter / adapter_version: a PEFT adapter folder to score under, and its name for the report.

    Returns:
        DriftReport.to_dict(), plus "rejected" (lines ingest would reject, left out), "scored_by"
        (the version whose loss was measured, or "base"), "reference_features" (cached or computed)
        and "timings" (seconds per step); for a warm-up, {"status": "warmed", ...}.
    """
    import time

    import numpy as np

    from monitors.drift import detect_drift
    from monitors.features import featurize
    from pipelines.ingest import read_payloads

    t0 = time.perf_counter()
    data_cfg = getattr(cfg, "data", None)
    (reference, ref_rejected), (current, cur_rejected) = (read_payloads(reference_path, data_cfg),
                                                          ([], []) if current_path is None else
                                                          read_payloads(current_path, data_cfg))
    t_read = time.perf_counter()
    model, tokenizer, dtype = _drift_model(cfg, loader, adapter)
    t_load = time.perf_counter()
    # The reference window is the same for every check until the champion changes (its training data, or the
    # regression sets for the bare base): its features are kept in the state's cache, keyed by everything
    # they depend on, so a check featurizes only the new records.
    cache = _reference_cache_path(Path(cfg.paths.state_dir) / "cache" / DRIFT_CACHE, reference, model, dtype,
                                  adapter, max_tokens)
    ref_f = _load_cached(cache)
    reference_features = "cached" if ref_f is not None else "computed"
    if ref_f is None:
        ref_f = featurize(reference, model, tokenizer, batch_size=batch_size, max_tokens=max_tokens)
        _store_cached(cache, ref_f)
    scored_by = (adapter_version or str(adapter)) if adapter is not None else "base"
    if current_path is None:   # warm-up only: the reference window's features are in the cache now
        return {"status": "warmed", "n_reference": len(reference), "scored_by": scored_by,
                "reference_features": reference_features,
                "timings": {"read_s": t_read - t0, "load_model_s": t_load - t_read,
                            "featurize_s": time.perf_counter() - t_load}}
    cur_f = featurize(current, model, tokenizer, batch_size=batch_size, max_tokens=max_tokens)
    t_feat = time.perf_counter()
    report = detect_drift(ref_f, cur_f, cfg.drift, rng=np.random.default_rng(seed)).to_dict()
    t_test = time.perf_counter()
    # Lines ingest would reject are left out of both windows, and said so.
    report["rejected"] = {"reference": len(ref_rejected), "current": len(cur_rejected),
                          "first": (ref_rejected[:3] + cur_rejected[:3])[:5]}
    report["scored_by"] = scored_by
    report["reference_features"] = reference_features
    report["timings"] = {"read_s": t_read - t0, "load_model_s": t_load - t_read,
                         "featurize_s": t_feat - t_load, "test_s": t_test - t_feat}
    return report


def _drift_model(cfg: Any, loader: Any, adapter: str | Path | None) -> tuple[Any, Any, str]:
    """The model drift features are computed with (base, + adapter), its tokenizer, and the dtype it runs in."""
    from pipelines.models import load_for

    base = load_for("drift", cfg, loader=loader)
    model = base.model
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))  # safetensors only: lorad writes nothing else
        model.eval()
    return model, base.tokenizer, base.cfg.model.dtype


def reference_payloads(store: Store, cfg: Config, seed: int = 0) -> tuple[str, list[dict]]:
    """What the champion learned (its snapshot's training records, reservoir-capped).

    With no champion yet, the base model's own knowledge is represented by the general regression
    sets: new domain data is then compared with general conversation.
    """
    import random

    from daemon.runs import snapshot_payloads

    champ = registry.champion(store)
    payloads: list[dict] = []
    source = "base model (general regression sets)"
    if champ is not None:
        row = store.query_one("SELECT snapshot_id FROM adapters WHERE version = ?", (champ,))
        if row and row["snapshot_id"]:
            payloads = [p for _, _, p in snapshot_payloads(store, row["snapshot_id"], roles=("new", "replay"))]
            source = f"champion {champ} training data"
    if not payloads:
        from pipelines.evaluate import load_regression_set

        for name in cfg.eval.regression_sets:
            payloads.extend(load_regression_set(name))
    if len(payloads) > cfg.drift.reference_cap:
        payloads = random.Random(seed).sample(payloads, cfg.drift.reference_cap)
    return source, payloads
