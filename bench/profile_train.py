"""Where a lorad training step's time goes on a GPU: the kernels of a few optimizer steps, grouped.

Diagnostic, not a benchmark of record: ``python -m bench.train_speed rounds`` measures the figures the docs quote
(issue 22); this shows where lorad's step spends its time, to know what to make faster.

    python -m bench.profile_train --out profile_train.json [--eager] [--steps 2] [--lora-kernel fused]
        [--lora-dropout 0]

The 7B DeepSeek-LLM shape of ``bench/train_speed.py`` (random bf16 weights, the same seeded records), lorad's
defaults through ``pipelines.train.train`` (compiled decoder layers unless ``--eager``). After ``--warmup``
optimizer steps (compilation included), ``--steps`` steps run under torch.profiler. The JSON holds:
  wall_ms_per_step     the profiled steps' wall time, and the GPU's busy time (the union of its kernels' intervals)
  groups               kernel time per step by kind: matmul, attention, triton (compiled fusions), elementwise
                       (eager ATen kernels), reduction, copy, other; with each group's share of the kernel time
  top                  the 40 kernels with the most time per step: name, ms per step, calls per step
  useful_tflops        useful FLOPs per step (``train_speed_arms.lora_flops_per_token``) over the wall time, and the
                       same over the matmul kernels' time alone (what the GEMMs achieve)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common  # noqa: E402

GROUPS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attn", "varlen")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce", "sm90_")),
    ("triton", ("triton_",)),
    ("reduction", ("reduce_kernel", "reduce")),
    ("copy", ("copy", "memcpy", "memset", "cat_", "catarray")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1000


def summarize_kernels(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """``kernels``: (name, start us, duration us) of every CUDA kernel of ``steps`` steps."""
    groups: dict = collections.defaultdict(float)
    for name, _, dur in kernels:
        groups[kernel_group(name)] += dur / steps / 1000
    total = sum(groups.values())
    return {"kernel_ms_per_step": total,
            "busy_ms_per_step": busy_ms([(s, s + d) for _, s, d in kernels]) / steps,
            "groups": {g: {"ms_per_step": v, "share": v / total if total else None}
                       for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": _common.kernels_per_step(((name, dur) for name, _, dur in kernels), steps, top=40)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eager", action="store_true", help="decoder layers not compiled")
    ap.add_argument("--warmup", type=int, default=4, help="optimizer steps before profiling (compilation included)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps profiled")
    ap.add_argument("--lora-kernel", default="auto", choices=("auto", "fused", "peft"),
                    help="the speed plan's LoRA linear (auto: PEFT's on a GPU; fused: lorad's one-node kernel)")
    ap.add_argument("--lora-dropout", type=float, default=None, help="override train.lora_dropout (default 0.05)")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import train_speed as ts
    from bench.train_speed_arms import ALL_LINEAR, lora_flops_per_token
    from daemon.config import TrainConfig
    from pipelines.train import train

    load_start = _common.host_load()
    model = ts.build_random_llama(torch.bfloat16, ts.dev())
    data = ts.records(4000, ts.SHAPE_7B["vocab_size"])
    extra = {"lora_dropout": args.lora_dropout} if args.lora_dropout is not None else {}
    cfg = TrainConfig(checkpoint_every_steps=10**6, max_wall_seconds=10**6, **extra)
    cuda = torch.cuda.is_available()   # on a CPU (a smoke test with LORAD_BENCH_TINY=1) the ops stand for kernels
    prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    marks: list[tuple[float, int]] = []

    def on_step(record: dict) -> None:
        ts.cuda_sync()
        marks.append((time.perf_counter(), record["tokens"]))
        if len(marks) == args.warmup:
            prof.start()
        elif len(marks) == args.warmup + args.steps:
            prof.stop()

    with tempfile.TemporaryDirectory() as tmp:
        out = train(data, run_dir=Path(tmp), model=model, tokenizer=ts.StubTokenizer(), cfg=cfg, max_seq_len=2048,
                    max_steps=args.warmup + args.steps, progress=False, on_step=on_step,
                    compile_layers=not args.eager, lora_kernel=args.lora_kernel)
    a, b = marks[args.warmup - 1], marks[-1]
    wall_ms = (b[0] - a[0]) / args.steps * 1000
    tokens = (b[1] - a[1]) / args.steps
    kernels = [(ev.name, ev.time_range.start, ev.time_range.elapsed_us()) for ev in prof.events()
               if ev.device_type == (torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU)]
    table = summarize_kernels(kernels, args.steps)
    lengths = [len(r["input_ids"]) for r in data]
    flops = lora_flops_per_token(ts.SHAPE_7B, lengths, targets=ALL_LINEAR) * tokens
    matmul_ms = table["groups"].get("matmul", {}).get("ms_per_step") or 0
    doc = {"benchmark": "profile_train", "git": {"commit": _common.commit(), "dirty": _common.dirty()},
           "card": torch.cuda.get_device_name(0) if cuda else "cpu",
           "load": {"start": load_start, "end": _common.host_load()}, "compiled": not args.eager,
           "lora_dropout": cfg.lora_dropout, "plan": out.speed, "warmup_steps": args.warmup,
           "profiled_steps": args.steps,
           "tokens_per_step": tokens, "wall_ms_per_step": wall_ms, "tokens_per_second": tokens / wall_ms * 1000,
           "useful_tflops": {"over_wall": flops / wall_ms / 1e9,
                             "over_matmul_kernels": flops / matmul_ms / 1e9 if matmul_ms else None},
           **table}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("card", "compiled", "lora_dropout", "plan", "tokens_per_second",
                                          "wall_ms_per_step", "kernel_ms_per_step", "busy_ms_per_step",
                                          "useful_tflops")}, indent=1))
    for g, v in doc["groups"].items():
        print(f"  {g:<12} {v['ms_per_step']:9.1f} ms/step  {v['share']:.1%}")
    return doc


if __name__ == "__main__":
    main()
