"""One incremental LoRA/QLoRA run: a frozen dataset in, a candidate adapter folder out.

Read it top to bottom like nanoGPT's train.py:
  1. wrap the base model with LoRA; warm-start from the parent (champion) adapter's weights,
     with a FRESH optimizer and LR schedule sized to this run's data (not the trainer "resume",
     which would replay old optimizer state tuned to old data);
  2. pack the tokenized examples into sequences (position ids restart per example, so no example
     attends to another) and cut them into micro-batches in a seeded order;
  3. loop: forward (loss computed in chunks, so the [tokens x vocab] logits never exist at once),
     backward, clip, step; every N steps write a checkpoint (adapter + optimizer + RNG + data
     position) atomically, so ``kill -9`` at any instant resumes exactly;
  4. write the adapter as a standard PEFT folder (adapter_model.safetensors + adapter_config.json).

Safety for unattended runs: non-finite loss aborts; a wall-clock budget stops cleanly; CUDA OOM
splits micro-batches smaller and turns on gradient checkpointing before giving up with a reason.
Nothing here is pickled: checkpoints are safetensors + JSON.

Speed (chosen per device by ``plan_speed``; each choice computes the same loss and gradients as the
plain path, up to rounding; bench/train_speed.py measures them):
  - packed attention: each packed example attends only to itself, through varlen flash attention on
    CUDA and one causal SDPA call over the examples padded side by side elsewhere; transformers'
    default builds a dense block mask over each whole row instead, (row length)^2 work on a slow
    masked kernel;
  - the LM head and cross-entropy run fused per chunk of labelled tokens, with their gradient
    computed in the same pass (no logits kept, no recompute);
  - on CUDA with a bf16 base: bf16 autocast (LoRA weights and optimizer stay fp32) and
    torch.compile of each decoder layer (compiled once, reused by every layer); a compile
    failure falls back to eager with a warning;
  - QLoRA: a lean k-bit preparation (no fp32 copies of embeddings / LM head) and gradient
    checkpointing on by default, since 4-bit is chosen to save memory.

The job form (``python -m pipelines.train RUN_DIR``) reads ``RUN_DIR/job.json`` and is what the
daemon's job runner supervises in a subprocess; running it again on the same folder resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon.config import TrainConfig
from pipelines.hardware import is_quantized

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
IGNORE = -100


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why (recorded as the run's failure reason)."""


class Interrupted(RuntimeError):
    """The run was asked to stop; its latest state is checkpointed and it resumes from there."""


EXIT_INTERRUPTED = 75  # what `python -m pipelines.train` exits with after a checkpointed stop (EX_TEMPFAIL)


@dataclass
class TrainOutcome:
    """What a finished run reports (also written to ``RUN_DIR/result.json``)."""

    adapter_dir: str
    status: str                      # "completed" | "budget" (wall-clock budget spent, adapter still written)
    steps: int
    total_steps: int
    loss_first: float | None
    loss_last: float | None
    tokens: int                      # real (non-padding) tokens processed, this process and before a resume
    seconds: float
    tokens_per_second: float
    resumed_from_step: int = 0
    micro_batch_splits: int = 1      # >1 after an out-of-memory retry
    gradient_checkpointing: bool = False
    examples: int = 0
    sequences: int = 0
    parent_adapter: str | None = None
    speed: dict = field(default_factory=dict)   # the SpeedPlan this run used (attention, compile, autocast, ...)
    history: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


# ----------------------------------------------------------------------------- data


def make_sequences(examples: list[dict], max_seq_len: int, packing: bool) -> list[dict]:
    """Turn tokenized examples into training sequences with input_ids, labels and position_ids."""
    from pipelines.data import pack

    if packing:
        packs = pack(examples, max_seq_len)
        seqs = [{"input_ids": list(p["input_ids"]), "labels": list(p["labels"]), "position_ids": list(p["position_ids"])}
                for p in packs]
        members = [list(zip(p["example_ids"], p["seq_lens"])) for p in packs]
    else:
        seqs = [{"input_ids": ex["input_ids"][:max_seq_len], "labels": list(ex["labels"][:max_seq_len]),
                 "position_ids": list(range(min(len(ex["input_ids"]), max_seq_len)))} for ex in examples]
        members = [[(i, len(seq["input_ids"]))] for i, seq in enumerate(seqs)]
    if any(ex.get("weight", 1.0) != 1.0 for ex in examples):   # train.category_weights: per-token loss weights
        for seq, parts in zip(seqs, members):
            seq["weights"] = [examples[i].get("weight", 1.0) for i, n in parts for _ in range(n)]
    # The first token of every example is never a target: in a pack, it would be "predicted" from the end of
    # the previous example, a cross-example signal that packing must not create.
    for s in seqs:
        for t, p in enumerate(s["position_ids"]):
            if p == 0:
                s["labels"][t] = IGNORE
    return seqs


