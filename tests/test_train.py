"""Training: packing without cross-example attention, chunked loss, warm start, resume after kill -9,
NaN abort, and an adapter that plain PEFT loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from daemon.config import TrainConfig, build_config
from pipelines import train as T

ROOT = Path(__file__).resolve().parents[1]

WORDS = "the law court contract judge party shall must not be by with for what who where".split()


def payloads(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        a = " ".join(rng.choice(WORDS[:6]) for _ in range(rng.randint(4, 12)))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def tokenized(tokenizer, n: int, seed: int = 0) -> list[dict]:
    return T.tokenize_payloads(payloads(n, seed), tokenizer, 128)


def load_tiny(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


FAST = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-2, micro_batch_size=2,
                   grad_accum_steps=2, checkpoint_every_steps=2, warmup_ratio=0.0)


def test_packed_examples_do_not_attend_to_each_other(tiny_llama_dir):
    model = load_tiny(tiny_llama_dir).eval()
    a, b = list(range(5, 15)), list(range(20, 27))
    packed = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        together = model.model(input_ids=packed, position_ids=pos, use_cache=False).last_hidden_state
        alone_b = model.model(input_ids=torch.tensor([b]), use_cache=False).last_hidden_state
        naive = model.model(input_ids=packed, use_cache=False).last_hidden_state  # positions not reset
    torch.testing.assert_close(together[0, len(a):], alone_b[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(naive[0, len(a):], alone_b[0], atol=1e-3), "the test must be able to fail"


def test_first_token_of_each_packed_example_is_never_a_target(tiny_tokenizer):
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    seqs = T.make_sequences(examples, 16, packing=True)
    for s in seqs:
        for p, lab in zip(s["position_ids"], s["labels"]):
            if p == 0:
                assert lab == T.IGNORE


def test_chunked_loss_equals_the_plain_loss(tiny_llama_dir):
    model = load_tiny(tiny_llama_dir)
    ids = torch.randint(5, 60, (2, 20))
    labels = ids.clone()
    labels[:, :6] = T.IGNORE
    pos = torch.arange(20).expand(2, 20)
    plain = model(input_ids=ids, labels=labels, use_cache=False).loss * (labels[:, 1:] != T.IGNORE).sum()
    chunked = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=7)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)


def test_lr_schedule_warms_up_then_decays():
    lrs = [T.lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and all(x >= y for x, y in zip(lrs[10:], lrs[11:]))


def test_train_lowers_loss_and_writes_a_plain_peft_adapter(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    examples = tokenized(tiny_tokenizer, 64)
    out = T.train(examples, run_dir=tmp_path / "run", model=load_tiny(tiny_llama_dir), tokenizer=tiny_tokenizer,
                  cfg=FAST, max_seq_len=128, max_steps=20, progress=False)
    assert out.status == "completed" and out.steps == 20
    # A tiny random model with a frozen random LM head cannot go far below ~4.4 (its logits are tiny),
    # so this checks that training moves the loss at all, and in the right direction.
    assert out.loss_last < out.loss_first * 0.95, out.history
    assert out.tokens > 0 and out.tokens_per_second > 0
    files = sorted(p.name for p in Path(out.adapter_dir).iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or \
        {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[-1])["step"] == 20
    # Plain PEFT loads it and it changes the model's output.
    x = torch.tensor([examples[0]["input_ids"]])
    base = load_tiny(tiny_llama_dir).eval()
    with torch.no_grad():
        ref = base(x).logits
        tuned = PeftModel.from_pretrained(load_tiny(tiny_llama_dir), out.adapter_dir).eval()(x).logits
    assert not torch.allclose(ref, tuned, atol=1e-3)


def test_warm_start_loads_the_parent_weights(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    parent = T.train(tokenized(tiny_tokenizer, 32), run_dir=tmp_path / "p", model=load_tiny(tiny_llama_dir),
                     tokenizer=tiny_tokenizer, cfg=FAST, max_seq_len=128, max_steps=8, progress=False)
    x = torch.tensor([[3, 10, 11, 12, 13]])
    warm = T.attach_lora(load_tiny(tiny_llama_dir), FAST, Path(parent.adapter_dir), gradient_checkpointing=False)
    fresh = T.attach_lora(load_tiny(tiny_llama_dir), FAST, None, gradient_checkpointing=False)
    ref = PeftModel.from_pretrained(load_tiny(tiny_llama_dir), parent.adapter_dir)
    with torch.no_grad():
        w, f, r = (m.eval()(x).logits for m in (warm, fresh, ref))
    torch.testing.assert_close(w, r)
    assert not torch.allclose(w, f, atol=1e-4)
    # A parent of another LoRA shape cannot be warm-started from: clear error, not silent garbage.
    with pytest.raises(T.TrainingError, match="cannot warm-start"):
        T.attach_lora(load_tiny(tiny_llama_dir), TrainConfig(lora_r=8), Path(parent.adapter_dir),
                      gradient_checkpointing=False)


def test_non_finite_loss_aborts(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model = load_tiny(tiny_llama_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(T.TrainingError, match="loss is nan at step 0"):
        T.train(tokenized(tiny_tokenizer, 16), run_dir=tmp_path / "r", model=model, tokenizer=tiny_tokenizer,
                cfg=FAST, max_seq_len=128, max_steps=3, progress=False)
    assert not (tmp_path / "r" / "adapter").exists()


def test_wall_clock_budget_stops_cleanly(tiny_llama_dir, tiny_tokenizer, tmp_path):
    ticks = iter(range(0, 10_000, 6))  # each clock read advances 6 s; the budget is 10 s
    cfg = TrainConfig(**{**FAST.__dict__, "max_wall_seconds": 10})
    out = T.train(tokenized(tiny_tokenizer, 32), run_dir=tmp_path / "r", model=load_tiny(tiny_llama_dir),
                  tokenizer=tiny_tokenizer, cfg=cfg, max_seq_len=128, max_steps=50, progress=False,
                  clock=lambda: float(next(ticks)))
    assert out.status == "budget" and 0 < out.steps < 50
    assert Path(out.adapter_dir, "adapter_model.safetensors").is_file()


def test_empty_data_is_a_clear_error(tiny_llama_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(T.TrainingError, match="no training examples"):
        T.train([], run_dir=tmp_path / "r", model=load_tiny(tiny_llama_dir), tokenizer=tiny_tokenizer, cfg=FAST,
                max_seq_len=128, progress=False)


def _job(tmp_path: Path, name: str, model_dir: Path, steps: int) -> Path:
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "model": {"base_model": str(model_dir)},
                        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64},
                        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "learning_rate": 3e-3,
                                  "micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 1}})
    run_dir = tmp_path / name
    T.write_job(run_dir, payloads=payloads(120, seed=3), config=cfg.to_dict(mask_secrets=False),
                parent_adapter=None, max_steps=steps)
    return run_dir


@pytest.fixture(scope="module")
def slower_llama_dir(tmp_path_factory, tiny_tokenizer):
    """Big enough that one step takes tens of ms, so a kill right after the first checkpoint lands mid-run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("slower-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.mark.integration
def test_kill_9_then_resume_gives_the_same_adapter(tmp_path, slower_llama_dir):
    from safetensors.torch import load_file

    steps = 12
    ref_dir = _job(tmp_path, "reference", slower_llama_dir, steps)
    reference = T.run_job(ref_dir, progress=False)

    run_dir = _job(tmp_path, "killed", slower_llama_dir, steps)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", str(run_dir), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and T.latest_checkpoint(run_dir) is None:
        time.sleep(0.005)
    ckpt = T.latest_checkpoint(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, proc.stderr.read().decode()[-2000:]
    killed_at = json.loads((ckpt / "state.json").read_text())["step"]
    assert killed_at < steps, "the run finished before the kill; the test did not test resuming"
    assert not (run_dir / "adapter").exists()

    resumed = T.run_job(run_dir, progress=False)
    assert resumed.resumed_from_step >= killed_at and resumed.steps == steps
    a = load_file(str(Path(reference.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert resumed.history == pytest.approx(reference.history, rel=1e-4)


def test_records_whose_prompt_fills_the_sequence_are_reported_not_silently_dropped(tmp_path, tiny_llama_dir,
                                                                                   capsys):
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")}, "model": {"base_model": str(tiny_llama_dir)},
                        "data": {"max_seq_len": 24, "max_prompt_tokens": 512, "max_response_tokens": 24},
                        "train": {"lora_r": 4, "lora_alpha": 8, "micro_batch_size": 2, "grad_accum_steps": 1}})
    long_prompt = {"messages": [{"role": "user", "content": " ".join(WORDS * 8)},
                                {"role": "assistant", "content": "yes"}]}
    run_dir = tmp_path / "all-long"
    T.write_job(run_dir, payloads=[long_prompt] * 6, config=cfg.to_dict(mask_secrets=False), parent_adapter=None,
                max_steps=1)
    with pytest.raises(T.TrainingError, match=r"6 of 6 records have no answer tokens within data.max_seq_len \(24"):
        T.run_job(run_dir, progress=False)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    run_dir = tmp_path / "some-long"
    T.write_job(run_dir, payloads=[long_prompt] * 2 + [short] * 4, config=cfg.to_dict(mask_secrets=False),
                parent_adapter=None, max_steps=1)
    assert T.run_job(run_dir, progress=False).steps == 1
    assert "skipped 2 of 6 records have no answer tokens" in capsys.readouterr().err
