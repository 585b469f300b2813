"""Exports of a trained adapter on the default 135M model: size, export time, load time, holdout loss.

    python -m bench.export_bench [--out bench/results/export.json] [--train N] [--holdout N] [--steps N]

One adapter is trained on LawBench statute-recitation records (1-1 法条背诵) with lorad's trainer, registered
in a scratch state folder, and exported in every format through ``export_version`` (what
``lorad export`` runs). Each export is then loaded the way a user would (plain transformers for
merged and bnb4, onnxruntime for ONNX) and scored on held-out records of the same task, against the
unmerged base + adapter in PyTorch (the reference) and the base model alone. ONNX's greedy tokens are
compared with PyTorch's for a few prompts. Sizes are measured on disk; the baseline for the size
ratio is the float16 merged model, measured in the same run. Losses are computed in float32 on CPU
(merged float16 weights are upcast), so differences come from the weights' format only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

TASK = "1-1法条背诵.jsonl"
MAX_TOKENS = 384
PROMPTS = ["我在网上买的东西有质量问题，商家不给退货怎么办？", "What makes a contract valid?",
           "公司拖欠工资三个月了，我应该怎么维权？", "邻居装修把我家的墙弄裂了，可以要求赔偿吗？",
           "Hello! Can you help me with a question about renting a flat?"]


def machine_info() -> dict:
    import torch
    import transformers

    cpu = _common.cpu_name()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg_start": os.getloadavg()}


def git_commit() -> dict:
    return {"commit": _common.commit(), "dirty": _common.dirty()}


def lawbench_payloads() -> list[dict]:
    from pipelines.ingest import iter_records

    path = _common.lawbench_dataset("qa", "bench/export_bench.py") / TASK
    return [item.record.payload for item in iter_records(str(path)) if item.record is not None]


def mean(xs) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def greedy_torch(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    ap.add_argument("--train", type=int, default=48, help="training records")
    ap.add_argument("--holdout", type=int, default=40, help="held-out records scored per format")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of the adapter")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared per prompt (ONNX parity)")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from daemon import registry
    from daemon.config import TrainConfig, build_config
    from daemon.exports import export_version
    from daemon.store import open_store
    from pipelines import train as T
    from pipelines.data import tokenize_record
    from pipelines.evaluate import example_losses
    from pipelines.export import OnnxCausalLM, folder_bytes
    from pipelines.models import EMBEDDED_DEFAULT, load_base_model, resolve_base_model

    result: dict = {"benchmark": "export", "machine": machine_info(), "git": git_commit(), "model": EMBEDDED_DEFAULT,
                    "task": f"LawBench {TASK}", "started_at": time.time()}
    cache = ROOT / ".cache" / "lorad-test"
    base_dir = resolve_base_model(EMBEDDED_DEFAULT, cache)
    work = Path(tempfile.mkdtemp(prefix="lorad-export-bench-"))
    state = work / "state"
    state.mkdir()
    (state / "cache").symlink_to(cache, target_is_directory=True)
    cfg = build_config({"paths": {"state_dir": str(state)},
                        "data": {"max_seq_len": 512, "max_prompt_tokens": 512, "max_response_tokens": 512}})

    # -- data: records of one task that fit MAX_TOKENS, split into train and holdout
    model, tokenizer = load_base_model(EMBEDDED_DEFAULT, state / "cache", dtype="float32", device="cpu",
                                       for_training=True)
    examples = []
    for p in lawbench_payloads():
        ex = tokenize_record(p, tokenizer, 10_000)
        if len(ex["input_ids"]) <= MAX_TOKENS and any(lab != -100 for lab in ex["labels"][1:]):
            examples.append(ex)
    train_ex, holdout = examples[:args.train], examples[args.train:args.train + args.holdout]
    result["data"] = {"train_records": len(train_ex), "holdout_records": len(holdout), "max_tokens": MAX_TOKENS}

    # -- the adapter: lorad's trainer, then the registry (as the daemon would)
    # A high learning rate: a few steps on a 2-core CPU must still move the model measurably.
    tcfg = TrainConfig(lora_r=16, lora_alpha=32, learning_rate=1e-3, micro_batch_size=4, grad_accum_steps=1,
                       warmup_ratio=0.1, checkpoint_every_steps=10_000)
    t0 = time.perf_counter()
    outcome = T.train(train_ex, run_dir=work / "run", model=model, tokenizer=tokenizer, cfg=tcfg, max_seq_len=512,
                      max_steps=args.steps, progress=False)
    result["adapter"] = {"steps": outcome.steps, "loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
                         "train_seconds": round(time.perf_counter() - t0, 1), "lora_r": tcfg.lora_r,
                         "targets": "all-linear"}
    store = open_store(state)
    version = registry.register_adapter(store, state, Path(outcome.adapter_dir), base_model=EMBEDDED_DEFAULT)
    adapter_path = Path(registry.get_adapter(store, version)["path"])
    del model
    gc.collect()

    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
    pad = tokenizer.pad_token_id
    rows = []

    # -- reference: base + adapter, unmerged, float32 (and the base alone)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_bytes = folder_bytes(base_dir)
    rows.append({"format": "base model alone (float32 cache)", "bytes_total": base_bytes[0],
                 "bytes_weights": base_bytes[1], "holdout_loss": mean(example_losses(base, holdout, pad_id=pad))})
    t0 = time.perf_counter()
    reference = PeftModel.from_pretrained(base, str(adapter_path)).eval()
    ref_load = time.perf_counter() - t0
    ref_loss = mean(example_losses(reference, holdout, pad_id=pad))
    ref_tokens = [greedy_torch(reference, tokenizer, ids, args.new_tokens) for ids in prompt_ids]
    adapter_bytes = folder_bytes(adapter_path)
    rows.append({"format": "base + adapter (PyTorch, unmerged, float32)", "bytes_total": None,
                 "bytes_weights": adapter_bytes[1], "load_seconds_adapter": round(ref_load, 2),
                 "holdout_loss": ref_loss})
    del reference, base
    gc.collect()

    exports = {}
    for fmt in ("merged", "bnb4", "onnx"):
        print(f"export_bench: exporting {fmt}", file=sys.stderr, flush=True)
        exports[fmt] = export_version(store, cfg, version, fmt, out=work / "exports" / fmt)

    # -- merged float16, loaded with plain transformers
    t0 = time.perf_counter()
    merged = AutoModelForCausalLM.from_pretrained(work / "exports" / "merged", dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    merged_tokens = [greedy_torch(merged, tokenizer, ids, args.new_tokens) for ids in prompt_ids]
    rows.append({"format": "merged (float16 safetensors)", **_sizes(exports["merged"]), "load_seconds": round(load, 2),
                 "holdout_loss": mean(example_losses(merged, holdout, pad_id=pad)),
                 "greedy_tokens_equal_reference": merged_tokens == ref_tokens})
    del merged
    gc.collect()

    # -- bnb4, loaded with plain transformers (bitsandbytes computes on CPU)
    t0 = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(work / "exports" / "bnb4", device_map={"": "cpu"}).eval()
    load = time.perf_counter() - t0
    q_tokens = [greedy_torch(q, tokenizer, ids, args.new_tokens) for ids in prompt_ids]
    rows.append({"format": "bnb4 (NF4, double quant)", **_sizes(exports["bnb4"]), "load_seconds": round(load, 2),
                 "holdout_loss": mean(example_losses(q, holdout, pad_id=pad)),
                 "greedy_tokens_equal_reference": q_tokens == ref_tokens})
    del q
    gc.collect()

    # -- ONNX in onnxruntime
    t0 = time.perf_counter()
    runner = OnnxCausalLM(work / "exports" / "onnx")
    load = time.perf_counter() - t0
    onnx_tokens = [runner.generate(ids, max_new_tokens=args.new_tokens) for ids in prompt_ids]
    rows.append({"format": "onnx (float32, onnxruntime CPU)", **_sizes(exports["onnx"]), "load_seconds": round(load, 2),
                 "holdout_loss": mean(runner.example_losses(holdout, pad_id=pad)),
                 "greedy_tokens_equal_reference": onnx_tokens == ref_tokens,
                 "parity_max_abs_logit_diff": exports["onnx"].details["parity_max_abs_logit_diff"]})

    fp16 = exports["merged"].bytes_weights
    for r in rows:
        if r.get("bytes_weights") and r["format"] != "base + adapter (PyTorch, unmerged, float32)":
            r["weights_vs_merged_fp16"] = round(r["bytes_weights"] / fp16, 3)
        if math.isfinite(r["holdout_loss"]):
            r["holdout_loss"] = round(r["holdout_loss"], 4)
            r["holdout_loss_vs_reference"] = round(r["holdout_loss"] - ref_loss, 4)
    result["rows"] = rows
    result["greedy_prompts"] = len(PROMPTS)
    result["greedy_new_tokens"] = args.new_tokens
    result["bnb4_smaller_than_merged_fp16_percent"] = round(100 * (1 - exports["bnb4"].bytes_weights / fp16), 1)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - result["started_at"], 1)
    store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({r["format"]: {k: r.get(k) for k in ("bytes_weights", "load_seconds", "holdout_loss")}
                      for r in rows}, indent=2, ensure_ascii=False))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


def _sizes(export) -> dict:
    return {"bytes_total": export.bytes_total, "bytes_weights": export.bytes_weights,
            "export_seconds": export.seconds}


if __name__ == "__main__":
    sys.exit(main())