def make_batches(sequences: list[dict], micro_batch_size: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]["input_ids"]), i))
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def make_staged_batches(examples: list[dict], max_seq_len: int, packing: bool, micro_batch_size: int
                        ) -> tuple[list[dict], list[list[int]], list[list[list[int]]] | None]:
    """Sequences and micro-batches, kept apart by the examples' ``phase`` and curriculum ``stage``.

    Returns (sequences, batches, groups): ``groups[p][s]`` lists the batches of stage s in phase p (see
    ``pipelines.data.stage_schedule``), or None when no example carries a phase or stage, in which case
    this is exactly ``make_sequences`` + ``make_batches``.
    """
    if not any(ex.get("phase") or ex.get("stage") for ex in examples):
        sequences = make_sequences(examples, max_seq_len, packing)
        return sequences, make_batches(sequences, micro_batch_size), None
    keys = sorted({(ex.get("phase", 0), ex.get("stage", 0)) for ex in examples})
    sequences: list[dict] = []
    batches: list[list[int]] = []
    groups: dict[int, list[list[int]]] = {}
    for phase, stage in keys:
        part = make_sequences([ex for ex in examples if (ex.get("phase", 0), ex.get("stage", 0)) == (phase, stage)],
                              max_seq_len, packing)
        first = len(batches)
        batches.extend([[len(sequences) + i for i in b] for b in make_batches(part, micro_batch_size)])
        sequences.extend(part)
        groups.setdefault(phase, []).append(list(range(first, len(batches))))
    return sequences, batches, [groups[p] for p in sorted(groups)]


def labelled_weight(sequence: dict) -> float:
    """The loss weight of a sequence's targets: its labelled tokens, each counted with its loss weight."""
    weights = sequence.get("weights")
    if weights is None:
        return float(sum(1 for lab in sequence["labels"][1:] if lab != IGNORE))
    return float(sum(w for lab, w in zip(sequence["labels"][1:], weights[1:]) if lab != IGNORE))


def _collate_weights(sequences: list[dict], idx: list[int], width: int):
    """[rows, width] float32 per-token loss weights of a micro-batch (pads weigh 0; their labels are -100)."""
    import torch

    out = torch.zeros((len(idx), width), dtype=torch.float32)
    for j, i in enumerate(idx):
        w = sequences[i].get("weights") or [1.0] * len(sequences[i]["input_ids"])
        out[j, :len(w)] = torch.tensor(w, dtype=torch.float32)
    return out


def _collate_cpu(sequences: list[dict], idx: list[int], pad_id: int):
    import torch

    rows = [sequences[i] for i in idx]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"])
        labels[j, :n] = torch.tensor(r["labels"])
        pos[j, :n] = torch.tensor(r["position_ids"])
        pos[j, n:] = torch.arange(width - n)
        real += n
    return ids, labels, pos, real


def collate(sequences: list[dict], idx: list[int], pad_id: int, device: Any):
    """Pad a micro-batch; pads get label -100 and their own position run (a separate 'packed' segment)."""
    ids, labels, pos, real = _collate_cpu(sequences, idx, pad_id)
    return ids.to(device), labels.to(device), pos.to(device), real


