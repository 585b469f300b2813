"""What the engine changes on or reads from the model before serving: end-of-sequence ids, a float32 output head,
the weights' dtype."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lorad.engine")


def weights_dtype(model: Any) -> Any:
    """The dtype of the model's floating-point weights (the first one found: quantized models keep integer tensors
    beside them)."""
    return next(p for p in model.parameters() if p.dtype.is_floating_point).dtype


def float32_head(model: Any) -> None:
    """Run the output head outside autocast, in float32: bf16 logits keep 8 bits of mantissa, so the top two tokens
    of a small model tie or swap (SmolLM2-135M, 8 chat prompts: one first-token tie, one answer changed). Only the last
    position reaches the head (``logits_to_keep=1``), so this costs one float32 matrix-vector product per row."""
    import torch

    head = model.get_output_embeddings()

    class Float32Head(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        @property
        def weight(self):
            return self.inner.weight

        def forward(self, hidden: Any) -> Any:
            with torch.autocast(hidden.device.type, enabled=False):
                return self.inner(hidden.float())

    for name, child in model.named_children():
        if child is head and head is not None:
            setattr(model, name, Float32Head(head))
            return
    log.warning("output head not found; prefill logits stay in the autocast dtype",
                extra={"model": type(model).__name__})


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
