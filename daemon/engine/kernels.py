"""The decode attention as one Triton kernel per layer (GPU): append the step's key and value, attend.

Each program takes one (row, KV head): it writes the row's new key and value at the row's position in the
slot cache, then attends the group of query heads sharing that KV head over the row's cached positions
``[0, position)`` plus the new token itself, with an online softmax in float32. The loop stops at the row's
own length (read from device memory), so a step reads the keys and values the rows hold, not a padded
context bucket, and needs neither a mask nor the two cache scatters of the PyTorch path. Rows never share a
program and the reduction order does not depend on the batch, so a row's output is the same whatever else
runs (batch invariant). The kernel is captured in the step's CUDA graph like any other launch.

Used for decode steps on CUDA when Triton imports and the layer has no sliding window; everything else takes
the PyTorch path in ``step.py``.
"""

from __future__ import annotations

import functools
from typing import Any


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
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
            q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, scale, first_slot,
            sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, skc_s, skc_h, skc_t, svc_s, svc_h, svc_t, so_b, so_h,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, DK: tl.constexpr, DK_P: tl.constexpr, DV: tl.constexpr,
            DV_P: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        slot = row + first_slot
        pos = tl.load(pos_ptr + row)
        g = tl.arange(0, GROUP_P)
        dk = tl.arange(0, DK_P)
        dv = tl.arange(0, DV_P)
        g_ok, dk_ok, dv_ok = g < GROUP, dk < DK, dv < DV
        q_heads = head * GROUP + g
        q = tl.load(q_ptr + row * sq_b + q_heads[:, None] * sq_h + dk[None, :],
                    mask=g_ok[:, None] & dk_ok[None, :], other=0.0).to(tl.float32)       # [G, DK]
        k_new = tl.load(k_new_ptr + row * skn_b + head * skn_h + dk, mask=dk_ok, other=0.0)
        v_new = tl.load(v_new_ptr + row * svn_b + head * svn_h + dv, mask=dv_ok, other=0.0)
        k_row = k_cache_ptr + slot * skc_s + head * skc_h
        v_row = v_cache_ptr + slot * svc_s + head * svc_h
        tl.store(k_row + pos * skc_t + dk, k_new.to(k_cache_ptr.dtype.element_ty), mask=dk_ok)
        tl.store(v_row + pos * svc_t + dv, v_new.to(v_cache_ptr.dtype.element_ty), mask=dv_ok)
        # The new token first: it starts the running max, the normaliser and the accumulator. Its key and
        # value are rounded to the cache's dtype, as later steps will read them.
        k_self = k_new.to(k_cache_ptr.dtype.element_ty).to(tl.float32)
        v_self = v_new.to(v_cache_ptr.dtype.element_ty).to(tl.float32)
        m = tl.sum(q * k_self[None, :], axis=1) * scale                                  # [G]
        norm = tl.full([GROUP_P], 1.0, tl.float32)
        acc = tl.zeros([GROUP_P, DV_P], tl.float32) + v_self[None, :]                     # [G, DV]
        for start in range(0, pos, BLOCK):
            t = start + tl.arange(0, BLOCK)
            t_ok = t < pos
            k = tl.load(k_row + t[:, None] * skc_t + dk[None, :], mask=t_ok[:, None] & dk_ok[None, :],
                        other=0.0).to(tl.float32)                                          # [B, DK]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                      # [G, B]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_next = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_next[:, None])
            alpha = tl.exp(m - m_next)
            v = tl.load(v_row + t[:, None] * svc_t + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :],
                        other=0.0).to(tl.float32)                                          # [B, DV]
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            norm = norm * alpha + tl.sum(p, axis=1)
            m = m_next
        out = acc / norm[:, None]
        tl.store(out_ptr + row * so_b + q_heads[:, None] * so_h + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & dv_ok[None, :])

    return decode_attention_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_attention(query: Any, key: Any, value: Any, k_cache: Any, v_cache: Any, positions: Any,
                     first_slot: int, scale: float) -> Any:
    """Append ``key``/``value`` at each row's position and attend.

    Args:
        query: ``[rows, q_heads, 1, dk]``; key / value: ``[rows, kv_heads, 1, dk / dv]`` (the step's new token).
        k_cache / v_cache: the layer's ``[slots, kv_heads, context, dk / dv]`` cache; row ``i`` is slot
            ``first_slot + i``.
        positions: ``[rows, 1]`` (or ``[rows]``) int64 position of each row's new token.
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
    out = torch.empty(rows, 1, q_heads, dv, dtype=query.dtype, device=query.device)
    # Block of positions per loop turn: keep the [group, block, head dim] product near 8k floats.
    block = max(16, min(128, _pow2(8192 // (_pow2(group) * _pow2(max(dk, dv))))))
    _kernel()[(rows, kv_heads)](
        query, key, value, k_cache, v_cache, positions, out, scale, first_slot,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(2),
        GROUP=group, GROUP_P=_pow2(group), DK=dk, DK_P=_pow2(dk), DV=dv, DV_P=_pow2(dv), BLOCK=block,
        num_warps=4)
    return out
