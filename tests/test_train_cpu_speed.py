"""The CPU training speed plan computes what PEFT computes: the fused LoRA linear against PEFT's own forward
(loss and every LoRA gradient, fp32 exact, bf16 within autocast's rounding), its dropout (rate, scale,
seed), the per-example attention loop against the padded path, and the plan's choices per CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from daemon.config import TrainConfig
from pipelines import hardware
from pipelines import train as T
from pipelines.hardware import Hardware, choose_defaults
from pipelines.train.lora import _lora_linear, _masked


def tiny_lora_model(dropout: float = 0.0, targets: str = "all-linear"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = T.attach_lora(LlamaForCausalLM(config), TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=dropout,
                                                                lora_targets=targets), None,
                          gradient_checkpointing=False)
    with torch.no_grad():   # B starts at zero in PEFT; non-zero B makes every LoRA gradient path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def batch(seed: int = 0, lengths: list | None = None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [[17, 9, 30], [21, 11]]   # rows of packed examples, the second padded
    width = max(sum(r) for r in lengths)
    ids = torch.randint(3, 96, (2, width), generator=g)
    labels, pos = ids.clone(), torch.zeros_like(ids)
    for row, parts in enumerate(lengths):
        start = 0
        for n in parts + ([width - sum(parts)] if sum(parts) < width else []):
            pos[row, start:start + n] = torch.arange(n)
            labels[row, start] = T.IGNORE
            start += n
        labels[row, sum(parts):] = T.IGNORE
    return ids, labels, pos


def run(model, plan: T.SpeedPlan, *, seed: int = 0, loop: bool | None = None, lengths: list | None = None):
    ids, labels, pos = batch(lengths=lengths)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with T.speed_setup(model, plan):
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if plan.autocast else contextlib.nullcontext()
        with amp:
            loss = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=16,
                                      decoder_kwargs=T.packed_attention_kwargs(plan, pos, "cpu", loop=loop))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def plan(lora_kernel: str, autocast: str | None = None, attention: str = "per-example") -> T.SpeedPlan:
    return T.SpeedPlan(attention=attention, compile_layers=False, autocast=autocast, lora_kernel=lora_kernel)


def assert_close_grads(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_fused_lora_linear_matches_peft_in_fp32(targets):
    model = tiny_lora_model(targets=targets)
    assert sum(T.fusable_lora(m) for m in model.modules()) == (14 if targets == "all-linear" else 4)
    ref_loss, ref = run(model, plan("peft"))
    loss, got = run(model, plan("fused"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_close_grads(got, ref, rtol=1e-4, atol=1e-6)
    # It can fail: the LoRA scale is part of what the fused kernel computes.
    for m in model.modules():
        if T.fusable_lora(m):
            m.scaling["default"] *= 2
    doubled, _ = run(model, plan("fused"))
    assert not torch.allclose(doubled, ref_loss, rtol=1e-3)


def test_fused_lora_with_bf16_compute_copies_matches_peft_under_autocast():
    model = tiny_lora_model()
    ref_loss, ref = run(model, plan("peft", "bfloat16"))
    loss, got = run(model, plan("fused", "bfloat16"))
    exact_loss, exact = run(model, plan("peft"))
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, g in ref.items():   # as close to PEFT's bf16 as PEFT's bf16 is to fp32
        err = float((got[name] - g).norm() / g.norm())
        assert err < 2 * float((g - exact[name]).norm() / exact[name].norm()) + 1e-2, name
    # The run's bf16 copies of the frozen weights are gone afterwards, and the forward is PEFT's again.
    assert not any("lorad_compute_weight" in vars(m) or "forward" in vars(m) for m in model.modules())


def test_fused_dropout_is_seeded_unbiased_and_at_the_configured_rate():
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        keep, scale = T.dropout_mask((400, 500), 0.05, dtype)
        assert keep.dtype == bits and set(keep.unique().tolist()) == {-1, 0}   # all ones = kept, 0 = dropped
        assert abs(float((keep == 0).float().mean()) - 0.05) < 0.003
        assert scale == pytest.approx(1 / (1 - 3277 / 65536))   # p rounded to 1/65536: unbiased for that p
        x = torch.randn(400, 500).to(dtype)
        torch.testing.assert_close(_masked(x, keep), torch.where(keep == 0, 0, x).to(dtype), rtol=0, atol=0)
    torch.manual_seed(3)
    a, _ = T.dropout_mask((64, 64), 0.3, torch.bfloat16)
    torch.manual_seed(3)
    b, _ = T.dropout_mask((64, 64), 0.3, torch.bfloat16)
    assert torch.equal(a, b) and 0.25 < float((a == 0).float().mean()) < 0.35

    model = tiny_lora_model(dropout=0.1)
    first, g1 = run(model, plan("fused"), seed=5)
    again, g2 = run(model, plan("fused"), seed=5)
    other, _ = run(model, plan("fused"), seed=6)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert_close_grads(g1, g2, rtol=0, atol=0)
    assert not torch.equal(first, other)   # the masks come from the seeded generator
    model.eval()   # no dropout outside training: the fused forward equals PEFT's exactly again
    with torch.no_grad(), T.speed_setup(model, plan("fused")):
        ids, _, _ = batch()
        fused = model(input_ids=ids).logits
    with torch.no_grad():
        peft_out = model(input_ids=ids).logits
    torch.testing.assert_close(fused, peft_out, rtol=1e-5, atol=1e-5)


def test_dropout_mask_gradient_matches_the_dropped_inputs():
    """d(loss)/dx is zero exactly where the LoRA branch dropped x (and the base path's W^T g elsewhere)."""
    torch.manual_seed(0)
    x = torch.randn(50, 8, requires_grad=True)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    w = torch.zeros(6, 8)   # no base path: only the LoRA branch reaches x
    torch.manual_seed(1)
    y = _lora_linear().apply(x, a, b, w, None, 2.0, 0.5)
    y.sum().backward()
    torch.manual_seed(1)
    keep, scale = T.dropout_mask((50, 8), 0.5, torch.float32)
    drop = keep == 0
    torch.testing.assert_close(x.grad, (~drop) * scale * (torch.ones(50, 6) @ (2.0 * b) @ a))
    want = (x.detach() * ~drop * scale) @ a.detach().t() @ (2.0 * b.detach()).t()
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("lengths", [[[12, 9, 20], [7, 30]], [[60, 2, 3, 2, 4, 3], [2, 2, 2]]])
def test_attention_loop_over_examples_matches_the_block_mask_and_the_padded_batches(lengths):
    model = tiny_lora_model()
    ids, _, pos = batch(lengths=lengths)
    kwargs = T.packed_attention_kwargs(plan("peft"), pos, "cpu")
    assert "lorad_segments" in kwargs and "lorad_groups" not in kwargs   # CPU: one call per example
    assert "lorad_groups" in T.packed_attention_kwargs(plan("peft"), pos, "cpu", loop=False)
    ref_loss, ref = run(model, plan("peft", attention="mask"), lengths=lengths)
    for loop in (True, False):
        loss, got = run(model, plan("peft"), loop=loop, lengths=lengths)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert_close_grads(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_plan_uses_bf16_only_with_amx_and_the_fused_kernel(monkeypatch, amx):
    monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda: amx)
    model = tiny_lora_model()
    p = T.plan_speed(model, "cpu")
    assert (p.autocast, p.lora_kernel, p.attention) == ("bfloat16" if amx else None, "fused", "per-example")
    assert T.plan_speed(model, "cpu", autocast=False, lora_kernel="peft") == plan("peft")
    with pytest.raises(ValueError, match="lora_kernel"):
        T.plan_speed(model, "cpu", lora_kernel="fast")
    hw_plan = choose_defaults(Hardware("cpu", bf16=amx), max_seq_len=1024)
    assert (hw_plan.dtype, hw_plan.train_compute) == ("float32", "bfloat16" if amx else "float32")
    assert ("AMX" in hw_plan.reason) and hw_plan.micro_batch_size == 4


def test_the_training_process_keeps_freed_memory_for_the_next_step():
    """In its own process (the setting is process-wide): a freed 64 MiB buffer is reused, not faulted in again."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import resource, torch
from pipelines.train import keep_freed_memory

def faults_per_alloc():
    torch.empty(16 << 20).fill_(1.0)   # 64 MiB, every page written: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(16 << 20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8

default = faults_per_alloc()
ok = keep_freed_memory()
print(ok, default, faults_per_alloc())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    ok, default, kept = out.stdout.split()
    if ok != "True":
        pytest.skip("not glibc malloc: nothing to tune")
    assert float(default) > 4000   # glibc's default: mapped fresh and faulted in at every allocation
    assert float(kept) < float(default) / 4   # reused (at most one more growth of the heap over 8 allocations)
