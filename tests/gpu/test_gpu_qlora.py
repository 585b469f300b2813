"""QLoRA on one GPU: a base loaded in 4 bits (bitsandbytes NF4) trains a LoRA adapter."""

from __future__ import annotations

import json
import math

import pytest

from gpu_common import GPU

pytestmark = GPU


def test_a_4bit_base_trains_an_adapter(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the bitsandbytes package")
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from gpu_common import chat_payloads
    from daemon.config import TrainConfig
    from pipelines import train as T
    from pipelines.models import load_base_model

    model, tok = load_base_model(str(tiny_llama_dir), tmp_path / "cache", dtype="bfloat16", quantization="4bit",
                                 device="cuda", for_training=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the base is not 4-bit"
    examples = T.tokenize_payloads(chat_payloads(40, seed=1), tok, 128)
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-3, micro_batch_size=2,
                      grad_accum_steps=1, checkpoint_every_steps=10**6, warmup_ratio=0.0)
    out = T.train(examples, run_dir=tmp_path / "run", model=model, tokenizer=tok, cfg=cfg, max_seq_len=128,
                  max_steps=4, progress=False)
    assert out.steps == 4 and all(math.isfinite(x) for x in out.history), out.history
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in weights.items()), "LoRA B never moved"
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 4
