"""Training options: curriculum (easy -> hard by the champion's loss), per-category loss weights,
continued pre-training on raw text first, the domain-data floor of the replay mix."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from daemon.config import ConfigError, DataConfig, TrainConfig, build_config, parse_category_weights
from daemon.store import Store
from pipelines import train as T
from daemon.runs import build_snapshot, plan_snapshot, snapshot_payloads
from pipelines.data import annotate_examples, difficulty_stages, domain_floor, stage_schedule
from pipelines.ingest import ingest_file

FAST = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-2, micro_batch_size=2,
                   grad_accum_steps=1, checkpoint_every_steps=100, warmup_ratio=0.0)


# ----------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("items, expected", [
    ([], {}),
    (["law=2", "chat=0.5"], {"law": 2.0, "chat": 0.5}),
    (["a=b=3"], {"a=b": 3.0}),          # the last '=' separates the weight
    (["off=0"], {"off": 0.0}),
])
def test_category_weights_parse(items, expected):
    assert parse_category_weights(items) == expected


@pytest.mark.parametrize("items, message", [
    (["law"], "must look like"), (["law=-1"], "must look like"), (["=2"], "must look like"),
    (["law=x"], "must look like"), (["law=inf"], "must look like"), (["law=1", "law=2"], "weighted twice"),
])
def test_bad_category_weights_are_refused_by_the_config(items, message):
    with pytest.raises(ValueError, match=message):
        parse_category_weights(items)
    with pytest.raises(ConfigError, match="train.category_weights"):
        build_config({"train": {"category_weights": items}})


def test_difficulty_stages_are_equal_count_loss_quantiles():
    losses = [0.5, 3.0, 1.0, float("nan"), 2.0, 0.1, 4.0, 1.5]
    stages = difficulty_stages(losses, 4)
    assert stages == [0, 2, 1, 3, 2, 0, 3, 1]
    for s in range(3):   # every loss of an easier stage is below every loss of the next one
        assert max(losses[i] for i in range(8) if stages[i] == s) < min(
            x for i, x in enumerate(losses) if stages[i] == s + 1 and math.isfinite(x))
    assert difficulty_stages(losses, 1) == [0] * 8


def test_stage_schedule_runs_phases_in_turn_and_stages_easy_first():
    # phase 0: one stage of 2 batches; phase 1: stages of 3 and 3 batches.
    groups = [[[0, 1]], [[2, 3, 4], [5, 6, 7]]]
    order = stage_schedule(groups, 16, seed=3)
    assert len(order) == 16
    assert sorted(order[:4]) == [0, 0, 1, 1]          # phase 0 gets 2/8 of 16 micro-batches, first
    rest = order[4:]
    assert set(rest[:3]) == {2, 3, 4} and set(rest[3:6]) == {5, 6, 7}   # a pass: easy stage, then hard
    assert set(rest[6:9]) == {2, 3, 4}                 # the next pass starts easy again
    assert stage_schedule(groups, 16, seed=3) == order
    assert stage_schedule(groups, 16, seed=4) != order
    # A short run still reaches the last phase (proportionally it would get no micro-batch at all).
    short = stage_schedule([[list(range(9))], [[9]]], 3, seed=0)
    assert len(short) == 3 and short[-1] == 9 and all(b < 9 for b in short[:2])


def test_annotate_examples_marks_weights_phases_and_stages():
    examples = [{"input_ids": [1, 2], "labels": [1, 2], "category": c, "text": text}
                for c, text in [("law", True), ("chat", False), ("law", False), ("drop", False), (None, True)]]
    out = annotate_examples(examples, category_weights={"law": 2.0, "drop": 0.0}, text_first=True,
                            difficulty=[0.1, 5.0, 3.0, 9.0, 2.0], stages=2)
    assert [ex.get("category") for ex in out] == ["law", "chat", "law", None]   # weight 0 drops "drop"
    assert [ex.get("weight", 1.0) for ex in out] == [2.0, 1.0, 2.0, 1.0]
    assert [ex["phase"] for ex in out] == [0, 1, 1, 0]                             # raw text first
    assert [ex["stage"] for ex in out] == [0, 1, 0, 1]   # quantiles within each phase
    assert "stage" not in annotate_examples(examples)[0] and "weight" not in examples[0]


def test_domain_floor_keeps_new_records_at_least_that_share_of_the_text():
    rng = random.Random(0)
    replay = [(i, n) for i, n in enumerate([500, 20, 30, 400, 25, 10])]
    kept = domain_floor(replay, 100, 0.5, random.Random(1))
    assert sum(n for i, n in replay if i in kept) <= 100
    assert set(kept) == {1, 2, 4, 5}        # the long documents do not fit; every short one does
    assert domain_floor(replay, 100, 1.0, rng) == []
    with pytest.raises(ValueError, match="min_domain_fraction"):
        domain_floor(replay, 100, 0.0, rng)


# ----------------------------------------------------------------------------- snapshots


def _ingest(store: Store, path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert ingest_file(path, store, DataConfig(near_dup_threshold=1.0)).accepted == len(rows)


def test_snapshot_respects_the_domain_floor_and_payloads_carry_categories(tmp_path):
    cfg = DataConfig(near_dup_threshold=1.0, holdout_fraction=0.1, replay_fraction=0.5, replay_unit="records",
                     category_cap_ratio=0.0)
    store = Store(tmp_path / "s.db")
    # Old data: long and short documents. New data: short answers in category "contract".
    _ingest(store, tmp_path / "old.jsonl", [{"text": f"document {i} " + "lorem ipsum " * (200 if i % 2 else 2)}
                                            for i in range(120)])
    build_snapshot(store, cfg, seed=1)
    _ingest(store, tmp_path / "new.jsonl", [{"input": f"q{i}?", "output": f"short answer {i}", "category": "contract"}
                                            for i in range(60)])
    plain = plan_snapshot(store, cfg, seed=2)
    floored_cfg = DataConfig(**{**cfg.__dict__, "min_domain_fraction": 0.5})
    floored = build_snapshot(store, floored_cfg, seed=2)
    assert len(plain.replay) == len(plain.new)           # replay_fraction 0.5 by count
    assert 0 < len(floored.replay) < len(plain.replay)
    chars = dict(store.query("SELECT id, n_chars FROM records"))
    new_chars = sum(chars[r] for r in floored.new)
    replay_chars = sum(chars[r] for r in floored.replay)
    assert new_chars / (new_chars + replay_chars) >= 0.5
    assert floored.manifest["replay_dropped_by_floor"] > 0
    assert floored.manifest["domain_fraction_chars"] >= 0.5
    cats = {p.get("category") for _, role, p in snapshot_payloads(store, floored.id) if role == "new"}
    assert cats == {"contract"}


# ----------------------------------------------------------------------------- the trainer


def _examples(tiny_tokenizer, n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the law court contract judge party shall must not be by with for".split()
    payloads = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
        a = " ".join(rng.choice(words[:5]) for _ in range(rng.randint(3, 8)))
        payloads.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "category": "law" if i % 2 else "chat"})
    return T.tokenize_payloads(payloads, tiny_tokenizer, 64)


def _model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def test_weighted_loss_matches_the_definition(tiny_llama_dir):
    """Fused head and chunked path both give sum(w * CE) and its gradient."""
    import torch.nn.functional as F

    model = _model(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (2, 12))
    labels = ids.clone()
    labels[:, :3] = T.IGNORE
    pos = torch.arange(12).expand(2, 12)
    weights = torch.ones(2, 12)
    weights[1] = 3.0
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)   # something upstream must need a gradient for the fused path
    got = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=5, decoder_kwargs={"lorad_token_weights": weights})
    got.backward()
    grad_fused = emb.weight.grad.clone()
    emb.weight.grad = None
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none",
                         ignore_index=T.IGNORE)
    want = (ce * weights[:, 1:].reshape(-1)).sum()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_fused, emb.weight.grad, rtol=1e-3, atol=1e-5)
    with torch.no_grad():   # the checkpointed path (no grad): same value
        again = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=5,
                                   decoder_kwargs={"lorad_token_weights": weights})
    torch.testing.assert_close(again, want.detach(), rtol=1e-4, atol=1e-4)
    unweighted = T.chunked_loss_sum(model, ids, labels, pos, chunk_tokens=5)
    assert not torch.allclose(unweighted, want.detach())


def test_sequences_carry_weights_through_packing(tiny_tokenizer):
    examples = annotate_examples(_examples(tiny_tokenizer, 6), category_weights={"law": 2.5})
    for packing in (True, False):
        seqs = T.make_sequences(examples, 64, packing)
        assert all(len(s["weights"]) == len(s["input_ids"]) for s in seqs)
        assert sum(T.labelled_weight(s) for s in seqs) == pytest.approx(
            sum(ex.get("weight", 1.0) * sum(1 for lab in ex["labels"][1:] if lab != T.IGNORE) for ex in examples))


def test_staged_batches_never_mix_phases_or_stages(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 12)
    marked = annotate_examples(examples, difficulty=[float(i) for i in range(12)], stages=3)
    seqs, batches, groups = T.make_staged_batches(marked, 64, True, 2)
    assert groups is not None and len(groups) == 1 and len(groups[0]) == 3
    covered = sorted(b for stage in groups[0] for b in stage)
    assert covered == list(range(len(batches)))
    # Each example's tokens end up in a sequence of its own stage.
    stage_tokens = [sum(len(marked[i]["input_ids"]) for i in range(12) if marked[i]["stage"] == s) for s in range(3)]
    got = [sum(len(seqs[i]["input_ids"]) for b in groups[0][s] for i in batches[b]) for s in range(3)]
    assert got == stage_tokens
    plain = T.make_staged_batches(examples, 64, True, 2)
    assert plain[2] is None and plain[0] == T.make_sequences(examples, 64, True)


def test_category_weight_changes_what_is_learned(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Up-weighting one category lowers its loss more than the plain run does (same data, same steps)."""
    from pipelines.evaluate import example_losses

    examples = _examples(tiny_tokenizer, 16)

    def run(name: str, weights: dict) -> dict:
        marked = annotate_examples(examples, category_weights=weights)
        out = T.train(marked, run_dir=tmp_path / name, model=_model(tiny_llama_dir), tokenizer=tiny_tokenizer, cfg=FAST,
                      max_seq_len=64, max_steps=8, progress=False)
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(_model(tiny_llama_dir), out.adapter_dir).eval()
        losses = example_losses(tuned, examples, pad_id=0)
        by = {}
        for ex, loss in zip(examples, losses):
            by.setdefault(ex["category"], []).append(loss)
        return {c: sum(v) / len(v) for c, v in by.items()}

    plain, law_heavy = run("plain", {}), run("law", {"law": 4.0, "chat": 0.25})
    assert law_heavy["law"] - law_heavy["chat"] < plain["law"] - plain["chat"], (plain, law_heavy)


