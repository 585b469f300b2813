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


def test_losses_from_the_scored_positions_alone_equal_those_from_every_position(tiny_llama_dir):
    """example_losses asks the model for logits only where a label is scored; a model without logits_to_keep
    (every position) must give the same losses, and the scored logits must really be fewer."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import example_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    class EveryPosition(torch.nn.Module):   # no logits_to_keep: example_losses falls back to full logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((12, 8), (20, 15), (9, 2), (30, 25)):   # long prompts: most positions are not scored
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    widths = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    scored = example_losses(model, examples, batch_size=4)
    hook.remove()
    every = example_losses(EveryPosition(model), examples, batch_size=4)
    assert scored == pytest.approx(every, rel=1e-5)
    assert all(x == x for x in scored)   # no NaN: every example has scored tokens
    # the batches are right-padded and run without an attention mask: each example alone (no padding) agrees
    assert scored == pytest.approx([example_losses(model, [ex])[0] for ex in examples], rel=1e-5)
    # one batch of 4 rows, 29 predicting positions; a position is kept where any row scores its next token:
    # 1-7, 7-10, 14-18 and 24-28, 20 of the 29
    assert widths == [20]


def test_the_cpu_scoring_setup_changes_no_loss(tmp_path, tiny_llama_dir):
    """Under bf16 autocast on a CPU the evaluation scores with bf16 copies of the frozen linears and without PEFT's
    float32 copy of each LoRA input: the same numbers as autocast alone, and the model is as before afterwards."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import _scoring_setup, example_losses

    cand = _adapter(tiny_llama_dir, tmp_path / "cand", 1)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(cand))
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in (6, 14, 25, 40):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    kw = dict(batch_size=64, batch_tokens=200, autocast="bfloat16")
    plain = example_losses(pm, examples, **kw)
    with _scoring_setup(pm, "bfloat16"):
        copies = [m.lorad_compute_weight.dtype for m in pm.modules() if hasattr(m, "lorad_compute_weight")]
        fast = example_losses(pm, examples, **kw)
    assert copies and set(copies) == {torch.bfloat16}
    assert fast == pytest.approx(plain, rel=1e-6)
    assert not any(hasattr(m, "lorad_compute_weight") for m in pm.modules())
    assert example_losses(pm, examples, **kw) == plain


EXTRA = "A B C valid void clause rule binds explain one two three four five six".split()
NUM = "one two three four five six".split()


