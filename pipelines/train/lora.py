"""LoRA on the base model: attaching (and warm-starting) the adapter, and the fused LoRA linear used on CPU."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from daemon.config import TrainConfig
from pipelines.hardware import is_quantized
from pipelines.train.protocol import TrainingError


def _prepare_kbit(model: Any) -> None:
    """Freeze a quantized base for LoRA training, without PEFT's prepare_model_for_kbit_training upcast.

    That function copies every non-quantized weight to fp32: on a 7B DeepSeek shape the embeddings and
    the LM head (102400 x 4096 each) alone grow by 1.6 GiB, and every activation downstream of an fp32
    norm turns fp32. bf16 has fp32's range, so a bf16 base keeps its dtypes; only an fp16 base gets its
    1-D weights (norms, biases) in fp32, where fp16's range is the known instability.
    """
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype == torch.float16 and p.dim() == 1:
            p.data = p.data.float()


def attach_lora(model: Any, cfg: TrainConfig, parent_adapter: Path | None, *, gradient_checkpointing: bool) -> Any:
    """Wrap the base model with a LoRA adapter; copy the parent adapter's weights when given."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from pipelines.models import lora_config

    if is_quantized(model):
        _prepare_kbit(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    if parent_adapter is not None:
        parent_cfg = json.loads((Path(parent_adapter) / "adapter_config.json").read_text())

        def shape(c: dict) -> tuple:
            # target_parameters matters for MoE models (DeepSeek), where dense MLPs are targeted by parameter.
            return (c.get("r"), sorted(c.get("target_modules") or []), sorted(c.get("target_parameters") or []))

        want = shape({"r": lcfg.r, "target_modules": list(lcfg.target_modules or []),
                      "target_parameters": list(getattr(lcfg, "target_parameters", None) or [])})
        if shape(parent_cfg) != want:
            raise TrainingError(
                f"cannot warm-start from {parent_adapter}: its LoRA shape (r, modules, parameters) is "
                f"{shape(parent_cfg)}, this run wants {want}; start from scratch with --parent none or keep the "
                f"LoRA shape")
    model = get_peft_model(model, lcfg)
    if parent_adapter is not None:
        state = load_file(str(Path(parent_adapter) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) or []]
        if missing:
            raise TrainingError(f"parent adapter {parent_adapter} has weights this model lacks: {missing[:3]}...")
    return model


DROPOUT_LEVELS = 1 << 16   # dropout draws 16-bit uniform integers: four per 64-bit draw of the seeded generator


def dropout_mask(shape: tuple, p: float, dtype: Any, device: Any = "cpu"):
    """A Bernoulli dropout mask from torch's seeded generator, as bits to AND with a ``dtype`` tensor's bits.

    Returns (keep, scale): ``keep`` is an integer tensor as wide as ``dtype`` holding all ones where a value
    is kept and 0 where it is dropped, so ``(x.view(int) & keep).view(dtype)`` applies it; kept values are
    then scaled by ``scale`` = 1 / (1 - p'). torch's dropout spends a float draw and several boolean passes
    per element, a large share of an all-linear LoRA step on CPU; here 16 random bits per element (four
    per 64-bit draw) and integer passes. So p is rounded to a multiple of 2^-16 (p' = 0.05 -> 0.0500031),
    and the dropout stays unbiased for p'.
    """
    import torch

    n = math.prod(shape)
    level = min(DROPOUT_LEVELS - 1, max(1, round(p * DROPOUT_LEVELS)))
    threshold = level - DROPOUT_LEVELS // 2   # uniform int16 below it: dropped (probability level / 2^16)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    # min(b, t) - t is 0 where b >= t and negative where b < t (no overflow: t <= 0); its sign bit spread by an
    # arithmetic shift is -1 (all ones) where dropped; inverted, all ones where kept.
    keep = bits.view(torch.int16)[:n].view(shape).clamp_max_(threshold).sub_(threshold)
    keep = keep.bitwise_right_shift_(15).bitwise_not_()
    width = torch.empty((), dtype=dtype).element_size()
    if width != 2:
        keep = keep.to({4: torch.int32, 8: torch.int64}[width])   # sign extension keeps all ones all ones
    return keep, DROPOUT_LEVELS / (DROPOUT_LEVELS - level)


def _masked(x, keep):
    """x with the values ``keep`` drops set to zero (``keep`` from ``dropout_mask``)."""
    return (x.view(keep.dtype) & keep).view(x.dtype)


@functools.cache
def _lora_linear():
    import torch

    class LoraLinear(torch.autograd.Function):
        """y = x W^T (+ bias) + s * dropout(x) A^T B^T, W frozen, A and B trained: one autograd node.

        PEFT's forward is eight autograd nodes per layer (dropout, two LoRA matmuls, scale, add, each
        with its own full-size temporary); here the scale s and the dropout scale are folded into the
        [r x in] / [out x r] factors, the LoRA product is added inside the base matmul's output
        (addmm), and backward computes only what A, B and x need. Everything runs in ``weight``'s
        dtype (the bf16 compute copy under autocast on CPU, as autocast would cast); gradients come
        back in the dtypes of x, A and B.
        """

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, weight, bias, scaling, drop_p):
            dtype = weight.dtype
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            y = x2 @ weight.t() if bias is None else torch.addmm(bias.to(dtype), x2, weight.t())
            keep, keep_scale = dropout_mask(x2.shape, drop_p, dtype, x2.device) if drop_p > 0 else (None, 1.0)
            xd = _masked(x2, keep) if keep is not None else x2
            a = (lora_a * keep_scale).to(dtype) if keep_scale != 1.0 else lora_a.to(dtype)
            b = (lora_b * scaling).to(dtype)
            u = xd @ a.t()
            y.addmm_(u, b.t())
            ctx.save_for_backward(xd, u, a, b, weight, keep)
            ctx.scales = (scaling, keep_scale)
            ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad_y):
            xd, u, a, b, weight, keep = ctx.saved_tensors
            scaling, keep_scale = ctx.scales
            x_dtype, a_dtype, b_dtype = ctx.dtypes
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(weight.dtype)
            grad_u = g @ b
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[1]:
                grad_a = (grad_u.t() @ xd).to(a_dtype) * keep_scale
            if ctx.needs_input_grad[2]:
                grad_b = (g.t() @ u).to(b_dtype) * scaling
            if ctx.needs_input_grad[0]:
                gx = grad_u @ a
                if keep is not None:
                    gx.view(keep.dtype).bitwise_and_(keep)
                grad_x = gx.addmm_(g, weight).view(*grad_y.shape[:-1], weight.shape[1]).to(x_dtype)
            return grad_x, grad_a, grad_b, None, None, None, None

    return LoraLinear


def fusable_lora(module: Any) -> bool:
    """A plain PEFT LoRA linear (one active adapter, no DoRA / variant / bias, frozen nn.Linear base)."""
    import torch
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or module.merged or module.disable_adapters or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    base = module.get_base_layer()
    return (name in module.lora_A and not module.use_dora.get(name) and name not in getattr(module, "lora_variant", {})
            and not module.lora_bias.get(name, False) and not getattr(module, "fan_in_fan_out", False)
            and type(base) is torch.nn.Linear and not base.weight.requires_grad
            and type(module.lora_dropout[name]) in (torch.nn.Dropout, torch.nn.Identity))


def fused_lora_forward(module: Any, x, *args, **kwargs):
    """LoRA linear through ``_lora_linear``; anything unusual at call time takes PEFT's own forward."""
    import torch

    if args or kwargs or module.merged or module.disable_adapters or len(module.active_adapters) != 1:
        return type(module).forward(module, x, *args, **kwargs)
    name = module.active_adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if module.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    base = module.get_base_layer()
    weight = getattr(base, "lorad_compute_weight", base.weight)
    return _lora_linear().apply(x, module.lora_A[name].weight, module.lora_B[name].weight, weight, base.bias,
                                module.scaling[name], p)