def segment_bounds(pos) -> list[int]:
    """Offsets where each packed example (or pad run) starts in the flattened micro-batch, plus the total.

    Every position run restarts at 0 (make_sequences and collate guarantee it), so the starts are
    exactly the zeros of ``pos``; this is the ``cu_seqlens`` of varlen attention.
    """
    flat = pos.reshape(-1)
    starts = (flat == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return starts + [flat.numel()]


# ----------------------------------------------------------------------------- model pieces


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak. Stateless, so resuming needs no scheduler state."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def chunked_loss_sum(model: Any, ids, labels, pos, *, chunk_tokens: int = 2048,
                     decoder_kwargs: dict | None = None):
    """Sum of next-token cross-entropy over labelled tokens, without materialising all logits at once.

    The decoder runs once; the LM head + cross-entropy run per chunk of labelled positions, so peak
    memory holds one chunk's logits instead of [batch x seq x vocab] twice. With a frozen plain-linear
    head (the LoRA case) the chunk's gradient is computed in the same pass (``_head_cross_entropy``);
    otherwise each chunk runs under activation checkpointing and is recomputed in backward.

    Args:
        decoder_kwargs: extra arguments for the decoder, e.g. the packed-attention segment offsets
            from ``packed_attention_kwargs``; without them, attention_mask=None + position_ids make
            transformers build a block-diagonal (packed) causal mask. Its key ``lorad_token_weights``
            ([batch, seq] float, train.category_weights) is taken out and weighs each token's loss.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    decoder_kwargs = dict(decoder_kwargs or {})
    weights = decoder_kwargs.pop("lorad_token_weights", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False, **decoder_kwargs).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE
    hidden, target = hidden[keep], target[keep]
    if weights is not None:
        weights = weights[:, 1:].reshape(-1)[keep].float()

    if torch.is_grad_enabled() and hidden.requires_grad and _fusable_head(head):
        weight = getattr(head, "lorad_compute_weight", head.weight)   # the run's bf16 copy (CPU autocast)
        return _head_cross_entropy().apply(hidden, weight, target, chunk_tokens, weights)

    def piece(h, t, w):
        ce = F.cross_entropy(head(h).float(), t, reduction="none")
        return (ce * w).sum() if w is not None else ce.sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.numel(), chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], target[start:start + chunk_tokens]
        w = weights[start:start + chunk_tokens] if weights is not None else None
        total = total + (checkpoint(piece, h, t, w, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t, w))
    return total


def _fusable_head(head: Any) -> bool:
    """A frozen, bias-free, unquantized nn.Linear head: its loss gradient can be taken in the forward pass."""
    import torch

    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and head.bias is None and w is not None and not w.requires_grad
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16))


@functools.cache
def _head_cross_entropy():
    import torch

    class HeadCrossEntropy(torch.autograd.Function):
        """sum CE(hidden @ W.T, target), W frozen; d(loss)/d(hidden) computed chunk by chunk in forward.

        Against autograd through checkpointed chunks this saves one LM-head matmul per token (the
        recompute) and keeps only [tokens x hidden] for backward. The gradient is the textbook
        (softmax - onehot) @ W, in the head's dtype as autograd would compute it.
        """

        @staticmethod
        def forward(ctx, hidden, weight, target, chunk_tokens, token_weights=None):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden)
            n = target.numel()
            c = min(chunk_tokens, max(1, n))
            rows = torch.arange(c, device=hidden.device)
            # Two [chunk x vocab] work buffers reused by every chunk: on CPU a fresh tensor this size costs a
            # page fault per 4 KiB, which here took as long as the arithmetic on it.
            logits = torch.empty((c, weight.shape[0]), dtype=weight.dtype, device=hidden.device)
            logits32 = logits if weight.dtype == torch.float32 else torch.empty(logits.shape, dtype=torch.float32,
                                                                                 device=hidden.device)
            logp = torch.empty(logits.shape, dtype=torch.float32, device=hidden.device)
            for s in range(0, n, chunk_tokens):
                h, t = hidden[s:s + chunk_tokens].to(weight.dtype), target[s:s + chunk_tokens]
                m, r = t.numel(), rows[:t.numel()]
                torch.mm(h, weight.t(), out=logits[:m])
                if logits32 is not logits:
                    logits32[:m].copy_(logits[:m])
                torch.log_softmax(logits32[:m], dim=-1, out=logp[:m])
                picked = logp[r, t]
                if token_weights is None:
                    total -= picked.sum()
                else:   # per-token loss weights scale each token's loss and so its gradient row
                    w = token_weights[s:s + chunk_tokens]
                    total -= (w * picked).sum()
                probs = logp[:m].exp_()   # softmax, in place of the log-probabilities
                probs[r, t] -= 1.0
                if token_weights is not None:
                    probs.mul_(w[:, None])
                if probs.dtype != weight.dtype:
                    probs = logits[:m].copy_(probs)   # the head's dtype, as autograd would compute the gradient
                grad[s:s + chunk_tokens] = (probs @ weight).to(grad.dtype)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            (grad,) = ctx.saved_tensors
            return (grad.float() * grad_total).to(grad.dtype), None, None, None, None

    return HeadCrossEntropy


# ----------------------------------------------------------------------------- speed plan (per device)

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


def plan_speed(model: Any, device: Any, *, attention: str = "auto", compile_layers: str | bool = "auto",
               autocast: str | bool = "auto", max_seq_len: int = 0, lora_kernel: str = "auto") -> SpeedPlan:
    """Choose the fast path for this model on this device; "auto" everywhere is the production default.

    Args:
        attention: "auto" (packed attention where exact, varlen flash on CUDA), "mask" (transformers'
            block mask, the reference), "per-example" or "flash-varlen" (forced).
        compile_layers: "auto" (CUDA, unquantized, varlen flash), True or False.
        autocast: "auto" (bf16 on CUDA when the base is bf16; on a CPU with bf16 matrix units, AMX, when
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
        # On CPU the attention kernels' time follows the padded work, not the number of calls (measured:
        # examples of 64-512 tokens, one call each on views of q/k/v, took half the time of one padded
        # call, and no gather/scatter of q, k, v and the output is needed).
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


def _decoder_layers(model: Any) -> list:
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


# ----------------------------------------------------------------------------- fused LoRA linear (CPU)

DROPOUT_LEVELS = 1 << 16   # dropout draws 16-bit uniform integers: four per 64-bit draw of the seeded generator


def dropout_mask(shape: tuple, p: float, dtype: Any, device: Any = "cpu"):
    """A Bernoulli dropout mask from torch's seeded generator, as bits to AND with a ``dtype`` tensor's bits.

    Returns (keep, scale): ``keep`` is an integer tensor as wide as ``dtype`` holding all ones where a value
    is kept and 0 where it is dropped, so ``(x.view(int) & keep).view(dtype)`` applies it; kept values are
    then scaled by ``scale`` = 1 / (1 - p'). torch's dropout spends a float draw and several boolean passes
    per element (the largest single cost of an all-linear LoRA step on CPU, bench/train_speed.py); here 16
    random bits per element, four per 64-bit draw, and integer passes cost about half. So p is rounded to
    a multiple of 2^-16 (p' = 0.05 -> 0.0500031), and the dropout stays unbiased for p'.
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


def _fusable_lora(module: Any) -> bool:
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


def _fused_lora_forward(module: Any, x, *args, **kwargs):
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


def _frozen_linear_forward(module: Any, x):
    """A frozen nn.Linear computed with its bf16 compute copy (cast once per run, not once per call)."""
    import torch.nn.functional as F

    weight = module.lorad_compute_weight
    bias = module.bias.to(weight.dtype) if module.bias is not None else None
    return F.linear(x.to(weight.dtype), weight, bias)


@contextlib.contextmanager
def _speed_setup(model: Any, plan: SpeedPlan):
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
    fused = [m for m in lora_layers if plan.lora_kernel == "fused" and _fusable_lora(m)]
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
        m.forward = functools.partial(_fused_lora_forward, m)
    if plan.compile_layers:
        for layer in _decoder_layers(model):
            # dynamic=True: packed micro-batches change their token count, example count (cu_seqlens) and
            # longest example every step; compiled for static shapes first, each layer recompiled 4-6 times
            # in the first steps, and under DDP every rank's recompile stalled all ranks (bench/scaling.py)
            layer.compile(dynamic=True)
    try:
        yield
    finally:
        _uncompile(model)
        for m in lora_layers:
            m.cast_input_dtype_enabled = True
        for m in fused + compute_copies:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("lorad_compute_weight", None)
        if plan.attention != "mask" and previous_attention is not None:
            base.set_attn_implementation(previous_attention)


def _uncompile(model: Any) -> None:
    for layer in _decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None


# ----------------------------------------------------------------------------- checkpoints


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, state: dict, keep: int = 2, dist: Any = None) -> Path:
    """adapter + optimizer moments + RNG + data position, as safetensors and JSON, written atomically.

    Always the full (unsharded) one-process layout, so any number of GPUs can resume it. With
    ``dist``, every rank must call this (FSDP gathers shards); rank 0 writes.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def host(v):   # a DTensor shard (FSDP) gathered whole; collective, so every rank runs it
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu").contiguous()

    lora = {k: host(v) for k, v in get_peft_model_state_dict(model).items()}
    opt_tensors, opt_meta = {}, {"param_groups": [], "steps": {}}
    sd = optimizer.state_dict()
    for g in sd["param_groups"]:
        opt_meta["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"params": g["params"]})
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                opt_tensors[f"{pid}.{name}"] = host(value)
            else:
                opt_meta["steps"][f"{pid}.{name}"] = float(value)

    def write(tmp: Path) -> None:
        save_file(lora, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))

    ckpt_root = run_dir / CHECKPOINTS
    final = ckpt_root / f"step-{state['step']:07d}"
    if dist is None or dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _atomic_dir(final, write)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones never carry the step-* name)."""
    done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, sharded: bool = False) -> dict:
    """Restore a checkpoint (any world size wrote it); ``sharded``: the model is under FSDP2, load shards."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        if sharded:
            from pipelines.distributed import load_sharded_lora

            load_sharded_lora(model, load_file(str(ckpt / "adapter.safetensors")))
        else:
            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as e:  # a damaged checkpoint is refused with a reason, never half-loaded silently
        raise TrainingError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); delete it to restart "
                            f"from the previous one") from e
    meta = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    for key, value in meta["steps"].items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = torch.tensor(value)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, st in per_param.items():
        for k, v in st.items():
            if sharded and v.dim() > 0:
                from pipelines.distributed import shard_like

                st[k] = shard_like(v, ordered[pid])
            else:
                st[k] = v.to(device) if v.dim() > 0 else v
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state


