"""Exports of a registered adapter on the real default model (SmolLM2-135M): merged, bnb4, ONNX.

One adapter with small random LoRA weights (a fresh LoRA has B = 0 and would merge to the base
model unchanged, so nothing would be tested) is registered once per module; each format is exported
through ``export_version`` (the code behind ``lorad export``) and then loaded the way a user would:
plain transformers for merged and bnb4, onnxruntime for ONNX. Each export is compared with the
unmerged base + adapter in PyTorch (greedy tokens, losses).
"""

from __future__ import annotations

import json
import math

import pytest

PROMPTS = ["What makes a contract valid?", "Hello, how are you today?", "合同成立需要哪些条件？"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def registered(tmp_path_factory, real_model_cache):
    """(cfg, store, version, reference) with a registered random-LoRA adapter on the default model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from daemon import registry
    from daemon.config import build_config
    from daemon.store import open_store
    from pipelines.models import EMBEDDED_DEFAULT, load_base_model

    state = tmp_path_factory.mktemp("export-state")
    (state / "cache").symlink_to(real_model_cache, target_is_directory=True)
    cfg = build_config({"paths": {"state_dir": str(state)}, "data": {"max_seq_len": 256, "max_prompt_tokens": 128,
                                                                      "max_response_tokens": 128}})
    model, tokenizer = load_base_model(EMBEDDED_DEFAULT, state / "cache", dtype="float32", device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)   # small enough to keep the model fluent, large enough to change logits
    adapter_src = tmp_path_factory.mktemp("adapter-src")
    peft_model.save_pretrained(str(adapter_src), safe_serialization=True)
    store = open_store(state)
    version = registry.register_adapter(store, state, adapter_src, base_model=EMBEDDED_DEFAULT)
    peft_model.eval()
    reference = {"tokens": [_greedy_torch(peft_model, tokenizer, p) for p in PROMPTS],
                 "loss": _mean(_losses(peft_model, tokenizer)),
                 "base_loss": None}
    with peft_model.disable_adapter():
        reference["base_tokens"] = [_greedy_torch(peft_model, tokenizer, p) for p in PROMPTS]
        reference["base_loss"] = _mean(_losses(peft_model, tokenizer))
    yield cfg, store, version, reference, tokenizer
    store.close()


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def _greedy_torch(model, tokenizer, prompt: str) -> list[int]:
    import torch

    ids = torch.tensor([_prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


EVAL_RECORDS = [
    {"messages": [{"role": "user", "content": "What is a contract?"},
                  {"role": "assistant", "content": "A contract is an agreement between parties that the law enforces."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "user", "content": "什么是合同？"},
                  {"role": "assistant", "content": "合同是民事主体之间设立、变更、终止民事法律关系的协议。"}]},
]


def _examples(tokenizer):
    from pipelines.data import tokenize_record

    return [tokenize_record(r, tokenizer, 256) for r in EVAL_RECORDS]


def _losses(model, tokenizer) -> list[float]:
    from pipelines.evaluate import example_losses

    return example_losses(model, _examples(tokenizer), pad_id=tokenizer.pad_token_id)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def merged(registered, tmp_path_factory):
    from daemon.exports import export_version

    cfg, store, version, _, _ = registered
    out = tmp_path_factory.mktemp("exports") / "merged"
    return export_version(store, cfg, version, "merged", out=out), out


@pytest.mark.slow
def test_merged_export_loads_with_plain_transformers(registered, merged):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.export import MANIFEST

    cfg, store, version, reference, _ = registered
    result, out = merged
    assert result.format == "merged" and out.is_dir()
    assert not (out / "adapter_config.json").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == version and manifest["adapter_sha256"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert not any("lora" in k for k in f.keys())

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    tokens = [_greedy_torch(model, tokenizer, p) for p in PROMPTS]
    assert tokens == reference["tokens"]
    assert tokens != reference["base_tokens"], "the adapter changed nothing: the merge would be untested"
    loss = _mean(_losses(model, tokenizer))
    assert abs(loss - reference["loss"]) < 0.02, (loss, reference["loss"])


@pytest.mark.slow
def test_bnb4_export_is_smaller_and_still_close(registered, merged, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.exports import export_version

    cfg, store, version, reference, _ = registered
    result = export_version(store, cfg, version, "bnb4", out=tmp_path / "bnb4")
    assert result.details["linear4bit_layers"] == 30 * 7
    # The 135M model ties a 28M-parameter embedding to its head; bitsandbytes keeps it in 16 bits.
    assert result.bytes_weights < 0.6 * merged[0].bytes_weights, (result.bytes_weights, merged[0].bytes_weights)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb4", device_map={"": "cpu"})
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bnb4")
    loss = _mean(_losses(model, tokenizer))
    # NF4 costs some quality; it must stay far nearer the merged model than a broken export would be.
    assert math.isfinite(loss) and abs(loss - reference["loss"]) < 0.5, (loss, reference["loss"])


@pytest.mark.slow
def test_onnx_export_matches_pytorch_greedy_tokens(registered, tmp_path):
    from daemon.exports import export_version
    from pipelines.export import OnnxCausalLM

    cfg, store, version, reference, tokenizer = registered
    result = export_version(store, cfg, version, "onnx", out=tmp_path / "onnx")
    assert result.details["parity_max_abs_logit_diff"] < 1e-2
    runner = OnnxCausalLM(tmp_path / "onnx")
    tokens = [runner.generate(_prompt_ids(tokenizer, p), max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    assert tokens == reference["tokens"]
    losses = runner.example_losses(_examples(tokenizer), pad_id=tokenizer.pad_token_id)
    assert abs(_mean(losses) - reference["loss"]) < 1e-3


@pytest.mark.slow
def test_export_refuses_to_overwrite_and_unknown_versions(registered, tmp_path):
    from daemon.registry import AdapterError
    from daemon.exports import export_version
    from pipelines.export import ExportError

    cfg, store, version, _, _ = registered
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_version(store, cfg, version, "merged", out=out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(AdapterError, match="unknown adapter version"):
        export_version(store, cfg, "v9999-deadbeef", "merged", out=tmp_path / "x")
    with pytest.raises(ExportError, match="no champion"):
        export_version(store, cfg, "champion", "merged", out=tmp_path / "y")
    with pytest.raises(ExportError, match="format must be one of"):
        export_version(store, cfg, version, "gguf", out=tmp_path / "z")


def test_cli_export_reports_problems_without_loading_a_model(tmp_path, capsys):
    from daemon.cli import EXIT_FAILED, EXIT_USAGE, main
    from daemon.store import open_store

    state = tmp_path / "state"
    assert main(["export", "v0001-aaaaaaaa", "--format", "merged", "--state", str(state)]) == EXIT_FAILED
    assert "no lorad state" in capsys.readouterr().err
    open_store(state).close()
    assert main(["export", "v0001-aaaaaaaa", "--format", "merged", "--state", str(state)]) == EXIT_FAILED
    assert "unknown adapter version 'v0001-aaaaaaaa'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", "v0001-aaaaaaaa", "--format", "gguf", "--state", str(state)])
    assert exc.value.code == EXIT_USAGE
