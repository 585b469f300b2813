"""The speed plan: how a run computes on this device; ``plan_speed`` chooses, ``speed_setup`` applies.

Each choice computes the same loss and gradients as the plain path, up to rounding (bench/train_speed.py
measures them):
  - packed attention: each packed example attends only to itself, through varlen flash attention on
    CUDA and one causal SDPA call over the examples padded side by side elsewhere; transformers'
    default builds a dense block mask over each whole row instead, (row length)^2 work on a slow
    masked kernel;
  - on CUDA with a bf16 base: bf16 autocast (LoRA weights and optimizer stay fp32) and
    torch.compile of each decoder layer (compiled once, reused by every layer); a compile
    failure falls back to eager with a warning (pipelines/train/loop.py);
  - on CPU: bf16 autocast where the CPU has bf16 matrix units, one bf16 copy of each frozen linear
    per run, and the fused LoRA linear (pipelines/train/lora.py).
The LM head's fused loss is in pipelines/train/loss.py; QLoRA's lean k-bit preparation in lora.py.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.hardware import is_quantized
from pipelines.train.batches import segment_bounds
from pipelines.train.lora import fusable_lora, fused_lora_forward
from pipelines.train.protocol import TrainingError

PACKED_ATTENTION = "lorad_packed"   # the name registered in transformers' AttentionInterface
# Architectures whose attention goes through transformers' AttentionInterface with plain causal
# attention (no soft-capping): packed attention is exact for them. Others keep the block mask.
_PACKED_ATTENTION_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3"})


@dataclass(frozen=True)
class SpeedPlan:
    """How a run computes; ``plan_speed`` picks it from the device, dtype and model."""

    attention: str            # "flash-varlen" (CUDA), "per-example" (padded SDPA over the packed examples),
    #                           "mask" (transformers' block mask over whole rows: the reference)
    compile_layers: bool      # torch.compile each decoder layer
    autocast: str | None      # "bfloat16" on CUDA with a bf16 base and on CPUs with bf16 matrix units, else None
    lora_kernel: str = "peft"  # "fused": one autograd node per LoRA linear (CPU); "peft": PEFT's own forward

    def to_dict(self) -> dict:
        return asdict(self)


_VARLEN: list = []   # [(varlen_attn, causal keyword arguments)] once looked up; read inside compiled code


def _varlen_attn():
    """torch's varlen flash attention and how this torch release spells "causal", or None without one."""
    if not _VARLEN:
        import inspect

        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.append(None)
        else:
            # torch 2.10+ spells causal as window_size=(-1, 0); earlier releases had is_causal=True.
            causal = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
                      else {"is_causal": True})
            _VARLEN.append((varlen_attn, causal))
    return _VARLEN[0]


# Planned tokens x non-embedding parameters from which compiling the layers repays its warm-up. Measured on one
# H100 with the 7B DeepSeek-LLM shape and the layers compiled with dynamic shapes (bench/results/train_speed_rounds/
# round0_h100.json, clean ac496ac): compiled 17.2k tokens/s after a 113 s warm-up (3 steps and the compilation),
# eager 12.1k after 15 s, so compiling pays from ~4.2M tokens x 6.5e9 non-embedding parameters. (An earlier H200
# run with static shapes, 52 s of warm-up, put it at ~2.1M.) The time a token saves grows with the parameters, so
# smaller models need proportionally more tokens.
COMPILE_MIN_WORK = 2.7e16