# ----------------------------------------------------------------------------- the run


def train(examples: list[dict], *, run_dir: Path, model: Any, tokenizer: Any, cfg: TrainConfig,
          max_seq_len: int, packing: bool = True, parent_adapter: Path | None = None,
          max_steps: int | None = None, progress: bool = True, clock: Callable[[], float] = time.monotonic,
          on_step: Callable[[dict], None] | None = None, chunk_tokens: int = 0,
          should_stop: Callable[[], bool] | None = None, attention: str = "auto",
          compile_layers: str | bool = "auto", autocast: str | bool = "auto", lora_kernel: str = "auto",
          dist: Any = None) -> TrainOutcome:
    """Train a LoRA adapter on tokenized ``examples`` and write it to ``run_dir/adapter``.

    Resumes from ``run_dir/checkpoints`` when present (same data and config assumed; the job
    spec in run_dir guarantees that in the daemon). ``attention``, ``compile_layers``, ``autocast`` and
    ``lora_kernel`` override the per-device speed plan (see ``plan_speed``); "auto" is the default.
    ``dist`` (a ``pipelines.distributed.Dist``, one per torchrun process) trains under DDP or FSDP2:
    each rank computes its share of every step's micro-batches, rank 0 alone writes files, and
    ``on_step`` runs on every rank with the global record.

    Raises:
        TrainingError: non-finite loss, out of memory at the smallest split, bad parent adapter, no data.
    """
    import torch

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise TrainingError("no training examples (every record was empty or too long?)")
    torch.manual_seed(cfg.seed)

    # -- data: fixed sequences and micro-batches; the order per epoch comes from a seeded permutation
    if not cfg.micro_batch_size:   # 0 = auto: what this device's memory holds for this model (pipelines/hardware.py)
        from pipelines.hardware import micro_batch_for

        cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_for(model, max_seq_len))
    if dist is not None:   # every rank must cut the same micro-batches (an "auto" size may differ): the smallest wins
        cfg = dataclasses.replace(cfg, micro_batch_size=dist.agree_min(cfg.micro_batch_size))
    # Examples marked with a phase (continued pre-training first) or a curriculum stage are batched apart.
    sequences, batches, stage_groups = make_staged_batches(examples, max_seq_len, packing, cfg.micro_batch_size)
    accum = cfg.grad_accum_steps
    if dist is not None:   # a step's micro-batches are dealt out to the ranks (pipelines/distributed.py)
        from pipelines import distributed

        _, accum = distributed.plan_world(accum, dist.world_size)
    n_tokens = [len(s["input_ids"]) for s in sequences]
    n_labels = [labelled_weight(s) for s in sequences]
    weighted = any("weights" in s for s in sequences)
    steps_per_epoch = max(1, len(batches) // accum)
    total_steps = max_steps or cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if stage_groups is not None:
        from pipelines.data import stage_schedule

        order = stage_schedule(stage_groups, total_steps * accum, cfg.seed)

    def micro_batch(k: int) -> list[int]:
        if stage_groups is not None:   # phases in turn, curriculum stages easy -> hard within each
            return batches[order[k]]
        epoch, i = divmod(k, len(batches))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        return batches[int(torch.randperm(len(batches), generator=g)[i])]

    # -- model: LoRA on the base, warm-started from the parent; fresh optimizer over the LoRA weights only.
    # A 4-bit/8-bit base means memory was chosen over speed: gradient checkpointing starts on.
    splits, use_gc = 1, cfg.gradient_checkpointing or is_quantized(model)
    model = attach_lora(model, cfg, parent_adapter, gradient_checkpointing=use_gc)
    model.train()
    device = next(model.parameters()).device if dist is None else dist.device
    sharded = dist is not None and dist.sharded
    if sharded and compile_layers == "auto":
        compile_layers = False   # FSDP's per-layer hooks and compiled layers are not combined here (not measured)
    if sharded:
        lora_kernel = "peft"     # FSDP2 shards the LoRA weights into DTensors, which the fused kernel does not take
    plan = plan_speed(model, device, attention=attention, compile_layers=compile_layers, autocast=autocast,
                      max_seq_len=max_seq_len, lora_kernel=lora_kernel)
    # The module whose forward is the loss: DDP / FSDP2 around the LoRA model when distributed.
    engine = (None if dist is None else
              distributed.wrap(model, dist, chunked_loss_sum, layers=_decoder_layers(model), autocast=plan.autocast))
    world = 1 if dist is None else dist.world_size
    main = dist is None or dist.is_main
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), fused=device.type == "cuda" and not sharded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    step, tokens_before, history, resumed_from = 0, 0, [], 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, sharded=sharded)
        step, tokens_before, history = state["step"], state["tokens"], state["history"]
        splits, resumed_from = state.get("splits", 1), step
        if state.get("total_steps") != total_steps or state.get("sequences") != len(sequences):
            raise TrainingError(f"checkpoint {ckpt} belongs to a different run (steps {state.get('total_steps')} vs "
                                f"{total_steps}, sequences {state.get('sequences')} vs {len(sequences)}); a resume "
                                f"on another number of GPUs needs train.grad_accum_steps to be a multiple of both")

    cuda = device.type == "cuda"
    # Tokens per LM-head + cross-entropy chunk: on CPU 512 (smaller [chunk x vocab] work buffers) measured
    # faster than 2048, the GPU's choice.
    chunk_tokens = chunk_tokens or (2048 if cuda else 512)

    def run_micro(idx: list[int], denom: float, last: bool = True):
        """Forward + backward of one micro-batch, in `splits` pieces; returns (loss sum on device, real tokens).

        Distributed: the loss is scaled by the world size because DDP/FSDP average gradients over ranks;
        ``last`` marks a rank's last micro-batch of the step, the one whose backward all-reduces (DDP).
        """
        loss_total, real_total = None, 0
        piece = math.ceil(len(idx) / splits)
        for s in range(0, len(idx), piece):
            ids, labels, pos, real = _collate_cpu(sequences, idx[s:s + piece], pad_id)
            extra = packed_attention_kwargs(plan, pos, device)
            if weighted:
                extra["lorad_token_weights"] = _collate_weights(sequences, idx[s:s + piece], ids.shape[1]).to(device)
            if cuda:   # pinned host memory lets the copies overlap the previous micro-batch's backward
                ids, labels, pos = (t.pin_memory().to(device, non_blocking=True) for t in (ids, labels, pos))
            amp = (torch.autocast(device.type, dtype=getattr(torch, plan.autocast)) if plan.autocast
                   else contextlib.nullcontext())
            if engine is None:
                with amp:
                    loss_sum = chunked_loss_sum(model, ids, labels, pos, chunk_tokens=chunk_tokens, decoder_kwargs=extra)
                (loss_sum / denom).backward()
            else:
                with distributed.no_sync(engine, last), amp:
                    loss_sum = engine(ids, labels, pos, extra, chunk_tokens)
                    (loss_sum * world / denom).backward()
            # Summed on the device: one host sync per optimizer step, not one per micro-batch.
            loss_total = loss_sum.detach() if loss_total is None else loss_total + loss_sum.detach()
            real_total += real
        return loss_total, real_total

    metrics_path = run_dir / METRICS
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: the bar shows on a terminal and stays out of logs and pipes.
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                   disable=None if main else True)
    t_start, tokens_now, status = clock(), 0, "completed"
    def checkpoint_state() -> dict:
        return {"step": step, "tokens": tokens_before + tokens_now, "history": history, "splits": splits,
                "total_steps": total_steps, "sequences": len(sequences)}

    with _speed_setup(model, plan):
        while step < total_steps:
            spent = clock() - t_start > cfg.max_wall_seconds
            stop = should_stop is not None and should_stop()
            if dist is not None:   # every rank must take the same branch
                spent, stop = dist.any(spent, stop)
            if spent:
                status = "budget"
                break
            if stop:
                if step > resumed_from and step % cfg.checkpoint_every_steps != 0:
                    save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)
                raise Interrupted(f"stopped on request at step {step}/{total_steps}; checkpointed")
            group = [micro_batch(step * accum + a) for a in range(accum)]
            # Normalise by the labelled tokens of the whole accumulation group: every token weighs the same,
            # however the group is split into micro-batches.
            denom = max(1.0, float(sum(n_labels[i] for g in group for i in g)))
            lr = lr_at(step, total_steps, cfg.learning_rate, cfg.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            while True:
                try:
                    optimizer.zero_grad(set_to_none=True)
                    loss_dev, real = None, 0
                    mine = group if dist is None else group[dist.rank::world]
                    for j, idx in enumerate(mine):
                        ls, r = run_micro(idx, denom, last=j == len(mine) - 1)
                        loss_dev, real = (ls if loss_dev is None else loss_dev + ls), real + r
                    if dist is not None:   # the step's loss and tokens over all ranks
                        loss_dev = dist.sum(loss_dev.float())
                        real = sum(n_tokens[i] for g in group for i in g)
                    break
                except torch.OutOfMemoryError:
                    if dist is not None:   # ranks cannot retry independently: they would stop matching collectives
                        raise TrainingError(f"out of GPU memory at step {step} on rank {dist.rank}; lower "
                                            f"train.micro_batch_size, set train.gradient_checkpointing, or use "
                                            f"train.distributed fsdp") from None
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    if splits < cfg.micro_batch_size:
                        splits *= 2
                    elif not use_gc:
                        use_gc = True
                        model.get_base_model().gradient_checkpointing_enable(
                            gradient_checkpointing_kwargs={"use_reentrant": False})
                        model.enable_input_require_grads()
                    else:
                        raise TrainingError(f"out of GPU memory at step {step} even with micro-batches of "
                                            f"1 sequence and gradient checkpointing; lower data.max_seq_len") from None
                    print(f"lorad: out of memory; retrying step {step} with {splits} splits, "
                          f"gradient checkpointing {'on' if use_gc else 'off'}", file=sys.stderr)
                except Exception as e:  # noqa: BLE001 -- only a compiler failure is retried, once, in eager mode
                    if not plan.compile_layers or dist is not None:
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    _uncompile(model)
                    plan = SpeedPlan(**{**plan.to_dict(), "compile_layers": False})
                    print(f"lorad: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                          f"retrying step {step} without compiling", file=sys.stderr)
            loss = float(loss_dev) / denom
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {step}: aborting (lower train.learning_rate or check data)")
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor
            optimizer.step()
            step += 1
            tokens_now += real
            elapsed = clock() - t_start
            record = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens_before + tokens_now,
                      "tokens_per_second": tokens_now / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed}
            if device.type == "cuda":   # this process's peak so far (rank 0's under DDP/FSDP: ranks are alike)
                record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                record["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            history.append(round(loss, 6))
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if on_step is not None:
                on_step(record)
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)
    if bar is not None:
        bar.close()
    if status == "budget" and step > resumed_from and step % cfg.checkpoint_every_steps != 0:
        save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)

    adapter_dir = run_dir / ADAPTER_DIRNAME
    # FSDP: the LoRA shards are gathered on every rank (a collective); rank 0 writes.
    full_lora = distributed.lora_state_full(model) if sharded else None
    if main:
        _atomic_dir(adapter_dir, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True,
                                                                   **({"state_dict": full_lora} if sharded else {})))
    seconds = clock() - t_start
    outcome = TrainOutcome(
        adapter_dir=str(adapter_dir), status=status, steps=step, total_steps=total_steps,
        loss_first=history[0] if history else None, loss_last=history[-1] if history else None,
        tokens=tokens_before + tokens_now, seconds=seconds,
        tokens_per_second=tokens_now / seconds if seconds > 0 else 0.0, resumed_from_step=resumed_from,
        micro_batch_splits=splits, gradient_checkpointing=use_gc, examples=len(examples),
        sequences=len(sequences), parent_adapter=str(parent_adapter) if parent_adapter else None,
        speed=plan.to_dict(), history=history)
    if main:
        (run_dir / "result.json").write_text(json.dumps(outcome.to_dict(), indent=2))
    if dist is not None:
        outcome.speed["distributed"] = {"mode": dist.mode, "world_size": world, "micro_batches_per_step": accum}
        dist.barrier()   # no rank leaves (and tears down the group) while rank 0 still writes
    return outcome