def test_curriculum_and_text_first_order_the_run(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """apply_training_options scores with the champion once (cached), and train() follows the schedule."""
    text = T.tokenize_payloads([{"text": "the law of the court is the law"}] * 4, tiny_tokenizer, 64)
    examples = text + _examples(tiny_tokenizer, 12)
    cfg = build_config({"train": {"curriculum": "easy_to_hard", "curriculum_stages": 2,
                                  "continued_pretraining": "first"}})
    model = _model(tiny_llama_dir)
    marked, model = T.apply_training_options(examples, cfg, model, None, tmp_path)
    cache = json.loads((tmp_path / "curriculum.json").read_text())
    assert len(cache["losses"]) == len(examples)
    assert [ex["phase"] for ex in marked[:4]] == [0, 0, 0, 0] and {ex["phase"] for ex in marked[4:]} == {1}
    chat = [(ex["stage"], loss) for ex, loss in zip(marked[4:], cache["losses"][4:])]
    assert max(loss for s, loss in chat if s == 0) <= min(loss for s, loss in chat if s == 1)
    again, _ = T.apply_training_options(examples, cfg, model, None, tmp_path)   # from the cache
    assert [ex["stage"] for ex in again] == [ex["stage"] for ex in marked]

    seen: list[float] = []
    out = T.train(marked, run_dir=tmp_path / "run", model=model, tokenizer=tiny_tokenizer, cfg=FAST, max_seq_len=64,
                  max_steps=6, progress=False, on_step=lambda r: seen.append(r["loss"]))
    assert out.steps == 6 and all(math.isfinite(x) for x in seen)


def test_champion_scoring_leaves_a_clean_base_for_the_warm_start(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Scoring under the parent adapter, then training from it, trains the same as without scoring."""
    examples = _examples(tiny_tokenizer, 8)
    parent = T.train(examples, run_dir=tmp_path / "parent", model=_model(tiny_llama_dir), tokenizer=tiny_tokenizer,
                     cfg=FAST, max_seq_len=64, max_steps=3, progress=False)
    model = _model(tiny_llama_dir)
    losses, model = T.champion_losses(model, examples, Path(parent.adapter_dir), tmp_path / "scored")
    assert not any("lora" in n for n, _ in model.named_parameters())
    base_losses, _ = T.champion_losses(_model(tiny_llama_dir), examples, None, tmp_path / "base")
    assert sum(losses) < sum(base_losses)      # the parent learned this data: it is the champion scoring
    a = T.train(examples, run_dir=tmp_path / "a", model=model, tokenizer=tiny_tokenizer, cfg=FAST, max_seq_len=64,
                max_steps=2, progress=False, parent_adapter=Path(parent.adapter_dir))
    b = T.train(examples, run_dir=tmp_path / "b", model=_model(tiny_llama_dir), tokenizer=tiny_tokenizer, cfg=FAST,
                max_seq_len=64, max_steps=2, progress=False, parent_adapter=Path(parent.adapter_dir))
    assert a.history == pytest.approx(b.history, rel=1e-5)


def test_data_files_given_to_lorad_train_carry_their_categories(tmp_path):
    """`lorad train --data FILE` reads files through read_files: category must reach the payload too."""
    from daemon.evaluation import read_files

    f = tmp_path / "d.jsonl"
    f.write_text('{"input": "q1", "output": "a1", "category": "statutes"}\n{"input": "q2", "output": "a2"}\n'
                 '{"input": "q3", "output": ""}\n', encoding="utf-8")
    payloads, problems = read_files([str(f)])
    assert [p.get("category") for p in payloads] == ["statutes", None]
    assert len(problems) == 1 and problems[0].endswith("d.jsonl: line 3: field 'output' is empty")
