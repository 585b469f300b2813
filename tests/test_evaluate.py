"""pipelines.evaluate: the base model's regression loss beside the incumbent's (promote.regression_reference)."""

import pytest


def _adapter(base_dir, out, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def test_regression_sets_report_the_base_models_loss(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.evaluate import evaluate

    cand, inc = _adapter(tiny_llama_dir, tmp_path / "cand", 1), _adapter(tiny_llama_dir, tmp_path / "inc", 2)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = [{"messages": [{"role": "user", "content": f"question {i} about the law"},
                             {"role": "assistant", "content": f"answer number {i} with words"}]} for i in range(12)]
    kw = dict(holdout=records[:6], regression={"chat": records[6:]}, max_examples=6, bootstrap_samples=50,
              latency_prompts=0, max_seq_len=64)

    def run(incumbent, **extra):
        return evaluate(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tok, candidate=cand,
                        incumbent=incumbent, **kw, **extra)["regression"]["chat"]

    vs_base = run(None)                      # the incumbent is the base: its loss is the base's
    assert vs_base["base_loss"] == vs_base["incumbent_loss"]
    plain = run(inc)                         # an adapter incumbent: no extra pass unless asked
    assert "base_loss" not in plain
    both = run(inc, regression_base=True)
    assert both["base_loss"] == pytest.approx(vs_base["base_loss"], rel=1e-6)
    assert both["incumbent_loss"] == pytest.approx(plain["incumbent_loss"], rel=1e-6)
    assert both["incumbent_loss"] != pytest.approx(both["base_loss"], rel=1e-6)   # the adapter changes the loss
