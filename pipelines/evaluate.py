"""Candidate vs incumbent on the same examples: per-example loss, paired bootstrap, latency.

The base model is loaded once; the candidate and the incumbent are named PEFT adapters on it
(the incumbent may be the bare base model). Every example is scored by both, so the comparison
is paired: the bootstrap resamples examples, not models. Besides the loss, a sample of each set is
scored on its answers (pipelines/scoring.py decides each record's kind: accuracy by the options'
log-likelihood or the generated label, token F1, ROUGE-L), per set and per category. The report
feeds ``daemon.policy.should_promote``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipelines.data import IGNORE_INDEX, tokenize_record

BUILTIN_SETS = {"chatterbot-en": "english", "chatterbot-zh": "chinese"}


class EvalError(RuntimeError):
    """An evaluation cannot be run; the message says why."""


@dataclass
class ScoreCache:
    """One model's scores from earlier evaluations (an adapter version's, or the base model's), read and filled.

    ``answers``: its answers keyed by prompt and budget (``score_answers``). ``losses``: its per-example losses on a
    regression set, keyed by the set's token ids and the scoring settings. An adapter scored as a candidate fills its
    own cache, so once promoted its evaluations as the incumbent skip the fixed regression sets.
    """

    answers: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)


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

    from pipelines.models import forward_keeping_logits

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
            for j, i in enumerate(idx):
                n = len(examples[i]["input_ids"])
                ids[j, :n] = torch.tensor(examples[i]["input_ids"])
                labels[j, :n] = torch.tensor(examples[i]["labels"])
            # Logits only where some row of the batch scores the next token (prompts are most of a chat
            # record's positions): the LM head over the vocabulary and its float32 copy are a large share of
            # the pass and of its memory otherwise. The model applies its own head and any logit scaling.
            scored = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()
            # No attention mask: rows are padded on the right, so under the causal mask no real token sees a pad
            # and the scored positions come out as with the padding mask (pads' own outputs are never scored).
            # Without one, attention takes the causal kernel instead of a dense masked one: on a CPU 1.4x faster
            # attention at 1,400 tokens, the same losses.
            kwargs = {"input_ids": ids.to(device), "use_cache": False}
            out, kept = forward_keeping_logits(model, scored.to(device), **kwargs)
            if kept:
                logits, target = out.logits, labels[:, 1:][:, scored].to(device)
            else:   # a model without logits_to_keep: every position
                logits, target = out.logits[:, :-1], labels[:, 1:].to(device)
            tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
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


# ----------------------------------------------------------------------------- answers


def _last_answer_start(labels: list[int]) -> int | None:
    """Index of the first token of the last labelled run (the last assistant turn), or None."""
    start = None
    for k in range(len(labels) - 1, -1, -1):
        if labels[k] != IGNORE_INDEX:
            start = k
        elif start is not None:
            break
    return start


def answer_items(payloads: list[dict], tokenizer: Any, max_seq_len: int, *, score_kinds: dict[str, str],
                 new_tokens: dict[str, int], labels: set[str] | None = None) -> list[dict]:
    """What scoring the answers of ``payloads`` needs: kind, category, prompt ids, gold answer, and for
    choice records one tokenized example per option (the last answer replaced by the option's letter).

    Records without an answer (text records, or a prompt longer than ``max_seq_len``) are left out.
    ``labels``: the answers that count as repeated class labels (``record_kind``); default those that repeat
    in ``payloads`` (a caller scoring a small sample passes the repeats of a larger set of the same task).
    """
    from pipelines.scoring import options_of, prompt_and_answer, record_kind, repeated_answers

    items = []
    labels = repeated_answers(payloads) if labels is None else labels
    for p in payloads:
        category = str(p.get("category") or "")
        kind = record_kind(p, score_kinds.get(category), labels)
        if kind is None:
            continue
        ex = tokenize_record(p, tokenizer, max_seq_len)
        start = _last_answer_start(ex["labels"])
        if not start:
            continue
        prompt, gold = prompt_and_answer(p)
        item = {"kind": kind, "category": category, "gold": gold, "prompt_ids": ex["input_ids"][:start],
                "new_tokens": new_tokens.get(kind, 1)}
        if kind == "choice":
            letters = options_of("\n".join(str(m.get("content") or "") for m in prompt))
            item["options"] = {}
            for letter in letters:
                messages = [*prompt, {"role": "assistant", "content": letter}]
                item["options"][letter] = tokenize_record({"messages": messages}, tokenizer, max_seq_len)
        items.append(item)
    return items


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: list[int], *,
                     batch_size: int = 16, batch_tokens: int = 0, pad_id: int = 0,
                     autocast: str | None = None) -> list[str]:
    """Greedy answers to token-id prompts, in input order: left-padded batches of similar length and the same
    token budget, each stopping when every row has ended (EOS) or spent its ``new_tokens``."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    out = [""] * len(prompts)
    cast = (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast
            else contextlib.nullcontext())
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(new_tokens):
        groups.setdefault(n, []).append(i)
    model.eval()
    with torch.inference_mode(), cast:
        for budget, members in sorted(groups.items()):
            lengths = [len(prompts[i]) + budget for i in members]
            for batch in _length_batches(lengths, batch_size, batch_tokens):
                rows = [prompts[members[j]] for j in batch]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for k, r in enumerate(rows):   # left padding: every row's answer starts at the same column
                    ids[k, width - len(r):] = torch.tensor(r)
                    mask[k, width - len(r):] = 1
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=budget, pad_token_id=pad_id, num_beams=1)
                for k, j in enumerate(batch):
                    out[members[j]] = tokenizer.decode(gen[k, width:], skip_special_tokens=True)
    return out


