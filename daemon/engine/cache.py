"""The preallocated KV cache: ``slots`` rows × ``context`` positions per layer, sized from the device.

Layout per layer: keys ``[slots, kv_heads, context, k_dim]`` and values ``[slots, kv_heads, context, v_dim]``
(MLA models such as DeepSeek-V3 have k_dim != v_dim). Running requests always occupy slots ``0..n-1``: a
request that finishes hands its slot to the last running one (``move``), so a decode step reads one
contiguous ``[:n]`` slice and never gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Context lengths the attention reads are rounded up to a power of two from this floor: few CUDA graphs,
# and a step never reads more than twice the positions it needs.
MIN_CONTEXT_BUCKET = 64
# serve.kv_cache_dtype: "auto" keeps the model's dtype; "bfloat16" halves a float32 model's cache; "float8_e4m3"
# stores a value in one byte (torch's float8_e4m3fn: 3 mantissa bits, saturating at +-448, no scales), half of
# bf16's memory and of a step's reads.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float8_e4m3")


def cache_dtype(name: str, model_dtype: Any) -> Any:
    """The torch dtype of a ``serve.kv_cache_dtype`` setting."""
    import torch

    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
    return {"float8_e4m3": torch.float8_e4m3fn, "bfloat16": torch.bfloat16}.get(name, model_dtype)


def stored(t: Any) -> Any:
    """``t`` as the bytes it is stored in where PyTorch lacks a float8 kernel (scatter, fill): a uint8 view of a
    float8 tensor, else ``t`` itself."""
    import torch

    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer stores per token."""

    kv_heads: int
    k_dim: int
    v_dim: int
    sliding_window: int | None = None


def plan_slots(*, bytes_per_token: int, context: int, max_batch_size: int, device_type: str,
               free_bytes: int | None, kv_cache_fraction: float, kv_cache_tokens: int) -> int:
    """How many request slots the cache gets: ``max_batch_size``, or fewer when memory runs short.

    Args:
        bytes_per_token: K and V bytes of one position, all layers together.
        context: positions per slot.
        free_bytes: free device memory (GPU), or None on a CPU.
        kv_cache_fraction: share of the free GPU memory the cache may take.
        kv_cache_tokens: CPU budget in cached positions, all slots together.
    Raises:
        ValueError: not even one slot fits; the message says which setting to change.
    """
    if device_type == "cuda" and free_bytes is not None:
        budget = int(free_bytes * kv_cache_fraction) // bytes_per_token
        what = (f"serve.kv_cache_fraction={kv_cache_fraction} of {free_bytes / 2**30:.1f} GiB free holds "
                f"{budget} positions")
    else:
        budget = kv_cache_tokens
        what = f"serve.kv_cache_tokens={kv_cache_tokens}"
    slots = min(max_batch_size, budget // context)
    if slots < 1:
        raise ValueError(f"the KV cache cannot hold one request of {context} positions: {what}; raise it or "
                         f"lower serve.max_prompt_tokens + serve.max_new_tokens (the per-request context)")
    return slots


def context_buckets(context: int) -> list[int]:
    """Powers of two from MIN_CONTEXT_BUCKET up to ``context`` (always included)."""
    out, size = [], MIN_CONTEXT_BUCKET
    while size < context:
        out.append(size)
        size *= 2
    return out + [context]


def batch_buckets(slots: int) -> list[int]:
    """1, 2, 4, 8, ... up to ``slots`` (always included): the batch sizes decode steps are padded to."""
    out, size = [], 1
    while size < slots:
        out.append(size)
        size *= 2
    return out + [slots]


def bucket(value: int, buckets: list[int]) -> int:
    """The smallest bucket >= value."""
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def zeros(shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """A zero tensor; on a CPU taken from calloc (numpy), whose pages the kernel zero-fills on their first write, so
    a KV cache costs neither startup time nor resident memory until its positions are used (the CPU defaults'
    65,536 positions of the 135M model are 2.8 GiB: ``torch.zeros`` wrote them all, 5.9 s on the loaded dev VM)."""
    import math

    import torch

    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    """Keys and values of every slot, per layer, allocated once (zeros: masked positions must be finite)."""

    def __init__(self, layers: dict[int, LayerShape], *, slots: int, context: int, dtype: Any, device: Any):
        import torch

        self.layers = layers
        self.slots = slots
        self.context = context
        self.keys: dict[int, Any] = {}
        self.values: dict[int, Any] = {}
        with torch.no_grad():
            for i, shape in layers.items():
                self.keys[i] = zeros((slots, shape.kv_heads, context, shape.k_dim), dtype, device)
                self.values[i] = zeros((slots, shape.kv_heads, context, shape.v_dim), dtype, device)
        self.context_buckets = context_buckets(context)
        self.batch_buckets = batch_buckets(slots)

    @property
    def capacity_tokens(self) -> int:
        return self.slots * self.context

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (compaction)."""
        if src == dst or length <= 0:
            return
        for store in (self.keys, self.values):
            for t in store.values():
                t[dst, :, :length].copy_(t[src, :, :length])

    def clear(self, slot: int) -> None:
        """Zero a slot, so values a failed request left (NaN, inf) never meet a masked softmax weight."""
        for store in (self.keys, self.values):
            for t in store.values():
                stored(t[slot]).zero_()
