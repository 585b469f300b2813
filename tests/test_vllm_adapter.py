"""lorad's adapters are what vLLM's runtime LoRA loader accepts (file format; vLLM itself is not installed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import TrainConfig
from pipelines import vllm_adapter as V

FAST = TrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, micro_batch_size=2, grad_accum_steps=1,
                   checkpoint_every_steps=100)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_llama_dir, tiny_tokenizer) -> Path:
    """A real lorad run (2 steps, all-linear LoRA) on a tiny Llama: its adapter folder."""
    from transformers import AutoModelForCausalLM

    from pipelines import train as T

    payloads = [{"messages": [{"role": "user", "content": "what is the law"},
                              {"role": "assistant", "content": "the court shall judge"}]}] * 8
    examples = T.tokenize_payloads(payloads, tiny_tokenizer, 128)
    out = T.train(examples, run_dir=tmp_path_factory.mktemp("run"), model=AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir), tokenizer=tiny_tokenizer, cfg=FAST, max_seq_len=128, max_steps=2, progress=False)
    return Path(out.adapter_dir)


def test_a_lorad_adapter_passes_vllms_checks(trained_adapter):
    assert V.check_adapter(trained_adapter, max_lora_rank=16) == []
    cfg = json.loads((trained_adapter / V.CONFIG).read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg.get("modules_to_save") and not cfg.get("use_dora")
    names = V.safetensors_header(trained_adapter / V.WEIGHTS)
    # every linear of attention and MLP, each as a lora_A/lora_B pair under base_model.model.
    leaves = {V.parse_lora_name(n)[0].rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(n.startswith("base_model.model.model.layers.") and ".default." not in n for n in names)


def test_the_fsdp_save_path_writes_the_same_format(tmp_path, tiny_llama_dir):
    """FSDP saves from gathered full tensors (state_dict=...): the names must still be vLLM's."""
    from transformers import AutoModelForCausalLM

    from pipelines.train import distributed as D
    from pipelines.train import attach_lora

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), FAST, None, gradient_checkpointing=False)
    model.save_pretrained(str(tmp_path), safe_serialization=True, state_dict=D.lora_state_full(model))
    assert V.check_adapter(tmp_path) == []
    assert len(V.safetensors_header(tmp_path / V.WEIGHTS)) == 2 * 7 * 2   # 2 layers x 7 linears x (A, B)


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    cfg = json.loads((src / V.CONFIG).read_text()) | config_changes
    (dst / V.CONFIG).write_text(json.dumps(cfg))
    (dst / V.WEIGHTS).write_bytes((src / V.WEIGHTS).read_bytes())
    return dst


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_modules": ["q_proj", "router"]}, "'router'"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"r": 64}, "do not form a rank-64 pair"),
])
def test_what_vllm_refuses_is_reported(trained_adapter, tmp_path, change, message):
    problems = V.check_adapter(_copy(trained_adapter, tmp_path / "a", **change))
    assert any(message in p for p in problems), problems


def test_rank_above_the_servers_limit_and_adapter_names_in_keys(trained_adapter, tmp_path):
    assert any("--max-lora-rank 8" in p for p in V.check_adapter(trained_adapter, max_lora_rank=1))
    from safetensors.torch import load_file, save_file

    bad = _copy(trained_adapter, tmp_path / "b")
    tensors = load_file(str(bad / V.WEIGHTS))
    save_file({k.replace(".lora_A.", ".lora_A.default."): v for k, v in tensors.items()}, str(bad / V.WEIGHTS))
    assert any("'.default.'" in p for p in V.check_adapter(bad))


def test_load_and_unload_requests_use_the_immutable_version(tmp_path):
    assert V.load_request("v0007", tmp_path) == {"lora_name": "v0007", "lora_path": str(tmp_path.resolve())}
    assert V.unload_request("v0007") == {"lora_name": "v0007"}
