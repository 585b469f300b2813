"""Where a decode step's time goes on a GPU: kernel times of one step, and the skinny matmuls against the bandwidth.

Diagnostic, not a benchmark of record: ``bench/serve_speed.py`` measures the numbers the docs quote; this shows
why they are what they are.

    python bench/profile_step.py --shape 7b --out profile.json

For the chosen shape (random bf16 weights, engine defaults, 32 rows at ``--position``) it writes:
  kernels   the CUDA kernels of one decode step run eagerly (the compiled layers, no graph), grouped by name,
            with their total time per step and count; the step's kernel time and the graph replay's wall time;
  linears   every distinct Linear shape of the step as ``F.linear(x[rows, in], W[out, in])`` timed alone,
            as effective bandwidth (weight bytes / time) against a measured device copy; and the same product
            with the LoRA A columns split off (what a joint weight+A matrix costs or saves).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serve_speed as ss  # noqa: E402


def copy_bandwidth() -> float:
    import torch

    a = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 20 / (time.perf_counter() - t0)


def timed(fn, reps: int = 50) -> float:
    """Seconds per call of ``fn`` (CUDA events, after warm-up)."""
    import torch

    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1000


def kernel_table(stepper, batch: int, context: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    key = ("decode", batch, 1, context)
    with torch.no_grad():
        for _ in range(3):
            stepper._body(key)
        torch.cuda.synchronize()
        steps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                stepper._body(key)
            torch.cuda.synchronize()
    by_name: dict = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0)
            by_name[ev.name][0] += t / steps / 1000  # ms per step
            by_name[ev.name][1] += 1 / steps
    rows = sorted(([n[:160], round(v[0], 4), round(v[1], 1)] for n, v in by_name.items()), key=lambda r: -r[1])
    return {"kernel_ms_per_step": round(sum(r[1] for r in rows), 4),
            "kernels_per_step": round(sum(r[2] for r in rows), 1), "top": rows[:30]}


def linear_shapes(model, rows: int) -> list[tuple[int, int, int]]:
    """(out incl. A columns, in, A columns) of each distinct projection a step runs (groups as one)."""
    from daemon.engine.lora import _Group

    seen, out = set(), []
    for m in model.modules():
        group = getattr(m, "group", None)
        if isinstance(group, _Group):
            if id(group) in seen:
                continue
            seen.add(id(group))
            shape = (group.joint.shape[0], group.joint.shape[1], group.joint.shape[0] - group.total_out)
        elif getattr(m, "joint", None) is not None:
            shape = (m.joint.shape[0], m.joint.shape[1], m.joint.shape[0] - m.out_features)
        else:
            continue
        if shape not in out:
            out.append(shape)
    head = model.get_output_embeddings()
    out.append((head.weight.shape[0], head.weight.shape[1], 0))
    return out


def linears(model, rows: int, bandwidth: float) -> list[dict]:
    import torch
    import torch.nn.functional as F

    res = []
    for n, k, cols in linear_shapes(model, rows):
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        joint_s = timed(lambda: F.linear(x, w))
        entry = {"out": n, "in": k, "lora_columns": cols, "joint_us": joint_s * 1e6,
                 "joint_fraction_of_copy_bw": n * k * 2 / joint_s / bandwidth}
        if cols:
            wb, wa = w[:n - cols].contiguous(), w[n - cols:].contiguous()
            split_s = timed(lambda: (F.linear(x, wb), F.linear(x, wa)))
            base_s = timed(lambda: F.linear(x, wb))
            entry.update(split_us=split_s * 1e6, base_only_us=base_s * 1e6,
                         base_only_fraction_of_copy_bw=(n - cols) * k * 2 / base_s / bandwidth)
        res.append(entry)
        del x, w
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("135m", "7b"), default="7b")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--position", type=int, default=200)
    ap.add_argument("--out", default="profile_step.json")
    args = ap.parse_args()
    import torch

    shape = ss.SHAPE_7B if args.shape == "7b" else ss.SHAPE_135M
    bandwidth = copy_bandwidth()
    kw = dict(max_context=512, adapter_slots=4, lora_max_rank=16) if args.shape == "7b" else {}
    eng = ss.engine_(None, shape, **kw).start()
    eng.load_champion()
    stepper = eng.stepper
    out = {"card": torch.cuda.get_device_name(), "shape": args.shape, "rows": args.rows,
           "copy_bandwidth_gb_s": bandwidth / 1e9}
    weight_bytes = sum(p.numel() * p.element_size() for name, p in eng.model.named_parameters()
                       if "embed_tokens" not in name)
    out["weight_bytes"] = weight_bytes
    out["memory_bound_ms"] = weight_bytes / bandwidth * 1000
    out["graph_step_ms"] = ss.step_time_ms(eng, args.rows, position=args.position)

    def profile_now():
        stepper.admit_rows(0, torch.full((args.rows,), 5, dtype=torch.long, device=stepper.device),
                           [args.position] * args.rows, [1] * args.rows)
        return kernel_table(stepper, args.rows, stepper._decode_context(args.position + 1))

    out["eager_step"] = eng.call(profile_now)
    out["linears"] = linears(eng.model, args.rows, bandwidth)
    eng.stop(timeout=10)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "eager_step"}, indent=1))
    print(json.dumps(out["eager_step"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