def compile_pays(model: Any, tokens: int) -> bool:
    """Whether compiling the decoder layers should repay its warm-up in a run of ``tokens`` tokens
    (``COMPILE_MIN_WORK``); ``train.compile: auto`` asks here before the speed plan's own conditions."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return tokens * params >= COMPILE_MIN_WORK


def plan_speed(model: Any, device: Any, *, attention: str = "auto", compile_layers: str | bool = "auto",
               autocast: str | bool = "auto", max_seq_len: int = 0, lora_kernel: str = "auto") -> SpeedPlan:
    """Choose the fast path for this model on this device; "auto" everywhere is the production default.

    Args:
        attention: "auto" (packed attention where exact, varlen flash on CUDA), "mask" (transformers'
            block mask, the reference), "per-example" or "flash-varlen" (forced).
        compile_layers: "auto" (CUDA, unquantized, varlen flash), True or False.
        autocast: "auto" (bf16 on CUDA when the base is bf16; on a CPU with bf16 units, AMX or AVX512-BF16, when
            the base is fp32 or bf16: ``pipelines.hardware.cpu_bf16_matmul``), True or False.
        max_seq_len: the run's sequence length (a sliding window shorter than it disables packed attention).
        lora_kernel: "auto" (fused on CPU for an unquantized base), "fused" or "peft".
    """
    import torch

    config = getattr(model, "config", None)
    cuda = torch.device(device).type == "cuda"
    dtype = next(model.parameters()).dtype if not is_quantized(model) else getattr(
        config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    window = getattr(config, "sliding_window", None)
    window_active = bool(window) and getattr(config, "use_sliding_window", True) and window < max(max_seq_len, 1)
    exact = (getattr(config, "model_type", None) in _PACKED_ATTENTION_TYPES and not window_active
             and not getattr(config, "attn_logit_softcapping", None)
             and getattr(model, "_supports_attention_backend", False))
    if attention == "auto":
        if not exact:
            attention = "mask"
        elif cuda and dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None:
            attention = "flash-varlen"
        else:
            attention = "per-example"
    elif attention not in ("mask", "per-example", "flash-varlen"):
        raise ValueError(f"attention must be auto, mask, per-example or flash-varlen, got {attention!r}")
    elif attention == "flash-varlen" and not (cuda and _varlen_attn() is not None):
        raise ValueError(f"attention 'flash-varlen' needs CUDA and torch.nn.attention.varlen (torch "
                         f"{torch.__version__} on {device}); use 'per-example' or 'auto'")
    if autocast == "auto":
        if cuda:
            autocast = dtype == torch.bfloat16
        else:
            from pipelines.hardware import cpu_autocast

            autocast = cpu_autocast(model) is not None
    if compile_layers == "auto":
        compile_layers = cuda and attention == "flash-varlen" and not is_quantized(model)
    if lora_kernel == "auto":
        lora_kernel = "fused" if not cuda and not is_quantized(model) else "peft"
    elif lora_kernel not in ("fused", "peft"):
        raise ValueError(f"lora_kernel must be auto, fused or peft, got {lora_kernel!r}")
    return SpeedPlan(attention=attention, compile_layers=bool(compile_layers),
                     autocast="bfloat16" if autocast else None, lora_kernel=lora_kernel)


def packed_attention_kwargs(plan: SpeedPlan, pos_cpu, device: Any, loop: bool | None = None) -> dict:
    """Decoder keyword arguments that tell ``_packed_attention`` where each packed example starts.

    ``loop`` (per-example attention): one SDPA call per example instead of padded batches of them;
    None = on CPU.
    """
    import torch

    if plan.attention == "mask":
        return {}
    bounds = segment_bounds(pos_cpu)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    kwargs = {"lorad_cu_seqlens": torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
              "lorad_max_seqlen": longest}
    if plan.attention == "per-example" and (torch.device(device).type == "cpu" if loop is None else loop):
        # On CPU the attention kernels' time follows the padded work, not the number of calls: one call per
        # example, on views of q/k/v, beats one padded call and needs no gather/scatter.
        width = pos_cpu.shape[-1]
        kwargs["lorad_segments"] = tuple((a // width, a % width, b - a) for a, b in zip(bounds, bounds[1:]))
    elif plan.attention == "per-example":
        groups, inverse = _segment_groups(bounds)
        kwargs["lorad_groups"] = tuple(g.to(device) for g in groups)
        kwargs["lorad_inverse"] = inverse.to(device) if inverse is not None else None
    return kwargs


def _segment_groups(bounds: list[int]):
    """Packed examples as padded [examples x longest] index batches, one SDPA call each.

    One call for all examples is fastest on a GPU while padding stays moderate; past 4x padding,
    examples are grouped by length (within 2x of each group's longest). Pads index one past the
    end (a zero row). Returns the index batches and the permutation that puts the concatenated
    outputs back in stream order (None when they already are).
    """
    import torch

    total = bounds[-1]
    segs = [(b - a, a) for a, b in zip(bounds, bounds[1:])]
    if len(segs) * max(n for n, _ in segs) <= 4 * total:
        grouped = [segs]
    else:
        grouped = []
        for n, a in sorted(segs, key=lambda x: -x[0]):
            if not grouped or n * 2 < grouped[-1][0][0]:
                grouped.append([])
            grouped[-1].append((n, a))
    groups = []
    for g in grouped:
        idx = torch.full((len(g), max(n for n, _ in g)), total, dtype=torch.long)
        for i, (n, a) in enumerate(g):
            idx[i, :n] = torch.arange(a, a + n)
        groups.append(idx)
    if len(groups) == 1:
        return groups, None
    order = torch.cat([g[g < total] for g in groups])
    return groups, torch.argsort(order)


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal attention within each packed example: transformers' attention-interface signature.

    query [B, H, L, D], key/value [B, Hkv, L, D(v)] -> ([B, L, H, Dv], None). The B rows are
    flattened into one stream cut at ``lorad_cu_seqlens``; every example (and pad run) is its own
    causal sequence, exactly what the block-diagonal mask computes, without the (B x L x L) mask.
    """
    import torch
    import torch.nn.functional as F

    cu = kwargs.get("lorad_cu_seqlens")
    if cu is None:   # a forward outside the training loop (no segment offsets): plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **{k: v for k, v in kwargs.items() if k != "is_causal"})
    window = kwargs.get("sliding_window")
    if window is not None and kwargs["lorad_max_seqlen"] > window:
        raise TrainingError(f"packed attention does not implement sliding windows ({window} < "
                            f"{kwargs['lorad_max_seqlen']} tokens); use attention='mask'")
    b, h, length, d = query.shape
    hk, dv = key.shape[1], value.shape[-1]
    scale = scaling if scaling is not None else d ** -0.5
    segments = kwargs.get("lorad_segments")
    if segments is not None:   # one causal call per example, on views of its rows of q, k, v
        p = dropout if module.training else 0.0
        rows: list[list] = [[] for _ in range(b)]
        for row, a, n in segments:
            rows[row].append(F.scaled_dot_product_attention(
                query[row:row + 1, :, a:a + n], key[row:row + 1, :, a:a + n], value[row:row + 1, :, a:a + n],
                is_causal=True, scale=scale, dropout_p=p, enable_gqa=hk != h))
        rows = [torch.cat(r, dim=2) if len(r) > 1 else r[0] for r in rows]
        return (torch.cat(rows) if b > 1 else rows[0]).transpose(1, 2), None
    q = query.transpose(1, 2).reshape(b * length, h, d)
    k = key.transpose(1, 2).reshape(b * length, hk, d)
    v = value.transpose(1, 2).reshape(b * length, hk, dv)
    groups = kwargs.get("lorad_groups")
    if groups is None:   # flash-varlen
        if hk != h:
            k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
        if dv < d:   # MLA (DeepSeek V2/V3): flash wants one head size; zero-padded values give the same output
            v = F.pad(v, (0, d - dv))
        out = _flash_varlen(q, k, v, cu, kwargs["lorad_max_seqlen"], scale)[..., :dv]
    else:
        total = b * length
        qz, kz, vz = (torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (q, k, v))   # index `total` = pad
        pieces = []
        for idx in groups:
            o = F.scaled_dot_product_attention(qz[idx].transpose(1, 2), kz[idx].transpose(1, 2),
                                               vz[idx].transpose(1, 2), is_causal=True, scale=scale,
                                               dropout_p=dropout if module.training else 0.0, enable_gqa=hk != h)
            pieces.append(o.transpose(1, 2)[idx < total])   # pads sit after each example: causal never sees them
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if kwargs.get("lorad_inverse") is not None:
            out = out[kwargs["lorad_inverse"]]
    return out.reshape(b, length, h, dv), None


def _flash_varlen(q, k, v, cu, max_len: int, scale: float):
    varlen_attn, causal = _varlen_attn()
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)