def _tokenizer():
    """The tiny word-level tokenizer with option letters and a few more words (ids stay below the model's 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHAT_TEMPLATE, TINY_WORDS

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {t: i for i, t in enumerate(specials + list("\n?.,!") + list(TINY_WORDS) + EXTRA)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _records():
    mcq = [{"messages": [{"role": "user", "content": f"question {NUM[i]} ?\nA. yes\nB. no\nC. law"},
                         {"role": "assistant", "content": "ABC"[i % 3]}], "category": "mcq"} for i in range(6)]
    label = [{"messages": [{"role": "user", "content": f"is clause {NUM[i]} valid ?"},
                           {"role": "assistant", "content": "valid" if i % 2 else "void"}], "category": "cls"}
             for i in range(4)]
    free = [{"messages": [{"role": "user", "content": f"explain rule {NUM[i]} ."},
                          {"role": "assistant", "content": f"rule {NUM[i]} binds the party. it is law."}]}
            for i in range(4)]
    return mcq + label + free


def test_answers_are_scored_per_set_and_category_and_cached(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import ScoreCache, evaluate

    cand, inc = _adapter(tiny_llama_dir, tmp_path / "cand", 1), _adapter(tiny_llama_dir, tmp_path / "inc", 2)
    tok = _tokenizer()
    answers = {"examples": 64, "score_kinds": {}, "new_tokens": {"label": 4, "extraction": 6, "free": 6}}
    caches = {"incumbent": ScoreCache()}
    cache = caches["incumbent"].answers
    kw = dict(candidate=cand, incumbent=inc, holdout=_records(), regression={"chat": _records()[6:]},
              max_examples=50, bootstrap_samples=50, latency_prompts=0, max_seq_len=128, answers=answers)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    report = evaluate(model, tok, caches=caches, **kw)
    scores = report["scores"]["holdout"]
    assert scores["kinds"] == {"choice": 6, "label": 4, "free": 4}
    assert set(scores["metrics"]) == {"accuracy", "rouge_l"} and scores["metrics"]["accuracy"]["n"] == 10
    assert set(scores["categories"]) == {"mcq", "cls"} and scores["categories"]["mcq"]["accuracy"]["n"] == 6
    assert 0.0 <= scores["metrics"]["accuracy"]["candidate"] <= 1.0
    assert set(report["scores"]) == {"holdout", "chat"}
    assert report["holdout"]["categories"]["mcq"]["n"] == 6 and report["answer_seconds"] > 0
    assert len(cache) == 14          # the incumbent's answers, once each (chat's records are holdout records too)

    # a second evaluation of the same incumbent on the same sets generates nothing for it
    import pipelines.evaluate as ev

    calls = []
    real = ev.generate_answers
    ev_generate = lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)   # noqa: E731
    try:
        ev.generate_answers = ev_generate
        again = evaluate(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tok, caches=caches, **kw)
    finally:
        ev.generate_answers = real
    assert calls == [8, 8]           # only the candidate's label + free answers were generated, once per set
    assert again["scores"] == report["scores"]


def test_choice_is_the_option_with_the_highest_log_likelihood(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import answer_items, score_answers

    tok = _tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    items = answer_items(_records()[:6], tok, 128, score_kinds={}, new_tokens={"label": 2, "extraction": 2,
                                                                               "free": 2})
    got = score_answers(model, tok, items, loss_kw={}, gen_kw={})
    for item, score in zip(items, got):          # the same choice, one option at a time, summed by hand
        ll = {}
        for letter, ex in item["options"].items():
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            ll[letter] = sum(float(logp[k, ex["input_ids"][k + 1]]) for k in range(len(ex["labels"]) - 1)
                             if ex["labels"][k + 1] != -100)
        assert len(set(ll.values())) == 3             # distinct options, so the choice means something
        assert score == float(max(ll, key=ll.get) == item["gold"])


def test_batched_greedy_answers_equal_one_at_a_time(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.evaluate import generate_answers

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    prompts = [tok(t)["input_ids"] for t in ("a short one", "a much longer prompt with many more words in it",
                                             "mid length prompt here")]
    batched = generate_answers(model, tok, prompts, [5, 5, 5], batch_size=8)
    single = [generate_answers(model, tok, [p], [5])[0] for p in prompts]
    assert batched == single and all(batched)


def test_free_text_answers_only_on_the_holdout_by_default(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import evaluate

    cand = _adapter(tiny_llama_dir, tmp_path / "cand", 1)
    answers = {"examples": 64, "new_tokens": {"label": 2, "extraction": 2, "free": 2}, "free_text_sets": "holdout"}
    report = evaluate(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), _tokenizer(), candidate=cand,
                      incumbent=None, holdout=_records(), regression={"chat": _records()[6:]}, max_examples=50,
                      bootstrap_samples=50, latency_prompts=0, max_seq_len=128, answers=answers)
    assert report["scores"]["holdout"]["kinds"]["free"] == 4
    assert report["scores"]["chat"]["kinds"] == {"label": 4}     # the chat set keeps its label records only


def test_a_promoted_candidate_brings_its_regression_losses_along(tmp_path, tiny_llama_dir):
    """A candidate's regression-set losses are kept in its cache; evaluated later as the incumbent, it is not
    scored on those sets again, and the cached numbers are the ones a fresh evaluation computes."""
    from transformers import AutoModelForCausalLM

    import pipelines.evaluate as ev
    from pipelines.evaluate import ScoreCache, evaluate

    a, b, c = (_adapter(tiny_llama_dir, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    tok = _tokenizer()
    kw = dict(holdout=_records(), regression={"chat": _records()[6:]}, max_examples=50, bootstrap_samples=50,
              latency_prompts=0, max_seq_len=128)
    model = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir)   # noqa: E731
    cache_a = ScoreCache()
    first = evaluate(model(), tok, candidate=a, incumbent=b, caches={"candidate": cache_a, "incumbent": ScoreCache()},
                     **kw)
    assert len(cache_a.losses) == 1           # the one regression set (the holdout is new data every time)

    calls = []
    real = ev.example_losses
    ev.example_losses = lambda m, examples, **k: calls.append(len(examples)) or real(m, examples, **k)
    try:   # a promoted: candidate c against a, with a's cache as the incumbent's
        second = evaluate(model(), tok, candidate=c, incumbent=a,
                          caches={"candidate": ScoreCache(), "incumbent": cache_a}, **kw)
        cached_calls, calls[:] = list(calls), []
        fresh = evaluate(model(), tok, candidate=c, incumbent=a, **kw)
    finally:
        ev.example_losses = real
    chat, holdout = len(_records()[6:]), len(_records())
    assert cached_calls == [holdout, holdout, chat] and calls == [holdout, holdout, chat, chat]
    assert second["regression"]["chat"]["incumbent_loss"] == first["regression"]["chat"]["candidate_loss"]
    for key in ("candidate_loss", "incumbent_loss"):
        assert second["regression"]["chat"][key] == pytest.approx(fresh["regression"]["chat"][key], rel=1e-6)
    assert second["regression"]["chat"]["categories"] == fresh["regression"]["chat"]["categories"]
