"""Where a decode step's time goes on a GPU: kernel times of one step, and the skinny matmuls against the bandwidth.

Diagnostic, not a benchmark of record: ``bench/serve_speed.py`` measures the numbers the docs quote; this shows
why they are what they are.

    python bench/profile_step.py --shape 7b --out profile.json

For the chosen shape (random bf16 weights, engine defaults, 32 rows at ``--position``) it writes:
  kernels   the CUDA kernels of one decode step run eagerly (the compiled layers, no graph), grouped by name,
            with their total time per step and count; the step's kernel time and the graph replay's wall time;
  linears   every distinct matmul shape of the step in the engine's GPU layout (``x[rows, in] @ W[in, out]``,
            out padded to 128), replayed from a CUDA graph over copies of the weight that L2 cannot hold, as
            effective bandwidth (weight bytes / time) against a measured device copy: cuBLAS, cuBLASLt
            preferred, and a candidate split-K Triton matmul (``splitk_matmul``, its tile shapes swept), with its
            error.

``--linears-only`` skips the engine (seconds instead of a minute): only the matmul table, for the 7B shapes.
``--attention-sweep`` times the Triton decode attention (daemon/engine/kernels.py) alone on the shape's KV cache
for launch shapes around ``kernels.tuning_for`` the shape's heads (coordinate search, two passes), replayed from
a CUDA graph as in a step, as KV bytes read per second against the copy, and checks each against the defaults' output.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common  # noqa: E402
from bench import serve_speed as ss  # noqa: E402


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


def graph_timed(fn, calls: int = 20, replays: int = 20) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls: the device's time without the
    host's launch cost (a step runs its kernels from a graph too; timed from Python, a small kernel measures
    only the host's ~60 us of launch overhead)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls) / 1000


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
    rows = _common.kernels_per_step(((ev.name, getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0))
                                     for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                                    steps, top=10**9, digits=4)
    return {"kernel_ms_per_step": round(sum(r[1] for r in rows), 4),
            "kernels_per_step": round(sum(r[2] for r in rows), 1), "top": rows[:30]}


def linear_shapes(model, rows: int) -> list[tuple[int, int, int]]:
    """(out incl. A columns, in, A columns) of each distinct projection a step runs (groups as one)."""
    from daemon.engine.lora import _Group, joint_shape

    seen, out = set(), []
    for m in model.modules():
        group = getattr(m, "group", None)
        if isinstance(group, _Group):
            if id(group) in seen:
                continue
            seen.add(id(group))
            rows, width = joint_shape(group.joint, group.transposed)
            shape = (rows, width, rows - group.total_out)
        elif getattr(m, "joint", None) is not None:
            rows, width = joint_shape(m.joint, m.transposed)
            shape = (rows, width, rows - m.out_features)
        else:
            continue
        if shape not in out:
            out.append(shape)
    head = model.get_output_embeddings()
    out.append((head.weight.shape[0], head.weight.shape[1], 0))
    return out


@functools.lru_cache(maxsize=1)
def _splitk_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, k_per_split, sxm, swk, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """One (N tile, K split): x[:, k-range] @ w[k-range, n-tile] (w stored [in, out] as the engine's GPU
        layout); one split stores the rounded result, several store float32 partials for _reduce_kernel."""
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k in range(k_lo, k_hi, BLOCK_K):
            rk = k + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_hi),
                         other=0.0)
            wk = tl.load(w_ptr + rk[:, None] * swk + rn[None, :], mask=(rk[:, None] < k_hi) & (rn[None, :] < N),
                         other=0.0)
            acc += tl.dot(xk, wk)
        tile = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT:
            tl.store(part_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=tile)
        else:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def reduce_kernel(part_ptr, out_ptr, MN, S: tl.constexpr, BLOCK: tl.constexpr):
        """out = the splits' partials summed in a fixed order, rounded once."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(S):
            acc += tl.load(part_ptr + s * MN + r, mask=ok, other=0.0)
        tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return kernel, reduce_kernel


def splitk_matmul(x, w, block_n: int = 64, block_k: int = 128, splits: int = 1, stages: int = 4, warps: int = 4):
    """``x [M, K] @ w [K, N]`` for small M (w in the engine's transposed GPU layout): N tiles times K splits
    programs stream the weight (cuBLAS leaves SMs idle where N / its tile is below the SM count), partial sums in
    float32 reduced in a fixed order (deterministic). A candidate for the decode step's skinny matmuls, measured
    here first."""
    import torch
    import triton

    m, k = x.shape
    n = w.shape[1]
    block_m = max(16, triton.next_power_of_2(m))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    kernel, reduce_kernel = _splitk_kernel()
    kernel[(triton.cdiv(n, block_n), splits)](x, w, out, part, m, n, k, k_per_split, x.stride(0), w.stride(0),
                                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=splits > 1,
                                              num_warps=warps, num_stages=stages)
    if splits > 1:
        reduce_kernel[(triton.cdiv(m * n, 1024),)](part, out, m * n, S=splits, BLOCK=1024)
    return out


