"""What the GPU tier's tests share: the marker that skips them cleanly without CUDA, and tiny chat records.

No conftest.py here on purpose: the tests import ``conftest`` (tests/conftest.py) by name, and a second
conftest module would take that name over.
"""

from __future__ import annotations

import random

import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Every module of tests/gpu sets ``pytestmark = GPU``: marked ``gpu`` (make test-gpu selects it), skipped without CUDA.
GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (the GPU tier: make test-gpu on a GPU machine)")]
WORDS = "the law court contract judge party shall must not be by with for what who where".split()


def chat_payloads(n: int, seed: int) -> list[dict]:
    """Short chat records over the tiny tokenizer's words."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS[:6])
                                                                    for _ in range(rng.randint(4, 12)))}]}
            for _ in range(n)]