# ----------------------------------------------------------------------------- the job form


def tokenize_payloads(payloads: Iterable[dict], tokenizer: Any, max_seq_len: int) -> list[dict]:
    """Chat-template and label each record (completion-only for chat, all tokens for text)."""
    from pipelines.data import tokenize_record

    out = []
    for p in payloads:
        ex = tokenize_record(p, tokenizer, max_seq_len)
        if ex is not None and any(lab != IGNORE for lab in ex["labels"]):
            ex["category"], ex["text"] = p.get("category"), "text" in p   # for the training options
            out.append(ex)
    return out


def champion_losses(model: Any, examples: list[dict], parent_adapter: Path | None, run_dir: Path,
                    chunk_tokens: int = 2048) -> tuple[list[float], Any]:
    """Each example's mean response loss under the champion (base + parent adapter), for the curriculum.

    Scored once per run and kept in ``run_dir/curriculum.json``, so a resumed run orders its data
    exactly as before. Returns (losses, the base model without the parent adapter attached).
    """
    import torch

    cache = run_dir / "curriculum.json"
    lengths = [len(ex["input_ids"]) for ex in examples]
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("lengths") == lengths:
            return [float(x) for x in saved["losses"]], model
    scorer = model
    if parent_adapter is not None:
        from peft import PeftModel

        scorer = PeftModel.from_pretrained(model, str(parent_adapter))
    device = next(model.parameters()).device
    scorer.eval()
    losses = []
    with torch.no_grad():
        for ex in examples:   # one at a time: chunked loss keeps memory flat whatever the vocabulary
            ids = torch.tensor([ex["input_ids"]], device=device)
            labels = torch.tensor([ex["labels"]], device=device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            n = int((labels[0, 1:] != IGNORE).sum())
            total = chunked_loss_sum(scorer, ids, labels, pos, chunk_tokens=chunk_tokens)
            losses.append(float(total) / n if n else float("nan"))
    if parent_adapter is not None:
        model = scorer.unload()   # LoRA layers out again: attach_lora wraps the plain base
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")   # one per process: every distributed rank scores and writes
    tmp.write_text(json.dumps({"lengths": lengths, "losses": losses}))
    os.replace(tmp, cache)
    return losses, model


def apply_training_options(examples: list[dict], cfg: Any, model: Any, parent_adapter: Path | None,
                           run_dir: Path) -> tuple[list[dict], Any]:
    """Mark examples for train.category_weights, train.continued_pretraining and train.curriculum."""
    from pipelines.data import annotate_examples, parse_category_weights

    t = cfg.train
    weights = parse_category_weights(t.category_weights)
    text_first = t.continued_pretraining == "first"
    difficulty = None
    if t.curriculum == "easy_to_hard":
        difficulty, model = champion_losses(model, examples, parent_adapter, run_dir)
    if not weights and not text_first and difficulty is None:
        return examples, model
    marked = annotate_examples(examples, category_weights=weights, text_first=text_first, difficulty=difficulty,
                               stages=t.curriculum_stages)
    if not marked:
        raise TrainingError(f"train.category_weights {t.category_weights} leave no training example (weight 0)")
    return marked, model


def write_job(run_dir: Path, *, payloads: Iterable[dict], config: dict, parent_adapter: str | None,
              max_steps: int | None = None) -> Path:
    """Freeze a run: its data (JSONL of payloads) and its full config, so any process can run or resume it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data.jsonl"
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in payloads:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
    job = {"config": config, "parent_adapter": parent_adapter, "max_steps": max_steps, "data": data.name}
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    return run_dir / "job.json"


def keep_freed_memory() -> bool:
    """Serve every allocation from the process heap and keep freed memory there (glibc malloc; Linux).

    A CPU training step allocates and frees the same large activations each step. glibc maps each
    allocation above its threshold fresh from the kernel and unmaps it when freed, so every step pays a
    page fault per 4 KiB again (measured: ~240k faults and ~7 % of a step of the 135M model). With mmap
    and trimming off the pages stay in the process and are reused. For a process that exists to train
    on CPU (its memory then stays at its peak); returns whether glibc accepted the settings.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4   # glibc's mallopt parameter numbers (malloc.h)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run_job(run_dir: Path, *, progress: bool = True, on_step: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None, dist: Any = None,
            own_process: bool = False) -> TrainOutcome:
    """Run (or resume) the job frozen in ``run_dir/job.json`` (``dist``: this process's torchrun rank).

    ``own_process``: this process exists for the job (``python -m pipelines.train``): on CPU its allocator
    then keeps freed memory for reuse (``keep_freed_memory``).
    """
    from daemon.config import build_config
    from pipelines.distributed import load_kwargs
    from pipelines.models import load_base_model

    run_dir = Path(run_dir)
    job = json.loads((run_dir / "job.json").read_text())
    cfg = build_config(job["config"])
    from pipelines.hardware import resolve_config

    # An explicit float32 (or float16) model.dtype means matmuls in that dtype; "auto" lets the speed plan use
    # bf16 autocast over fp32 weights on a CPU with AMX (hardware plan's train_compute), as it does on GPUs.
    autocast = "auto" if cfg.model.dtype in ("auto", "bfloat16") else False
    cfg, _ = resolve_config(cfg)   # model.dtype/quantization "auto", train.micro_batch_size 0 -> this machine's plan
    m = cfg.model
    model, tokenizer = load_base_model(m.base_model, Path(cfg.paths.state_dir) / "cache",
                                       quantization=m.quantization, revision=m.revision or None,
                                       trust_remote_code=m.trust_remote_code, for_training=True,
                                       **load_kwargs(dist, device=m.device, dtype=m.dtype, quantization=m.quantization))
    if own_process and next(model.parameters()).device.type == "cpu":
        keep_freed_memory()   # after loading: the weights' one-off buffers still go back to the system
    with open(run_dir / job["data"], encoding="utf-8") as f:
        payloads = [json.loads(line) for line in f if line.strip()]
    examples = tokenize_payloads(payloads, tokenizer, cfg.data.max_seq_len)
    if len(examples) < len(payloads):
        skipped = len(payloads) - len(examples)
        why = (f"{skipped} of {len(payloads)} records have no answer tokens within data.max_seq_len "
               f"({cfg.data.max_seq_len} tokens: the prompt fills it, or the answer is empty)")
        if not examples:
            raise TrainingError(f"no training examples: {why}; raise data.max_seq_len or lower "
                                f"data.max_prompt_tokens")
        print(f"lorad train: skipped {why}", file=sys.stderr, flush=True)
    parent = Path(job["parent_adapter"]) if job.get("parent_adapter") else None
    examples, model = apply_training_options(examples, cfg, model, parent, run_dir)
    return train(examples, run_dir=run_dir, model=model, tokenizer=tokenizer, cfg=cfg.train,
                 max_seq_len=cfg.data.max_seq_len, packing=cfg.data.packing, parent_adapter=parent,
                 max_steps=job.get("max_steps"), progress=progress, on_step=on_step, should_stop=should_stop,
                 autocast=autocast, dist=dist)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train RUN_DIR``: exit 0 with result.json, 1 with error.json (reason), 75 stopped."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--launch", choices=("ddp", "fsdp"), default=None,
                    help="start this job under torchrun, one process per GPU (pipelines.distributed.launch)")
    ap.add_argument("--nproc", type=int, default=0, help="with --launch: processes (GPUs); 0 = every visible GPU")
    ap.add_argument("--distributed", choices=("none", "ddp", "fsdp"), default="none",
                    help="set by --launch on each torchrun process: DDP or FSDP2 across ranks")
    ap.add_argument("--stop-at-step", type=int, default=0, metavar="N",
                    help="checkpoint and exit 75 (resumable) once N optimizer steps are done, e.g. to move a run "
                         "to another number of GPUs")
    args = ap.parse_args(argv)
    if args.launch:
        from pipelines.distributed import launch

        rank_args = (["--no-progress"] if args.no_progress else []) + (
            ["--stop-at-step", str(args.stop_at_step)] if args.stop_at_step else [])
        return launch(args.run_dir, args.launch, args.nproc, rank_args)
    import signal
    import threading

    from pipelines import distributed

    # SIGTERM (the daemon shutting down) = checkpoint at the next step boundary and exit 75; resumable.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    done = [0]

    def on_step(record: dict) -> None:
        done[0] = record["step"]

    def should_stop() -> bool:
        return stop.is_set() or 0 < args.stop_at_step <= done[0]

    dist = None
    try:
        dist = distributed.init(args.distributed)
        main_rank = dist is None or dist.is_main
        outcome = run_job(args.run_dir, progress=not args.no_progress, should_stop=should_stop, on_step=on_step,
                          dist=dist, own_process=True)
    except Interrupted as e:
        if dist is None:
            print(f"lorad train: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        # Under torchrun a non-zero rank reads as a crash: exit 0 and leave the launcher a marker.
        if dist.is_main:
            print(f"lorad train: {e}", file=sys.stderr)
            (args.run_dir / distributed.INTERRUPTED_MARKER).write_text(json.dumps({"reason": str(e)}))
        return 0
    except (TrainingError, distributed.DistributedError) as e:
        # Any rank may be the one that failed (torchrun then stops the others): each writes atomically.
        tmp = args.run_dir / f".error-{os.getpid()}.json"
        tmp.write_text(json.dumps({"reason": str(e)}))
        os.replace(tmp, args.run_dir / "error.json")
        print(f"lorad train: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(dist)
    if main_rank:
        print(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
