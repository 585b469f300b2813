"""Candidate vs incumbent on the same examples: per-example loss, paired bootstrap, latency.

The base model is loaded once; the candidate and the incumbent are named PEFT adapters on it
(the incumbent may be the bare base model). Every example is scored by both, so the comparison
is paired: the bootstrap resamples examples, not models. The report feeds
``daemon.policy.should_promote``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

from pipelines.data import IGNORE_INDEX, tokenize_record

BUILTIN_SETS = {"chatterbot-en": "english", "chatterbot-zh": "chinese"}


class EvalError(RuntimeError):
    """An evaluation cannot be run; the message says why."""


# ----------------------------------------------------------------------------- data


def builtin_regression_set(name: str) -> list[dict]:
    """General conversation from the PyPI package chatterbot-corpus, deduplicated, as chat payloads."""
    import importlib.util

    import yaml

    if name not in BUILTIN_SETS:
        raise EvalError(f"unknown built-in regression set {name!r}; built-ins: {', '.join(BUILTIN_SETS)}")
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("regression set needs the package chatterbot-corpus: pip install --no-deps chatterbot-corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / BUILTIN_SETS[name]
    seen, out = set(), []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if not turns:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            key = "\x1e".join(turns)
            if key not in seen:  # some corpus files repeat the same conversations
                seen.add(key)
                out.append({"messages": messages})
    return out


def load_regression_set(name: str) -> list[dict]:
    """A built-in name or a JSONL file of records in any shape ingest accepts."""
    if name in BUILTIN_SETS:
        return builtin_regression_set(name)
    from pipelines.ingest import iter_records

    if not Path(name).is_file():
        raise EvalError(f"regression set {name!r} is neither a built-in ({', '.join(BUILTIN_SETS)}) nor a file")
    return [item.record.payload for item in iter_records(name) if item.record is not None]


# ----------------------------------------------------------------------------- scoring


def _length_batches(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_size`` rows and (when > 0) at most
    ``batch_tokens`` padded tokens (rows x the longest): many short examples share one forward pass."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and \
                (batch_tokens <= 0 or (len(batches[-1]) + 1) * lengths[i] <= batch_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def example_losses(model: Any, examples: list[dict], *, batch_size: int = 8, pad_id: int = 0,
                   batch_tokens: int = 0, autocast: str | None = None) -> list[float]:
    """Mean next-token loss over the labelled (response) tokens of each example, in input order.

    Args:
        batch_tokens: with > 0, batches hold up to ``batch_size`` examples but at most this many padded
            tokens, so short examples go many to a pass (a CPU's matmuls run far better on them).
        autocast: "bfloat16" runs the forward passes under CPU/GPU autocast (the loss itself in float32).
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    losses = [math.nan] * len(examples)
    model.eval()
    cast = (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast
            else contextlib.nullcontext())
    with torch.inference_mode(), cast:
        for idx in _length_batches([len(e["input_ids"]) for e in examples], batch_size, batch_tokens):
            width = max(len(examples[i]["input_ids"]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                n = len(examples[i]["input_ids"])
                ids[j, :n] = torch.tensor(examples[i]["input_ids"])
                labels[j, :n] = torch.tensor(examples[i]["labels"])
                mask[j, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits, target = logits[:, :-1].float(), labels[:, 1:].to(device)
            tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                                  ignore_index=IGNORE_INDEX).view(target.shape)
            counts = (target != IGNORE_INDEX).sum(1)
            per = tok.sum(1) / counts.clamp(min=1)
            for j, i in enumerate(idx):
                losses[i] = float(per[j]) if counts[j] > 0 else math.nan
    return losses


def paired_bootstrap(candidate: list[float], incumbent: list[float], *, samples: int = 1000,
                     seed: int = 0) -> dict:
    """Paired bootstrap of the mean loss difference (incumbent - candidate; > 0 = candidate better).

    Returns:
        {"mean_diff", "ci_low", "ci_high", "p_value"}, where p_value is the bootstrap probability that
        the candidate is NOT better (mean difference <= 0), with the +1 correction.
    """
    import numpy as np

    c, i = np.asarray(candidate, dtype=float), np.asarray(incumbent, dtype=float)
    keep = np.isfinite(c) & np.isfinite(i)
    diff = (i - c)[keep]
    if diff.size == 0:
        return {"mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": 1.0, "n": 0}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    not_better = int((means <= 0).sum())
    return {"mean_diff": float(diff.mean()), "ci_low": float(np.quantile(means, 0.025)),
            "ci_high": float(np.quantile(means, 0.975)), "p_value": (not_better + 1) / (samples + 1),
            "n": int(diff.size)}


def time_to_first_token(model: Any, tokenizer: Any, prompts: list[list[int]], *, repeats: int = 1) -> float | None:
    """Median seconds from request to the first generated token (prefill + one decode step), after one
    untimed call."""
    import torch

    if not prompts:
        return None
    device = next(model.parameters()).device

    def first_token(ids: list[int]) -> float:
        x = torch.tensor([ids], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        first_token(prompts[0])   # untimed: whichever side is timed first pays no warm-up
        times = [first_token(ids) for ids in prompts for _ in range(repeats)]
    times.sort()
    return times[len(times) // 2]


# ----------------------------------------------------------------------------- the comparison


def _mean(xs: Iterable[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _sample(payloads: list[dict], k: int, seed: int) -> list[dict]:
    import random

    if len(payloads) <= k:
        return payloads
    return random.Random(seed).sample(payloads, k)


def evaluate(model: Any, tokenizer: Any, *, candidate: Path, incumbent: Path | None, holdout: list[dict],
             regression: dict[str, list[dict]], max_examples: int = 200, bootstrap_samples: int = 1000,
             latency_prompts: int = 8, max_seq_len: int = 1024, seed: int = 0, regression_base: bool = False) -> dict:
    """Score candidate and incumbent (None = the base model) on the holdout and every regression set.

    Returns:
        An EvalReport dict: ``holdout`` {candidate_loss, incumbent_loss, p_value, n, ci...},
        ``regression`` {name: {candidate_loss, incumbent_loss, n, base_loss}} (``base_loss``: the base model's,
        with ``regression_base`` or when the incumbent is the base), ``latency`` {candidate_ttft_s, incumbent_ttft_s},
        and ``per_example`` losses for the holdout.
    """
    from peft import PeftModel

    def tokenize(payloads: list[dict]) -> list[dict]:
        out = []
        for p in payloads:
            ex = tokenize_record(p, tokenizer, max_seq_len)
            if ex is not None and any(lab != IGNORE_INDEX for lab in ex["labels"][1:]):
                out.append(ex)
        return out

    holdout_ex = tokenize(_sample(holdout, max_examples, seed))
    if not holdout_ex:
        raise EvalError("the new-data holdout is empty: nothing to judge the candidate on")
    sets = {name: tokenize(_sample(p, max_examples, seed)) for name, p in regression.items()}

    peft_model = PeftModel.from_pretrained(model, str(candidate), adapter_name="candidate")
    if incumbent is not None:
        peft_model.load_adapter(str(incumbent), adapter_name="incumbent")
    pad = tokenizer.pad_token_id or 0

    # On a CPU: short examples many to a forward pass, and bf16 autocast where the CPU has AMX (as training
    # does; both sides alike, so the paired comparison is unchanged: on the default model the mean losses
    # moved by 0.03-0.1 %, the scoring took 2x less time; the first-token latency stays in float32).
    on_cpu = next(model.parameters()).device.type == "cpu"
    kw = {"pad_id": pad}
    if on_cpu:
        from pipelines.hardware import cpu_autocast

        kw.update(batch_size=64, batch_tokens=8192, autocast=cpu_autocast(model))

    def score(which: str, examples: list[dict]) -> list[float]:
        if which == "candidate" or (which == "incumbent" and incumbent is not None):
            peft_model.set_adapter(which)
            return example_losses(peft_model, examples, **kw)
        with peft_model.disable_adapter():
            return example_losses(peft_model, examples, **kw)

    t0 = time.perf_counter()
    cand_h, inc_h = score("candidate", holdout_ex), score("incumbent", holdout_ex)
    test = paired_bootstrap(cand_h, inc_h, samples=bootstrap_samples, seed=seed)
    report: dict[str, Any] = {
        "holdout": {"candidate_loss": _mean(cand_h), "incumbent_loss": _mean(inc_h), "n": test["n"],
                    "p_value": test["p_value"], "mean_diff": test["mean_diff"],
                    "ci95": [test["ci_low"], test["ci_high"]],
                    "candidate_perplexity": math.exp(_mean(cand_h)), "incumbent_perplexity": math.exp(_mean(inc_h))},
        "regression": {},
        "per_example": {"candidate": cand_h, "incumbent": inc_h},
    }
    for name, examples in sets.items():
        if examples:
            c, i = score("candidate", examples), score("incumbent", examples)
            report["regression"][name] = {"candidate_loss": _mean(c), "incumbent_loss": _mean(i), "n": len(examples)}
            if incumbent is None:
                report["regression"][name]["base_loss"] = _mean(i)
            elif regression_base:
                report["regression"][name]["base_loss"] = _mean(score("base", examples))
    prompts = []
    for ex in holdout_ex[:latency_prompts]:
        first_label = next((k for k, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), len(ex["labels"]))
        prompts.append(ex["input_ids"][:max(1, first_label)])
    if prompts:
        peft_model.set_adapter("candidate")
        cand_ttft = time_to_first_token(peft_model, tokenizer, prompts)
        if incumbent is not None:
            peft_model.set_adapter("incumbent")
            inc_ttft = time_to_first_token(peft_model, tokenizer, prompts)
        else:
            with peft_model.disable_adapter():
                inc_ttft = time_to_first_token(peft_model, tokenizer, prompts)
        report["latency"] = {"candidate_ttft_s": cand_ttft, "incumbent_ttft_s": inc_ttft,
                             "incumbent": "base" if incumbent is None else "adapter"}
    report["seconds"] = time.perf_counter() - t0
    return report
