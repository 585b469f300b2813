"""The CUDA speed plan against the reference on one GPU: varlen flash attention over packed rows, per-layer
torch.compile and bf16 autocast must give the loss and LoRA gradients of transformers' block-mask path."""

from __future__ import annotations

import contextlib


from gpu_common import GPU

pytestmark = GPU


def _run(dtype, **speed):
    """Loss and LoRA gradients of one packed micro-batch under a forced speed plan (same weights every time)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.train_speed import records
    from daemon.config import TrainConfig
    from pipelines import train as T

    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    seqs = T.make_sequences(records(40, 2000, lo=20, hi=300), 1024, True)
    ids, labels, pos, _ = T.collate_cpu(seqs, [0, 1, 2], 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device="cuda", dtype=dtype)
    model = T.attach_lora(model, TrainConfig(lora_dropout=0.0), None, gradient_checkpointing=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plan = T.plan_speed(model, "cuda", **speed)
    with T.speed_setup(model, plan):
        kw = T.packed_attention_kwargs(plan, pos, "cuda")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if plan.autocast else contextlib.nullcontext()
        with amp:
            loss = T.chunked_loss_sum(model, ids.cuda(), labels.cuda(), pos.cuda(), decoder_kwargs=kw)
        loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    return float(loss), grads, plan


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_the_cuda_plan_is_varlen_compiled_and_autocast():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipelines import train as T

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4),
                                             dtype=torch.bfloat16).cuda()
    plan = T.plan_speed(model, "cuda")
    assert (plan.attention, plan.compile_layers, plan.autocast) == ("flash-varlen", True, "bfloat16"), plan


def test_varlen_attention_matches_the_block_mask():
    import torch

    loss_ref, grads_ref, _ = _run(torch.bfloat16, attention="mask", compile_layers=False)
    loss, grads, plan = _run(torch.bfloat16, attention="flash-varlen", compile_layers=False)
    assert plan.attention == "flash-varlen"
    assert abs(loss - loss_ref) / abs(loss_ref) < 5e-3
    assert _rel(grads, grads_ref) < 3e-2


def test_compiled_layers_match_eager_layers():
    import torch

    loss_eager, grads_eager, _ = _run(torch.bfloat16, attention="flash-varlen", compile_layers=False)
    loss, grads, plan = _run(torch.bfloat16, attention="flash-varlen", compile_layers=True)
    assert plan.compile_layers
    assert abs(loss - loss_eager) / abs(loss_eager) < 5e-3
    assert _rel(grads, grads_eager) < 3e-2


def test_bf16_autocast_stays_close_to_fp32_and_really_runs_in_bf16():
    import torch

    loss32, grads32, _ = _run(torch.float32, attention="mask", compile_layers=False, autocast=False)
    loss, grads, plan = _run(torch.float32, attention="mask", compile_layers=False, autocast=True)
    assert plan.autocast == "bfloat16"
    assert abs(loss - loss32) / abs(loss32) < 1e-2
    assert 0 < _rel(grads, grads32) < 5e-2   # not identical: the matmuls did run in bf16
