"""The training loss: next-token cross-entropy summed over labelled tokens, the LM head run in chunks."""

from __future__ import annotations

import functools
from typing import Any

from pipelines.train.batches import IGNORE


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
            # Two [chunk x vocab] work buffers reused by every chunk: on CPU a fresh tensor this size pays a
            # page fault per 4 KiB, as costly as the arithmetic on it.
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