LOSS_CACHE_VERSION = 1   # bumped whenever example_losses' numbers change, so cached losses are not reused


def _key(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def score_answers(model: Any, tokenizer: Any, items: list[dict], *, cache: dict | None = None,
                  loss_kw: dict, gen_kw: dict) -> list[float]:
    """Each item's score in [0, 1]: choice records by the option with the highest log-likelihood, the
    others on their greedy answer. ``cache`` (the incumbent's: answers keyed by prompt and budget) is read
    and filled, so an unchanged incumbent's answers on an unchanged set are generated once."""
    from pipelines.scoring import choose_option, score_answer

    cache = {} if cache is None else cache
    answers: dict[int, str] = {}
    todo_gen = []
    todo_choice = []
    for i, it in enumerate(items):
        key = _key(it["kind"], it["prompt_ids"], it["new_tokens"],
                   {k: v["input_ids"] for k, v in (it.get("options") or {}).items()})
        it["_key"] = key
        if key in cache:
            answers[i] = cache[key]
        elif it["kind"] == "choice":
            todo_choice.append(i)
        else:
            todo_gen.append(i)
    if todo_choice:
        flat = [(i, letter, ex) for i in todo_choice for letter, ex in items[i]["options"].items()]
        losses = example_losses(model, [ex for _, _, ex in flat], **loss_kw)
        ll: dict[int, dict[str, float]] = {}
        for (i, letter, ex), loss in zip(flat, losses):
            count = sum(1 for lab in ex["labels"][1:] if lab != IGNORE_INDEX)
            ll.setdefault(i, {})[letter] = -loss * count if math.isfinite(loss) else -math.inf
        for i in todo_choice:
            answers[i] = cache[items[i]["_key"]] = choose_option(ll[i])
    if todo_gen:
        texts = generate_answers(model, tokenizer, [items[i]["prompt_ids"] for i in todo_gen],
                                 [items[i]["new_tokens"] for i in todo_gen], **gen_kw)
        for i, text in zip(todo_gen, texts):
            answers[i] = cache[items[i]["_key"]] = text
    return [score_answer(it["kind"], answers[i], it["gold"]) for i, it in enumerate(items)]


def compare_scores(items: list[dict], candidate: list[float], incumbent: list[float], *,
                   samples: int, seed: int) -> dict:
    """Candidate vs incumbent scores of one set, per metric and per category and metric.

    Returns:
        {"metrics": {metric: cmp}, "categories": {category: {metric: cmp}}, "uncategorized": {metric: cmp}
        (the records without a category), "kinds": {kind: n}} where cmp is
        {"candidate", "incumbent", "n", "drop" (incumbent - candidate), "ci95" (of the drop),
        "p_value" (bootstrap probability that the candidate is not worse; small = a significant drop)}.
    """
    from pipelines.scoring import METRIC_OF_KIND

    def cmp(idx: list[int]) -> dict:
        c, i = [candidate[k] for k in idx], [incumbent[k] for k in idx]
        test = paired_bootstrap(c, i, samples=samples, seed=seed)
        return {"candidate": _mean(c), "incumbent": _mean(i), "n": len(idx), "drop": test["mean_diff"],
                "ci95": [test["ci_low"], test["ci_high"]], "p_value": test["p_value"]}

    by_metric: dict[str, list[int]] = {}
    by_cat: dict[str, dict[str, list[int]]] = {}
    kinds: dict[str, int] = {}
    for k, it in enumerate(items):
        metric = METRIC_OF_KIND[it["kind"]]
        by_metric.setdefault(metric, []).append(k)
        by_cat.setdefault(it["category"], {}).setdefault(metric, []).append(k)
        kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
    return {"metrics": {m: cmp(idx) for m, idx in sorted(by_metric.items())},
            "categories": {c: {m: cmp(idx) for m, idx in sorted(ms.items())} for c, ms in sorted(by_cat.items()) if c},
            "uncategorized": {m: cmp(idx) for m, idx in sorted(by_cat.get("", {}).items())}, "kinds": kinds}


def category_losses(payloads: list[dict], candidate: list[float], incumbent: list[float]) -> dict:
    """{category: {"candidate_loss", "incumbent_loss", "n"}} over the examples that have a category."""
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(payloads):
        if p.get("category"):
            groups.setdefault(str(p["category"]), []).append(k)
    return {c: {"candidate_loss": _mean(candidate[k] for k in idx), "incumbent_loss": _mean(incumbent[k] for k in idx),
                "n": len(idx)} for c, idx in sorted(groups.items())}


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
             latency_prompts: int = 8, max_seq_len: int = 1024, seed: int = 0, regression_base: bool = False,
             answers: dict | None = None, caches: dict[str, ScoreCache] | None = None) -> dict:
    """Score candidate and incumbent (None = the base model) on the holdout and every regression set.

    Args:
        answers: score answers too: {"examples": per set, "score_kinds": {category: kind},
            "new_tokens": {kind: n}[, "free_text_sets": "holdout" | "all" | "none"]}; None = losses only.
        caches: ``ScoreCache`` of "candidate", "incumbent" and "base" (each optional; with the base model as the
            incumbent, the same object under both names): their answers and regression-set losses from earlier
            evaluations, read and filled in place. A model's cached numbers are the ones it would compute again.

    Returns:
        An EvalReport dict: ``holdout`` {candidate_loss, incumbent_loss, p_value, n, ci..., categories},
        ``regression`` {name: {candidate_loss, incumbent_loss, n, categories[, base_loss]}} (``base_loss``: the
        base model's, with ``regression_base`` or when the incumbent is the base), ``scores`` {set: answer
        scores (``compare_scores``)} with ``answers``, ``latency`` {candidate_ttft_s, incumbent_ttft_s},
        ``per_example`` losses for the holdout, and the seconds spent on losses and on answers.
    """
    from peft import PeftModel

    def tokenize(payloads: list[dict]) -> tuple[list[dict], list[dict]]:
        kept, out = [], []
        for p in payloads:
            ex = tokenize_record(p, tokenizer, max_seq_len)
            if ex is not None and any(lab != IGNORE_INDEX for lab in ex["labels"][1:]):
                kept.append(p)
                out.append(ex)
        return kept, out

    holdout_p, holdout_ex = tokenize(_sample(holdout, max_examples, seed))
    if not holdout_ex:
        raise EvalError("the new-data holdout is empty: nothing to judge the candidate on")
    sets = {name: tokenize(_sample(p, max_examples, seed)) for name, p in regression.items()}

    peft_model = PeftModel.from_pretrained(model, str(candidate), adapter_name="candidate")
    if incumbent is not None:
        peft_model.load_adapter(str(incumbent), adapter_name="incumbent")
    pad = tokenizer.pad_token_id or 0

    # On a CPU: short examples many to a forward pass, and bf16 autocast where the CPU has bf16 units (as training
    # does; both sides alike, so the paired comparison is unchanged: on the default model the mean losses
    # moved by 0.03-0.1 %, the scoring took 2x less time; the first-token latency stays in float32).
    on_cpu = next(model.parameters()).device.type == "cpu"
    kw = {"pad_id": pad}
    if on_cpu:
        from pipelines.hardware import cpu_autocast

        kw.update(batch_size=64, batch_tokens=8192, autocast=cpu_autocast(model))

    caches = caches or {}

    def cache_for(which: str) -> ScoreCache | None:
        """The cache of the model that ``which`` runs (the base model's when the incumbent is the base)."""
        if which == "incumbent" and incumbent is None:
            return caches.get("incumbent") or caches.get("base")
        return caches.get(which)

    def answer_cache(which: str) -> dict | None:
        cache = cache_for(which)
        return None if cache is None else cache.answers

    def use(which: str):
        import contextlib

        if which == "candidate" or (which == "incumbent" and incumbent is not None):
            peft_model.set_adapter(which)
            return contextlib.nullcontext()
        return peft_model.disable_adapter()

    def score(which: str, examples: list[dict]) -> list[float]:
        with use(which):
            return example_losses(peft_model, examples, **kw)

    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    settings = {**kw, "device": next(model.parameters()).device.type, "dtype": str(next(model.parameters()).dtype),
                "quantization": str(quantization.to_dict() if hasattr(quantization, "to_dict") else quantization),
                "version": LOSS_CACHE_VERSION}

    def score_set(which: str, examples: list[dict]) -> list[float]:
        """A regression set's losses, from ``which``'s cache when it holds them (the sets do not change)."""
        cache = cache_for(which)
        if cache is None:
            return score(which, examples)
        key = _key("losses", [[e["input_ids"], e["labels"]] for e in examples], settings)
        if key not in cache.losses:
            cache.losses[key] = score(which, examples)
        return list(cache.losses[key])

    t0 = time.perf_counter()
    # Scoring on a CPU runs as training's speed plan does where that changes no number (``_scoring_setup``); the
    # first-token latency below runs as before, outside it.
    with _scoring_setup(peft_model, kw.get("autocast")):
        cand_h, inc_h = score("candidate", holdout_ex), score("incumbent", holdout_ex)
        test = paired_bootstrap(cand_h, inc_h, samples=bootstrap_samples, seed=seed)
        report: dict[str, Any] = {
            "holdout": {"candidate_loss": _mean(cand_h), "incumbent_loss": _mean(inc_h), "n": test["n"],
                        "p_value": test["p_value"], "mean_diff": test["mean_diff"],
                        "ci95": [test["ci_low"], test["ci_high"]],
                        "candidate_perplexity": math.exp(_mean(cand_h)), "incumbent_perplexity": math.exp(_mean(inc_h)),
                        "categories": category_losses(holdout_p, cand_h, inc_h)},
            "regression": {},
            "per_example": {"candidate": cand_h, "incumbent": inc_h},
        }
        for name, (payloads, examples) in sets.items():
            if examples:
                c, i = score_set("candidate", examples), score_set("incumbent", examples)
                r = report["regression"][name] = {"candidate_loss": _mean(c), "incumbent_loss": _mean(i),
                                                  "n": len(examples), "candidate_perplexity": math.exp(_mean(c)),
                                                  "incumbent_perplexity": math.exp(_mean(i)),
                                                  "categories": category_losses(payloads, c, i)}
                if incumbent is None:
                    r["base_loss"] = _mean(i)
                elif regression_base:
                    r["base_loss"] = _mean(score_set("base", examples))
        report["loss_seconds"] = time.perf_counter() - t0
        if answers is not None:
            t1 = time.perf_counter()
            gen_kw = {"pad_id": pad, "batch_size": 32 if on_cpu else 64, "autocast": kw.get("autocast")}
            named = {"holdout": holdout_p, **{name: payloads for name, (payloads, _) in sets.items()}}
            report["scores"] = {}
            for name, payloads in named.items():
                items = answer_items(payloads[:answers["examples"]], tokenizer, max_seq_len,
                                     score_kinds=answers.get("score_kinds") or {}, new_tokens=answers["new_tokens"])
                free = answers.get("free_text_sets", "all")
                if free == "none" or (free == "holdout" and name != "holdout"):
                    items = [it for it in items if it["kind"] != "free"]
                if not items:
                    continue
                with use("candidate"):
                    cs = score_answers(peft_model, tokenizer, items, cache=answer_cache("candidate"), loss_kw=kw,
                                       gen_kw=gen_kw)
                with use("incumbent"):
                    ins = score_answers(peft_model, tokenizer, items, cache=answer_cache("incumbent"), loss_kw=kw,
                                        gen_kw=gen_kw)
                report["scores"][name] = compare_scores(items, cs, ins, samples=bootstrap_samples, seed=seed)
            report["answer_seconds"] = time.perf_counter() - t1
    report["latency"] = _latency(peft_model, tokenizer, holdout_ex[:latency_prompts], use)
    if report["latency"] is None:
        del report["latency"]
    else:
        report["latency"]["incumbent"] = "base" if incumbent is None else "adapter"
    report["seconds"] = time.perf_counter() - t0
    return report


