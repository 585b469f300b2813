"""How much time scoring answers adds to an evaluation: losses only vs losses + answers, same run, interleaved.

    .venv/bin/python bench/eval_time.py --out bench/results/eval_time_cpu.json
    .venv/bin/python bench/eval_time.py --max-examples 50 --answer-examples 16 --rounds 2   # a short run

The evaluation ``lorad eval`` runs: candidate vs incumbent (two random LoRA adapters on the default
SmolLM2-135M-Instruct) on a new-data holdout of LawBench records of three kinds (classification labels,
named entities, consultation answers) and on the built-in regression sets (chatterbot en + zh), with the
eval section's defaults unless told otherwise. Three arms per round: ``loss_only`` (eval.task_metrics off),
``answers_cold`` (answers scored, the incumbent's answer cache empty: the first evaluation against a new
champion) and ``answers_warm`` (the incumbent's answers cached: every later candidate against the same champion
on the same regression sets). The goal (issue 25): answers_cold <= 1.5x loss_only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

TASKS = ("2-4问题主题识别", "2-6命名实体识别", "3-8咨询")   # label, extraction, free text


def holdout(n_per_task: int, seed: int = 0) -> list[dict]:
    """``n_per_task`` LawBench records of each task in TASKS, as chat payloads with the task as category."""
    folder = _common.lawbench_dataset("qa", "bench/eval_time.py")
    out = []
    for task in TASKS:
        rows = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        for r in random.Random(f"{seed}/{task}").sample(rows, min(n_per_task, len(rows))):
            messages = ([{"role": "system", "content": r["system"]}] if r.get("system") else []) + [
                {"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}]
            out.append({"messages": messages, "category": task})
    return out


def random_adapter(model_dir: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    for name, p in peft.named_parameters():   # small: the answers stay the base model's kind of answers
        if "lora_B" in name:
            p.data.mul_(0.05)
    peft.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-model", default=None, help="a HF model folder; default the embedded default, converted "
                                                       "once into .cache/lorad-test")
    ap.add_argument("--max-examples", type=int, default=None, help="eval.max_examples (default: the config's)")
    ap.add_argument("--answer-examples", type=int, default=None, help="eval.answer_examples (default: the config's)")
    ap.add_argument("--per-task", type=int, default=70, help="holdout records per LawBench task (3 tasks)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorad-eval-time"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_time_cpu.json")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.config import build_config
    from daemon.evaluation import answer_options
    from pipelines.evaluate import ScoreCache, evaluate, load_regression_set

    model_dir = args.base_model
    if model_dir is None:
        from pipelines.models import EMBEDDED_DEFAULT, resolve_base_model

        model_dir = str(resolve_base_model(EMBEDDED_DEFAULT, ROOT / ".cache" / "lorad-test"))
    over = {k: v for k, v in (("max_examples", args.max_examples), ("answer_examples", args.answer_examples))
            if v is not None}
    cfg = build_config({"eval": over})
    e = cfg.eval
    args.work.mkdir(parents=True, exist_ok=True)
    cand = random_adapter(model_dir, args.work / "candidate", 1)
    inc = random_adapter(model_dir, args.work / "incumbent", 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sets = {name: load_regression_set(name) for name in e.regression_sets}
    data = holdout(args.per_task)
    times: dict[str, list[float]] = {"loss_only": [], "answers_cold": [], "answers_warm": []}
    parts: dict[str, list[dict]] = {k: [] for k in times}
    for r in range(args.rounds):
        cache: dict = {}
        for arm in ("loss_only", "answers_cold", "answers_warm"):   # interleaved: the load hits every arm alike
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            t0 = time.perf_counter()
            rep = evaluate(model, tok, candidate=cand, incumbent=inc, holdout=data, regression=sets,
                           max_examples=e.max_examples, bootstrap_samples=e.bootstrap_samples,
                           latency_prompts=e.latency_prompts, max_seq_len=cfg.data.max_seq_len,
                           answers=None if arm == "loss_only" else answer_options(cfg),
                           # the answers alone cached (a fresh loss cache each time): what answers cost
                           caches=None if arm == "loss_only" else {"incumbent": ScoreCache(answers=cache)})
            times[arm].append(time.perf_counter() - t0)
            parts[arm].append({k: rep.get(k) for k in ("loss_seconds", "answer_seconds", "seconds")})
            if arm == "answers_cold":
                kinds = {n: s["kinds"] for n, s in rep["scores"].items()}
            print(f"round {r + 1} {arm}: {times[arm][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "eval_time", "commit": _common.commit(), "dirty": _common.dirty(),
        "machine": {"cpu": _common.cpu_name(), "cores": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "model": model_dir, "eval": {"max_examples": e.max_examples, "answer_examples": e.answer_examples,
                                     "new_tokens": answer_options(cfg)["new_tokens"],
                                     "regression_sets": list(e.regression_sets)},
        "holdout": {"tasks": list(TASKS), "records": len(data)}, "kinds_scored": kinds,
        "rounds": args.rounds, "seconds": times, "parts": parts, "median_seconds": med,
        "ratio_cold": med["answers_cold"] / med["loss_only"], "ratio_warm": med["answers_warm"] / med["loss_only"],
        "goal": "answers_cold <= 1.5 x loss_only",
    }
    result["met"] = result["ratio_cold"] <= 1.5
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"loss only {med['loss_only']:.1f} s; with answers {med['answers_cold']:.1f} s cold "
          f"({result['ratio_cold']:.2f}x), {med['answers_warm']:.1f} s warm ({result['ratio_warm']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