def decoder_layers(model: Any) -> list:
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _frozen_linear_forward(module: Any, x):
    """A frozen nn.Linear computed with its bf16 compute copy (cast once per run, not once per call)."""
    import torch.nn.functional as F

    weight = module.lorad_compute_weight
    bias = module.bias.to(weight.dtype) if module.bias is not None else None
    return F.linear(x.to(weight.dtype), weight, bias)


@contextlib.contextmanager
def speed_setup(model: Any, plan: SpeedPlan):
    """Apply the plan to a LoRA-wrapped model for the duration of a run; undo it afterwards."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous_attention = getattr(base.config, "_attn_implementation", None)
    if plan.attention != "mask":
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        base.set_attn_implementation(PACKED_ATTENTION)
    lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if plan.autocast:
        # PEFT casts each LoRA input to the adapter's fp32 dtype (a full fp32 copy of every activation it
        # touches); under autocast the matmuls run in bf16 anyway, so that copy is pure cost.
        for m in lora_layers:
            m.cast_input_dtype_enabled = False
    fused = [m for m in lora_layers if plan.lora_kernel == "fused" and fusable_lora(m)]
    compute_copies = []
    cpu = next(model.parameters()).device.type == "cpu"
    if plan.autocast and cpu:
        # CPU autocast casts a frozen weight to bf16 at every call (its cast cache keeps only weights that
        # require grad): keep one bf16 copy per frozen linear for the run instead.
        dtype = getattr(torch, plan.autocast)
        for m in model.modules():   # (not FSDP's sharded DTensor weights: its mixed-precision policy casts those)
            if (type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.dtype != dtype
                    and not hasattr(m.weight, "full_tensor")):
                m.lorad_compute_weight = m.weight.detach().to(dtype)
                compute_copies.append(m)
                m.forward = functools.partial(_frozen_linear_forward, m)
    for m in fused:
        m.forward = functools.partial(fused_lora_forward, m)
    if plan.compile_layers:
        for layer in decoder_layers(model):
            # dynamic=True: packed micro-batches change their token count, example count (cu_seqlens) and
            # longest example every step; static shapes recompile each layer several times (under DDP every
            # rank's recompile stalls all ranks)
            layer.compile(dynamic=True)
    try:
        yield
    finally:
        uncompile(model)
        for m in lora_layers:
            m.cast_input_dtype_enabled = True
        for m in fused + compute_copies:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("lorad_compute_weight", None)
        if plan.attention != "mask" and previous_attention is not None:
            base.set_attn_implementation(previous_attention)


def uncompile(model: Any) -> None:
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
