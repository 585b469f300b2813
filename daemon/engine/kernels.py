"""The decode step's Triton kernels (GPU): the attention, and the LoRA B product of the per-row tables.

Attention: one Triton kernel per layer appends the step's key and value, then attends.

A first kernel runs one program per (row, KV head, split of the context): split 0 writes the row's new key and
value at the row's position in the slot cache and starts from that token; every split attends the group of
query heads sharing the KV head over its share of the row's cached positions ``[0, position)``, with an
online softmax in float32, and stops at the row's own length (read from device memory). A second kernel
merges the splits (flash decoding). So a step reads the keys and values the rows hold, not a padded context
bucket, needs neither a mask nor the two cache scatters of the PyTorch path, and spreads a long context over
many programs. Rows never share a program and the split layout depends only on the cache size, so a row's
output is the same whatever else runs (batch invariant). Both kernels are captured in the step's CUDA graph
like any other launch.

Used for decode steps on CUDA when Triton imports and the layer has no sliding window; everything else takes
the PyTorch path in ``step.py``.

LoRA B (``lora_b_add``): ``y + (h * select) @ B`` for the slot tables of ``lora.py`` in one kernel, where PyTorch
launches three (the mask product, the matmul, the addition): per row, the selection masks the A products of
the other slots, the product with B accumulates in float32 and ``y`` is added before the one rounding. Each
program owns a tile of rows and output columns; its sum over the columns of ``h`` runs in a fixed order, so a
row's result never depends on the other rows (batch invariant). It is a ``torch.library`` custom op, so compiled
layers call it without a graph break.
"""

from __future__ import annotations

import functools
from typing import Any

# The launch's shape: splits = context // positions_per_split (at most max_splits) programs share one (row, KV
# head)'s positions; block = positions per loop iteration (0: from the head sizes); early_v = load the values
# with the keys; dot = scores and values on tensor cores (tl.dot, the query group padded to 16 rows, the
# probabilities rounded to the cache's dtype before the value product, as flash attention does).
# bench/profile_step.py --attention-sweep times the alternatives (CUDA-graph replays, 32 rows at 64, 200 and 448
# cached positions); its results are bench/results/attention_sweep_*.json.
TUNING = {"max_splits": 16, "positions_per_split": 64, "block": 0, "num_warps": 4, "num_stages": 3,
          "early_v": False, "dot": False}
# Overrides of TUNING per head geometry (query heads per KV head, head size): the sweep's winners on an H200
# (bench/results/attention_sweep_*_h200.json), kept only where the engine ran them (bench/serve_speed.py). The
# 135M heads (3, 64) take the CUDA-core winner (33 us against TUNING's 48; in the engine on an H100 the step at
# batch 32 went 2.05 -> 1.94 ms). The tensor-core one (16 us) is left out: an engine run with it on an H200 ended in
# a CUDA launch failure, though two H100 engine runs with it did not (bench/results/serve_speed_step*.json).
TUNED: dict[tuple[int, int], dict] = {
    (1, 128): {"positions_per_split": 128, "block": 32, "num_warps": 1, "num_stages": 1},
    (3, 64): {"positions_per_split": 16, "block": 32, "num_warps": 1, "num_stages": 1, "early_v": True},
}


