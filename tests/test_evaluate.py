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


def test_length_batches_respect_rows_and_padded_tokens():
    from pipelines.evaluate import _length_batches

    lengths = [50, 10, 400, 12, 11, 300, 9]
    batches = _length_batches(lengths, batch_size=3, batch_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 600 or len(b) == 1
    assert [lengths[i] for i in batches[0]] == [9, 10, 11]        # shortest first, three to a batch
    assert _length_batches(lengths, batch_size=8, batch_tokens=0) == [sorted(range(7), key=lambda i: lengths[i])]


def test_token_budget_batching_and_autocast_keep_the_losses(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import example_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 17, 33, 8, 40):
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    plain = example_losses(model, examples, batch_size=1)
    assert example_losses(model, examples, batch_size=64, batch_tokens=80) == pytest.approx(plain, rel=1e-4)
    bf16 = example_losses(model, examples, batch_size=64, batch_tokens=80, autocast="bfloat16")
    assert bf16 == pytest.approx(plain, rel=0.05) and bf16 != pytest.approx(plain, rel=1e-7)