def _scoring_setup(peft_model: Any, autocast: str | None):
    """Under bf16 autocast (the evaluation asks for it on a CPU only), what training's speed plan does that leaves
    every number as it was: one bf16 copy of each frozen linear on a CPU (autocast casts a frozen weight again at
    every call) and no float32 copy of each LoRA input (autocast casts it back to bf16 for the matmul). Without
    autocast nothing."""
    import contextlib

    if not autocast:
        return contextlib.nullcontext()
    from pipelines.train.speed import SpeedPlan, speed_setup

    return speed_setup(peft_model, SpeedPlan(attention="mask", compile_layers=False, autocast=autocast,
                                             lora_kernel="peft"))


def _latency(peft_model: Any, tokenizer: Any, examples: list[dict], use: Any) -> dict | None:
    """Median time to first token of candidate and incumbent on the prompts of ``examples``."""
    prompts = []
    for ex in examples:
        first_label = next((k for k, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), len(ex["labels"]))
        prompts.append(ex["input_ids"][:max(1, first_label)])
    if not prompts:
        return None
    with use("candidate"):
        cand_ttft = time_to_first_token(peft_model, tokenizer, prompts)
    with use("incumbent"):
        inc_ttft = time_to_first_token(peft_model, tokenizer, prompts)
    return {"candidate_ttft_s": cand_ttft, "incumbent_ttft_s": inc_ttft}