def tuning_for(group: int, head_dim: int) -> dict:
    """The launch shape for ``group`` query heads per KV head of ``head_dim``: TUNING with its geometry's overrides."""
    return {**TUNING, **TUNED.get((group, head_dim), {})}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Triton imports and a CUDA device is present."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(
            q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, scale,
            first_slot, chunk, sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, skc_s, skc_h, skc_t, svc_s, svc_h, svc_t,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, DK: tl.constexpr, DK_P: tl.constexpr, DV: tl.constexpr,
            DV_P: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, EARLY_V: tl.constexpr, DOT: tl.constexpr):
        """One (row, KV head, split): softmax state over the split's cached positions below the row's own."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        slot = row + first_slot
        pos = tl.load(pos_ptr + row)
        g = tl.arange(0, GROUP_P)
        dk = tl.arange(0, DK_P)
        dv = tl.arange(0, DV_P)
        g_ok, dk_ok, dv_ok = g < GROUP, dk < DK, dv < DV
        q_heads = head * GROUP + g
        q_in = tl.load(q_ptr + row * sq_b + q_heads[:, None] * sq_h + dk[None, :],
                       mask=g_ok[:, None] & dk_ok[None, :], other=0.0)                    # [G, DK]
        q = q_in.to(tl.float32)
        k_row = k_cache_ptr + slot * skc_s + head * skc_h
        v_row = v_cache_ptr + slot * svc_s + head * svc_h
        if split == 0:
            # The new token: split 0 appends it to the cache and starts its softmax state with it. Its key and
            # value are rounded to the cache's dtype, as later steps will read them. No program reads position
            # ``pos`` from memory in this step, so the store races with nothing.
            k_new = tl.load(k_new_ptr + row * skn_b + head * skn_h + dk, mask=dk_ok, other=0.0)
            v_new = tl.load(v_new_ptr + row * svn_b + head * svn_h + dv, mask=dv_ok, other=0.0)
            # (through float32, which every target type converts from: a float8 cache rounds it once, RNE)
            k_self = k_new.to(tl.float32).to(k_cache_ptr.dtype.element_ty)
            v_self = v_new.to(tl.float32).to(v_cache_ptr.dtype.element_ty)
            tl.store(k_row + pos * skc_t + dk, k_self, mask=dk_ok)
            tl.store(v_row + pos * svc_t + dv, v_self, mask=dv_ok)
            m = tl.sum(q * k_self.to(tl.float32)[None, :], axis=1) * scale               # [G]
            norm = tl.full([GROUP_P], 1.0, tl.float32)
            acc = tl.zeros([GROUP_P, DV_P], tl.float32) + v_self.to(tl.float32)[None, :]  # [G, DV]
        else:
            m = tl.full([GROUP_P], float("-inf"), tl.float32)
            norm = tl.zeros([GROUP_P], tl.float32)
            acc = tl.zeros([GROUP_P, DV_P], tl.float32)
        lo = split * chunk
        hi = tl.minimum(pos, lo + chunk)
        for start in range(lo, hi, BLOCK):
            t = start + tl.arange(0, BLOCK)
            t_ok = t < hi
            k = tl.load(k_row + t[:, None] * skc_t + dk[None, :], mask=t_ok[:, None] & dk_ok[None, :],
                        other=0.0)                                                         # [B, DK]
            if EARLY_V:  # issue the value load before the scores need the keys (overlaps the two reads)
                v = tl.load(v_row + t[:, None] * svc_t + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :],
                            other=0.0)                                                     # [B, DV]
            if DOT:  # tensor cores (the group padded to 16 rows), float32 accumulation
                s = tl.dot(q_in, tl.trans(k.to(q_in.dtype))) * scale                       # [G, B]
            else:    # CUDA cores, float32 throughout
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_next = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_next[:, None])
            alpha = tl.exp(m - m_next)
            if not EARLY_V:
                v = tl.load(v_row + t[:, None] * svc_t + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :],
                            other=0.0)                                                     # [B, DV]
            if DOT:  # in the query's dtype (a float8 cache's values are widened first)
                pv = tl.dot(p.to(q_in.dtype), v.to(q_in.dtype))
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            norm = norm * alpha + tl.sum(p, axis=1)
            m = m_next
        state = (row * (GROUP * tl.num_programs(1)) + q_heads) * SPLITS + split             # [G]
        tl.store(m_ptr + state, m, mask=g_ok)
        tl.store(l_ptr + state, norm, mask=g_ok)
        tl.store(acc_ptr + state[:, None] * DV + dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])

    @triton.jit
    def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h, DV: tl.constexpr, DV_P: tl.constexpr,
                       SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
        """One (row, query head): merge its splits' softmax states into the output."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS_P)
        dv = tl.arange(0, DV_P)
        sp_ok, dv_ok = sp < SPLITS, dv < DV
        state = (row * tl.num_programs(1) + head) * SPLITS + sp
        m = tl.load(m_ptr + state, mask=sp_ok, other=float("-inf"))
        norm = tl.load(l_ptr + state, mask=sp_ok, other=0.0)
        acc = tl.load(acc_ptr + state[:, None] * DV + dv[None, :], mask=sp_ok[:, None] & dv_ok[None, :], other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))         # split 0 always holds the new token: the max is finite
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(norm * weight, axis=0)
        tl.store(out_ptr + row * so_b + head * so_h + dv, out.to(out_ptr.dtype.element_ty), mask=dv_ok)

    return partial_kernel, combine_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_attention(query: Any, key: Any, value: Any, k_cache: Any, v_cache: Any, positions: Any,
                     first_slot: int, scale: float, *, tuning: dict | None = None) -> Any:
    """Append ``key``/``value`` at each row's position and attend.

    Args:
        query: ``[rows, q_heads, 1, dk]``; key / value: ``[rows, kv_heads, 1, dk / dv]`` (the step's new token).
        k_cache / v_cache: the layer's ``[slots, kv_heads, context, dk / dv]`` cache; row ``i`` is slot
            ``first_slot + i``.
        positions: ``[rows, 1]`` (or ``[rows]``) int64 position of each row's new token.
        tuning: overrides of ``tuning_for(group, dk)`` (``bench/profile_step.py --attention-sweep`` times them).
    Returns:
        ``[rows, 1, q_heads, dv]`` in the query's dtype (the layout transformers' attention returns).
    """
    import torch

    rows, q_heads, _, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    group = q_heads // kv_heads
    for t in (query, key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("decode attention needs the head dimension contiguous")
    context = k_cache.shape[2]
    tune = {**tuning_for(group, dk), **(tuning or {})}
    # Split the positions across programs (flash decoding): a long context is read by many programs at once,
    # and splits past a row's own length exit at once. One program per (row, head) would read serially.
    splits = max(1, min(tune["max_splits"], context // tune["positions_per_split"]))
    dot = bool(tune["dot"])
    block = tune["block"] or max(16, min(128, _pow2(8192 // (_pow2(group) * _pow2(max(dk, dv))))))
    chunk = -(-context // splits)
    chunk = -(-chunk // block) * block
    m = torch.empty(rows, q_heads, splits, dtype=torch.float32, device=query.device)
    norm = torch.empty_like(m)
    acc = torch.empty(rows, q_heads, splits, dv, dtype=torch.float32, device=query.device)
    out = torch.empty(rows, 1, q_heads, dv, dtype=query.dtype, device=query.device)
    partial_kernel, combine_kernel = _kernels()
    partial_kernel[(rows, kv_heads, splits)](
        query, key, value, k_cache, v_cache, positions, m, norm, acc, scale, first_slot, chunk,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        GROUP=group, GROUP_P=max(16, _pow2(group)) if dot else _pow2(group), DK=dk, DK_P=_pow2(dk), DV=dv,
        DV_P=_pow2(dv), BLOCK=block, SPLITS=splits, EARLY_V=tune["early_v"], DOT=dot, num_warps=tune["num_warps"],
        num_stages=tune["num_stages"])
    combine_kernel[(rows, q_heads)](m, norm, acc, out, out.stride(0), out.stride(2), DV=dv, DV_P=_pow2(dv),
                                    SPLITS=splits, SPLITS_P=_pow2(splits), num_warps=1)
    return out


# LoRA B tiles: output columns per program, A columns per loop step, warps. Chosen by hand, not swept: at the
# 7B shape 64 columns give 64-344 programs for 4,096-22,016 outputs, enough to spread one B table over the SMs.
LORA_B_TUNING = {"block_n": 64, "block_k": 64, "num_warps": 4}
# A projection group's B is block-diagonal: tiles read only their members' rows (bench/serve_speed.py
# --lora-b-skip off reads every row, to compare).
SKIP_ZERO_BLOCKS = True


@functools.lru_cache(maxsize=1)
def _lora_b_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_b_kernel(y_ptr, h_ptr, sel_ptr, b_ptr, out_ptr, M, N, K, C, T, B1, B2, CB, sy_m, sh_m, ss_r, sb_k,
                      so_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows [BLOCK_M tile] x columns [BLOCK_N tile] of y + (h * select) @ B. Output columns below B1 belong
        to member 0, below B2 to member 1, then member 2; member i's B rows are [i * CB, (i + 1) * CB) and its
        other rows are zero (block-diagonal), so the tile reads only its members' rows."""
        n0 = tl.program_id(0) * BLOCK_N
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        sel_row = rm // T  # the request row of each token row (a prefill row holds T tokens)
        n1 = tl.minimum(n0 + BLOCK_N, N) - 1
        k_lo = ((n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32)) * CB
        k_hi = tl.minimum(((n1 >= B1).to(tl.int32) + (n1 >= B2).to(tl.int32) + 1) * CB, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_hi
            hk = tl.load(h_ptr + rm[:, None] * sh_m + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            sk = tl.load(sel_ptr + sel_row[:, None] * ss_r + (rk % C)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            bk = tl.load(b_ptr + rk[:, None] * sb_k + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot((hk * sk).to(bk.dtype), bk)
        tile = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptr + rm[:, None] * sy_m + rn[None, :], mask=tile, other=0.0)
        out = y.to(tl.float32) + acc
        tl.store(out_ptr + rm[:, None] * so_m + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=tile)

    return lora_b_kernel


def _lora_b_launch(y: Any, h: Any, select: Any, lora_b: Any, tokens: int, b1: int, b2: int, cb: int) -> Any:
    import torch

    y, h, select, lora_b = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, h, select, lora_b))
    m, n = y.shape
    k, c = h.shape[1], select.shape[1]
    out = torch.empty((m, n), dtype=y.dtype, device=y.device)
    tune = LORA_B_TUNING
    block_m = 16 if m <= 16 else 32
    grid = (-(-n // tune["block_n"]), -(-m // block_m))
    _lora_b_kernel()[grid](y, h, select, lora_b, out, m, n, k, c, tokens, b1, b2, cb, y.stride(0), h.stride(0),
                           select.stride(0), lora_b.stride(0), out.stride(0), BLOCK_M=block_m,
                           BLOCK_N=tune["block_n"], BLOCK_K=tune["block_k"], num_warps=tune["num_warps"])
    return out


@functools.lru_cache(maxsize=1)
def register_lora_b():
    """Register the ``lorad::lora_b_add`` op (once; outside compiled code: wrap_linears and lora_b_add do)."""
    import torch

    # the schema spelled out: this module's annotations are strings (``from __future__ import annotations``)
    @torch.library.custom_op("lorad::lora_b_add", mutates_args=(),
                             schema="(Tensor y, Tensor h, Tensor select, Tensor lora_b, SymInt tokens, int b1, int b2, "
                                    "int cb) -> Tensor")
    def lora_b_add_op(y, h, select, lora_b, tokens, b1, b2, cb):
        return _lora_b_launch(y, h, select, lora_b, tokens, b1, b2, cb)

    @lora_b_add_op.register_fake
    def _(y, h, select, lora_b, tokens, b1, b2, cb):
        return y.new_empty(y.shape)

    return lora_b_add_op


def lora_b_add(y: Any, h: Any, select: Any, lora_b: Any, splits: list[int] | None = None) -> Any:
    """``y + (h * select.repeat(...)) @ lora_b`` in one kernel (see the module docstring).

    Args:
        y: ``[rows, T, N]`` (any row stride, unit column stride): the base output.
        h: ``[rows, T, K]``: the A products of every slot (K = members x C for a projection group).
        select: ``[rows, 1, C]``: 1 on the columns of each row's slot, 0 elsewhere (``lora.selection``).
        lora_b: ``[K, N]`` (unit column stride); for a group, block-diagonal: member i's output columns
            (``splits[i]`` of them, in order) read only its rows ``[i * C, (i + 1) * C)``.
        splits: a group's output widths; with ``SKIP_ZERO_BLOCKS`` (and at most 3 members) each tile reads only
            its members' rows of ``lora_b``, skipping zeros (the same result: a zero product adds nothing).
    Returns:
        ``[rows, T, N]``, contiguous, in ``y``'s dtype.
    """
    import torch

    if not torch.compiler.is_compiling():
        register_lora_b()
    rows, tokens, n = y.shape
    k, c = h.shape[-1], select.shape[-1]
    b1 = b2 = n
    cb = k
    if splits and SKIP_ZERO_BLOCKS and 2 <= len(splits) <= 3 and len(splits) * c == k:
        b1 = splits[0]
        b2 = splits[0] + splits[1] if len(splits) == 3 else n
        cb = c
    out = torch.ops.lorad.lora_b_add(y.reshape(rows * tokens, n), h.reshape(rows * tokens, k),
                                     select.reshape(select.shape[0], c), lora_b, tokens, b1, b2, cb)
    return out.view(rows, tokens, n)
