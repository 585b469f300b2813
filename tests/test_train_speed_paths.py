"""The training fast paths are exact: packed per-example attention against transformers' block mask, and
the fused LM-head cross-entropy against plain autograd (loss and gradients), on tiny Llama/Qwen2 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from daemon.config import TrainConfig
from pipelines import train as T
from pipelines.train.loss import _fusable_head, _head_cross_entropy


def tiny_model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    model.config._attn_implementation = "sdpa"
    return model


def packed_batch(segment_lengths: list[list[int]], seed: int = 0):
    """Rows of packed examples: ids, labels (first token of each example and a prompt share masked), positions."""
    g = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in segment_lengths)
    ids = torch.randint(3, 96, (len(segment_lengths), width), generator=g)
    labels = torch.full_like(ids, T.IGNORE)
    pos = torch.zeros_like(ids)
    for row, lengths in enumerate(segment_lengths):
        start = 0
        for n in lengths + ([width - sum(lengths)] if sum(lengths) < width else []):  # trailing pad run
            pos[row, start:start + n] = torch.arange(n)
            if n > 2 and start + n <= sum(lengths):
                labels[row, start + n // 3 + 1:start + n] = ids[row, start + n // 3 + 1:start + n]
            start += n
    return ids, labels, pos


def loss_and_grads(model, ids, labels, pos, attention: str):
    plan = T.SpeedPlan(attention=attention, compile_layers=False, autocast=None)
    model.zero_grad(set_to_none=True)
    with T.speed_setup(model, plan):
        loss = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=16,
                                  decoder_kwargs=T.packed_attention_kwargs(plan, pos, "cpu"))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("segments", [
    [[12, 9, 20], [7, 30]],            # moderate padding: one SDPA call over all examples
    [[60, 2, 3, 2, 4, 3], [2, 2, 2]],  # > 4x padding: examples grouped by length, outputs put back in order
])
def test_per_example_attention_matches_the_block_mask(kind, segments):
    model = T.attach_lora(tiny_model(kind), TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0), None,
                          gradient_checkpointing=False)
    ids, labels, pos = packed_batch(segments)
    ref_loss, ref_grads = loss_and_grads(model, ids, labels, pos, "mask")
    loss, grads = loss_and_grads(model, ids, labels, pos, "per-example")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # It can fail: attention across the packed examples (positions not reset) gives another loss.
    cross, _ = loss_and_grads(model, ids, labels, torch.arange(ids.shape[1]).expand_as(ids), "mask")
    assert not torch.allclose(cross, ref_loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_cross_entropy_matches_autograd(weighted, dtype):
    g = torch.Generator().manual_seed(1)
    tokens, hidden, vocab = 37, 24, 50
    h = torch.randn(tokens, hidden, generator=g)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g)
    w = torch.rand(tokens, generator=g) * 2 if weighted else None

    h1 = h.clone().requires_grad_(True)
    fused = _head_cross_entropy().apply(h1, weight, target, 10, w)   # 4 chunks, the last one short
    fused.backward()

    h2 = h.clone().requires_grad_(True)
    ce = F.cross_entropy((h2.to(dtype) @ weight.t()).float(), target, reduction="none")
    plain = (ce * w).sum() if weighted else ce.sum()
    plain.backward()

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    assert h1.grad.abs().sum() > 0


def test_chunked_loss_uses_the_fused_head_only_when_exact():
    frozen = torch.nn.Linear(8, 5, bias=False).requires_grad_(False)
    assert _fusable_head(frozen)
    assert not _fusable_head(torch.nn.Linear(8, 5, bias=False))        # trained head: autograd path
    assert not _fusable_head(torch.nn.Linear(8, 5).requires_grad_(False))  # bias: autograd path


def test_compile_pays_only_for_enough_tokens_times_non_embedding_parameters():
    from pipelines.train.speed import COMPILE_MIN_WORK, compile_pays

    model = tiny_model("llama")
    embedding = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embedding
    enough = int(COMPILE_MIN_WORK // params) + 1
    assert compile_pays(model, enough) and not compile_pays(model, enough - 2)
    # the embedding (a lookup) does not count: with it the threshold would be crossed earlier
    assert not compile_pays(model, int(COMPILE_MIN_WORK // (params + embedding)) + 1)
    # what the docs promise for the 7B shape (6.49e9 non-embedding parameters): 200 steps of 32k tokens compile,
    # a 200-record drop (~200k tokens) and the break-even measured on an H100 (~4.2M tokens) do not
    assert 6.49e9 * 200 * 32768 >= COMPILE_MIN_WORK > 6.49e9 * 4.0e6 > 6.49e9 * 200_000


@pytest.mark.parametrize("setting,tokens,expected", [("always", 10, True), ("never", 10**12, False),
                                                     ("auto", 10, False), ("auto", 10**12, "auto")])
def test_train_compile_setting_and_the_planned_tokens_decide_compilation(setting, tokens, expected):
    from pipelines.train.distributed import OneProcess
    from pipelines.train.loop import _compile_choice

    class Data:   # 10 steps of 2 micro-batches, each of tokens / 20 tokens: `tokens` planned in all
        n_tokens = [tokens // 20] * 4
        batches = [[0], [1], [2], [3]]
        total_steps, accum = 10, 2

    model = tiny_model("llama")   # ~90k parameters: 10 tokens are far below the threshold, 1e12 far above
    cfg = TrainConfig(compile=setting)
    assert _compile_choice("auto", cfg, model, Data, OneProcess()) == expected
    assert _compile_choice(False, cfg, model, Data, OneProcess()) is False   # an explicit argument wins


def test_train_compile_rejects_a_yaml_boolean_with_the_choices():
    from daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, environ={}, overrides={"train": {"compile": False}})
    assert "train.compile" in str(e.value)