SPLITK_CONFIGS = [dict(block_n=bn, block_k=bk, splits=s, stages=st) for bn in (32, 64, 128) for bk in (64, 128, 256)
                  for s in (1, 2, 4) for st in (3, 5)]


def shape_linears(shape: dict, slots: int = 4, r_max: int = 16) -> list[tuple[int, int, int]]:
    """The step's matmuls for a Llama ``shape`` as the engine builds them (merged groups, joint A columns)."""
    h, i, c = shape["hidden_size"], shape["intermediate_size"], slots * r_max
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    return [(h + 2 * kv + 3 * c, h, 3 * c), (h + c, h, c), (2 * i + 2 * c, h, 2 * c), (h + c, i, c),
            (shape["vocab_size"], h, 0)]


def linears(shapes: list[tuple[int, int, int]], rows: int, bandwidth: float, pad: int = 128,
            splitk: bool = True) -> list[dict]:
    """Each matmul as the engine's GPU layout runs it (``x [rows, in] @ W [in, out padded to pad]``), replayed from
    a CUDA graph over enough copies of the weight that L2 holds none (one 7B o_proj fits the H100's 50 MB):
    cuBLAS as the engine calls it, cuBLASLt preferred, the same in the row layout (``F.linear``, ``W [out, in]``),
    and the split-K Triton candidate's tile shapes (``splitk``)."""
    import itertools

    import torch
    import torch.nn.functional as F

    res = []
    for n, k, cols in shapes:
        n_pad = -(-n // pad) * pad
        nbytes = n_pad * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        ws = [torch.randn(k, n_pad, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        calls = copies * max(1, 24 // copies)

        def run(f):
            it = itertools.cycle(ws)
            return graph_timed(lambda: f(x, next(it)), calls=calls, replays=10)

        entry = {"out": n, "out_padded": n_pad, "in": k, "lora_columns": cols, "weight_copies": copies}
        cublas_s = run(torch.matmul)
        entry.update(cublas_us=cublas_s * 1e6, cublas_fraction_of_copy_bw=nbytes / cublas_s / bandwidth)
        # the row layout ([out, in], unpadded: the CPU's, and the GPU's before the transposed one)
        ws_rows = [w[:, :n].t().contiguous() for w in ws]
        it_rows = itertools.cycle(ws_rows)
        rows_s = graph_timed(lambda: F.linear(x, next(it_rows)), calls=calls, replays=10)
        entry.update(rows_cublas_us=rows_s * 1e6, rows_cublas_fraction_of_copy_bw=n * k * 2 / rows_s / bandwidth)
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            lt_s = run(torch.matmul)
            entry.update(cublaslt_us=lt_s * 1e6, cublaslt_fraction_of_copy_bw=nbytes / lt_s / bandwidth)
            it_rows = itertools.cycle(ws_rows)
            rows_s = graph_timed(lambda: F.linear(x, next(it_rows)), calls=calls, replays=10)
            entry.update(rows_cublaslt_us=rows_s * 1e6,
                         rows_cublaslt_fraction_of_copy_bw=n * k * 2 / rows_s / bandwidth)
        finally:
            torch.backends.cuda.preferred_blas_library("default")
        del ws_rows
        if not splitk:
            res.append(entry)
            print(json.dumps(entry), flush=True)
            continue
        ref = (x @ ws[0]).float()
        best, table = None, []
        for cfg in SPLITK_CONFIGS:
            try:
                got = splitk_matmul(x, ws[0], **cfg)
                err = float((got.float() - ref).abs().max() / ref.abs().max())
                us = run(lambda a, b: splitk_matmul(a, b, **cfg)) * 1e6
            except Exception as e:  # noqa: BLE001 - a tile shape the card cannot run is skipped
                entry.setdefault("splitk_errors", []).append(f"{cfg}: {type(e).__name__}: {e}"[:120])
                continue
            table.append([cfg, round(us, 2)])
            if best is None or us < best["us"]:
                best = {"us": us, "config": cfg, "max_rel_error": err,
                        "fraction_of_copy_bw": nbytes / (us / 1e6) / bandwidth}
        entry["splitk_best"] = best
        entry["splitk_table"] = sorted(table, key=lambda r: r[1])[:10]
        res.append(entry)
        print(json.dumps({k2: v for k2, v in entry.items() if k2 not in ("splitk_table", "splitk_errors")}), flush=True)
        x = ws = None  # noqa: F841 - frees the copies before the next shape
        torch.cuda.empty_cache()
    return res


ATTENTION_CHOICES = {"max_splits": (8, 16, 32), "positions_per_split": (16, 32, 64, 128, 256),
                     "block": (0, 16, 32, 128), "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3, 4),
                     "early_v": (False, True), "dot": (False, True)}


def attention_sweep(shape: dict, rows: int, positions: list[int], bandwidth: float, context: int = 512) -> dict:
    """The decode attention alone at ``rows`` rows, per launch shape: the time summed over ``positions`` (cached
    positions per row; one setting must serve every length), each against the KV bytes it reads."""
    import torch

    from daemon.engine import kernels

    kv_heads, q_heads = shape["num_key_value_heads"], shape["num_attention_heads"]
    d = shape["hidden_size"] // q_heads
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g, device="cuda", dtype=torch.bfloat16)

    k_cache, v_cache = rnd(rows, kv_heads, context, d), rnd(rows, kv_heads, context, d)
    query, key, value = rnd(rows, q_heads, 1, d), rnd(rows, kv_heads, 1, d), rnd(rows, kv_heads, 1, d)
    at = {p: torch.full((rows, 1), p, dtype=torch.long, device="cuda") for p in positions}

    def run(tuning, p):
        return kernels.decode_attention(query, key, value, k_cache, v_cache, at[p], 0, d ** -0.5, tuning=tuning)

    ref = {p: run({}, p).float() for p in positions}
    tried: dict = {}

    def measure(tuning: dict) -> float:
        key_ = json.dumps(tuning, sort_keys=True)
        if key_ not in tried:
            try:
                per = {}
                for p in positions:
                    err = float((run(tuning, p).float() - ref[p]).abs().max())
                    us = graph_timed(functools.partial(run, tuning, p)) * 1e6
                    kv_bytes = 2 * rows * kv_heads * p * d * 2
                    per[p] = {"us": us, "max_abs_error": err, "fraction_of_copy_bw": kv_bytes / (us / 1e6) / bandwidth}
                tried[key_] = {"tuning": tuning, "us": sum(v["us"] for v in per.values()), "positions": per}
            except Exception as e:  # noqa: BLE001 - a launch shape the card cannot run is skipped
                tried[key_] = {"tuning": tuning, "us": float("inf"), "error": f"{type(e).__name__}: {e}"[:200]}
        return tried[key_]["us"]

    best = kernels.tuning_for(q_heads // kv_heads, d)
    default_us = measure(best)
    for _ in range(2):
        for name, values in ATTENTION_CHOICES.items():
            for v in values:
                trial = {**best, name: v}
                if measure(trial) < measure(best):
                    best = trial
    ranked = sorted(tried.values(), key=lambda r: r["us"])
    default = tried[json.dumps(kernels.tuning_for(q_heads // kv_heads, d), sort_keys=True)]
    return {"rows": rows, "positions": positions, "context": context, "default_us": default_us, "default": default,
            "best": ranked[0], "tried": ranked}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("135m", "7b"), default="7b")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--position", type=int, default=200)
    ap.add_argument("--out", default="profile_step.json")
    ap.add_argument("--linears-only", action="store_true", help="only the matmul table (no engine)")
    ap.add_argument("--attention-sweep", action="store_true", help="only the decode attention's launch shapes")
    ap.add_argument("--no-splitk", action="store_true", help="leave the split-K Triton candidate out of the linears")
    args = ap.parse_args()
    import torch

    shape = ss.SHAPE_7B if args.shape == "7b" else ss.SHAPE_135M
    bandwidth = ss.copy_bandwidth()
    git = {"commit": _common.commit(), "dirty": _common.dirty("daemon", "bench"), "load_start": _common.host_load()}
    if args.attention_sweep:
        out = {"git": git, "card": torch.cuda.get_device_name(), "shape": args.shape,
               "copy_bandwidth_gb_s": bandwidth / 1e9,
               "sweep": attention_sweep(shape, args.rows, [64, args.position, 448], bandwidth)}
        Path(args.out).write_text(json.dumps(out, indent=1))
        sw = out["sweep"]
        for name in ("default", "best"):
            print(name, sw[name]["tuning"], round(sw[name]["us"], 1), "us",
                  {p: round(v["fraction_of_copy_bw"], 3) for p, v in sw[name]["positions"].items()})
        return 0
    if args.linears_only:
        out = {"git": git, "card": torch.cuda.get_device_name(), "shape": args.shape, "rows": args.rows,
               "copy_bandwidth_gb_s": bandwidth / 1e9, "linears": linears(shape_linears(shape), args.rows, bandwidth, splitk=not args.no_splitk)}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps(out, indent=1))
        return 0
    kw = dict(max_context=512, adapter_slots=4, lora_max_rank=16) if args.shape == "7b" else {}
    eng = ss.engine_(None, shape, **kw).start()
    eng.load_champion()
    stepper = eng.stepper
    out = {"git": git, "card": torch.cuda.get_device_name(), "shape": args.shape, "rows": args.rows,
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
    out["linears"] = linears(linear_shapes(eng.model, args.rows), args.rows, bandwidth)
    eng.stop(timeout=10)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "eager_step"}, indent=1))
    print(json.dumps(out["eager_step"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
