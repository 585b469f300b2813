"""Snapshots (roles, idempotence, replay share, category cap), completion-only labels, packing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import DataConfig
from daemon.runs import build_snapshot, load_snapshot, plan_snapshot, snapshot_payloads, write_snapshot
from daemon.store import Store
from pipelines.data import IGNORE_INDEX, NothingToSnapshot, pack, snapshot_id, tokenize_record
from pipelines.ingest import ingest_file

CFG = DataConfig(near_dup_threshold=1.0, holdout_fraction=0.2, replay_fraction=0.3, replay_unit="records",
                 category_cap_ratio=0.0)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def add_records(store: Store, tmp_path: Path, name: str, n: int, *, start: int = 0,
                categories: dict[str, int] | None = None) -> None:
    """Ingest n distinct records (or the given count per category) from a JSONL file."""
    rows = []
    if categories:
        for cat, count in categories.items():
            rows += [{"input": f"{cat} question {i}", "output": "answer", "category": cat} for i in range(count)]
    else:
        rows = [{"input": f"question {start + i}", "output": f"answer {start + i}"} for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = ingest_file(path, store, CFG)
    assert r.accepted == len(rows)


def ids(store: Store, sql: str, params: tuple = ()) -> set[int]:
    return {row[0] for row in store.query(sql, params)}


# ----------------------------------------------------------------------------- snapshots


def test_first_snapshot_has_new_and_holdout_roles_and_is_idempotent(tmp_path):
    store = Store(tmp_path / "a.db")
    add_records(store, tmp_path, "a.jsonl", 200)
    planned = plan_snapshot(store, CFG, seed=1)
    snap = build_snapshot(store, CFG, seed=1)
    assert snap.created and snap.id == planned.id
    train = ids(store, "SELECT id FROM records WHERE split = 'train'")
    holdout = ids(store, "SELECT id FROM records WHERE split = 'holdout'")
    assert set(snap.new) == train and set(snap.holdout) == holdout and snap.replay == ()
    assert snap.id == snapshot_id([(r, "new") for r in snap.new] + [(r, "holdout") for r in snap.holdout])
    row = store.query_one("SELECT n_new, n_replay, n_holdout, manifest FROM snapshots")
    assert (row["n_new"], row["n_replay"], row["n_holdout"]) == (len(train), 0, len(holdout))
    assert json.loads(row["manifest"])["seed"] == 1
    assert store.counts()["records_pending"] == 0
    # Writing the same set again returns the stored snapshot and adds nothing.
    again = write_snapshot(store, planned)
    assert (again.id, again.created, again.new) == (snap.id, False, snap.new)
    assert store.query_one("SELECT COUNT(*) FROM snapshot_records")[0] == len(train) + len(holdout)
    assert load_snapshot(store, snap.id).holdout == snap.holdout
    with pytest.raises(NothingToSnapshot):
        build_snapshot(store, CFG, seed=1)
    # The same records and seed in another store give the same content-addressed id.
    other = Store(tmp_path / "b.db")
    add_records(other, tmp_path, "a.jsonl", 200)
    assert build_snapshot(other, CFG, seed=1).id == snap.id


def test_replay_is_a_seeded_share_of_older_train_records(tmp_path):
    store = Store(tmp_path / "s.db")
    add_records(store, tmp_path, "old.jsonl", 400)
    first = build_snapshot(store, CFG, seed=1)
    add_records(store, tmp_path, "new.jsonl", 150, start=1000)
    planned = plan_snapshot(store, CFG, seed=7)
    assert plan_snapshot(store, CFG, seed=7) == planned  # deterministic
    assert plan_snapshot(store, CFG, seed=8).replay != planned.replay
    second = build_snapshot(store, CFG, seed=7)
    assert second.id == planned.id
    assert not set(second.new) & set(first.new)
    assert set(second.replay) <= set(first.new)
    share = len(second.replay) / (len(second.new) + len(second.replay))
    assert abs(share - 0.3) < 0.01
    holdout = ids(store, "SELECT id FROM records WHERE split = 'holdout'")
    assert not holdout & set(second.new + second.replay)
    assert set(second.holdout) == holdout - set(first.holdout)
    roles = {rid: role for rid, role, _ in snapshot_payloads(store, second.id, roles=("new", "replay", "holdout"))}
    assert len(roles) == len(second.new) + len(second.replay) + len(second.holdout)


def test_replay_is_capped_by_what_exists_and_can_be_turned_off(tmp_path):
    store = Store(tmp_path / "s.db")
    add_records(store, tmp_path, "old.jsonl", 20)
    build_snapshot(store, CFG, seed=1)
    add_records(store, tmp_path, "new.jsonl", 300, start=1000)
    planned = plan_snapshot(store, CFG, seed=1, replay_fraction=0.5)
    old_train = ids(store, "SELECT record_id FROM snapshot_records WHERE role = 'new'")
    assert set(planned.replay) == old_train  # wanted more than exist
    assert plan_snapshot(store, CFG, seed=1, replay_fraction=0.0).replay == ()


def test_replay_share_in_chars_gives_long_new_documents_their_share_of_replayed_text(tmp_path):
    store = Store(tmp_path / "s.db")
    add_records(store, tmp_path, "old.jsonl", 600)          # short answers, learned first
    build_snapshot(store, CFG, seed=1)
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"input": f"consult {i}", "output": f"{i} " + "long advice " * 10}) + "\n"
                            for i in range(100)))
    assert ingest_file(long, store, CFG).accepted == 100
    chars = dict(store.query("SELECT id, n_chars FROM records"))

    def text_share(snap) -> float:
        replayed = sum(chars[r] for r in snap.replay)
        return replayed / (replayed + sum(chars[r] for r in snap.new))

    by_records = plan_snapshot(store, CFG, seed=5)
    assert abs(len(by_records.replay) / (len(by_records.new) + len(by_records.replay)) - 0.3) < 0.01
    assert text_share(by_records) < 0.1         # 30 % of the records, but short: little replayed text
    by_chars = plan_snapshot(store, DataConfig(**{**CFG.__dict__, "replay_unit": "chars"}), seed=5)
    assert by_chars == plan_snapshot(store, DataConfig(**{**CFG.__dict__, "replay_unit": "chars"}), seed=5)
    assert 0.29 < text_share(by_chars) <= 0.3
    assert len(by_chars.replay) > 5 * len(by_records.replay) and set(by_chars.replay) <= set(chars)
    m = by_chars.manifest
    assert m["replay_unit"] == "chars" and m["replay_chars"] <= m["replay_chars_wanted"]
    assert m["new_chars"] == sum(chars[r] for r in by_chars.new)


def test_category_cap_keeps_no_category_above_ratio_times_the_median(tmp_path):
    store = Store(tmp_path / "s.db")
    add_records(store, tmp_path, "cats.jsonl", 0, categories={"a": 200, "b": 40, "c": 15})
    per_cat = {row[0]: row[1] for row in store.query(
        "SELECT category, COUNT(*) FROM records WHERE split = 'train' GROUP BY category")}
    cap = int(3.0 * sorted(per_cat.values())[1])
    assert cap < per_cat["a"]
    snap = build_snapshot(store, CFG, seed=3, category_cap_ratio=3.0)
    kept = {row[0]: row[1] for row in store.query(
        "SELECT r.category, COUNT(*) FROM snapshot_records s JOIN records r ON r.id = s.record_id "
        "WHERE s.snapshot_id = ? AND s.role = 'new' GROUP BY r.category", (snap.id,))}
    assert kept == {c: min(n, cap) for c, n in per_cat.items()}
    assert kept["b"] == per_cat["b"] and kept["c"] == per_cat["c"]   # the small ones cap nothing
    assert snap.manifest["capped"] == {c: n - cap for c, n in per_cat.items() if n > cap}
    # The surplus stays pending for a later snapshot.
    assert store.counts()["records_pending"] == sum(per_cat.values()) - sum(kept.values())


def test_records_a_cap_left_pending_are_judged_on_their_categories_holdout(tmp_path):
    store = Store(tmp_path / "s.db")
    add_records(store, tmp_path, "cats.jsonl", 0, categories={"a": 200, "b": 20, "c": 20})
    first = build_snapshot(store, CFG, seed=3, category_cap_ratio=3.0)
    assert first.manifest["capped"] and first.holdout and "holdout_reused" not in first.manifest
    second = build_snapshot(store, CFG, seed=3, category_cap_ratio=3.0)   # the surplus of "a", no fresh holdout
    a_holdout = ids(store, "SELECT id FROM records WHERE split = 'holdout' AND category = 'a'")
    assert set(second.holdout) == a_holdout and second.manifest["holdout_reused"] == len(a_holdout) > 0
    assert not set(second.new) & ids(store, "SELECT id FROM records WHERE split = 'holdout'")


def test_since_limits_new_records_to_recent_ingests(tmp_path):
    clock = Clock(100.0)
    store = Store(tmp_path / "s.db", clock=clock)
    add_records(store, tmp_path, "early.jsonl", 50)
    clock.t = 200.0
    add_records(store, tmp_path, "late.jsonl", 50, start=500)
    snap = build_snapshot(store, CFG, seed=1, since=150.0)
    late = ids(store, "SELECT id FROM records WHERE ingested_at >= 150 AND split = 'train'")
    assert set(snap.new) == late and snap.manifest["since"] == 150.0


# ----------------------------------------------------------------------------- tokenisation


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_completion_only_labels_mask_the_prompt(tiny_tokenizer):
    payload = chat(("system", "you are a judge"), ("user", "what is the law?"), ("assistant", "the court must answer."))
    out = tokenize_record(payload, tiny_tokenizer, max_seq_len=512)
    assert len(out["input_ids"]) == len(out["labels"])
    expected = tiny_tokenizer.apply_chat_template(payload["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert out["input_ids"] == list(expected)
    learned = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.convert_ids_to_tokens(learned) == ["the", "court", "must", "answer", ".", "<|im_end|>"]
    n_prompt = out["labels"].index(learned[0])
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # every prompt token is masked
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]


def test_every_assistant_turn_is_labelled_in_a_multi_turn_chat(tiny_tokenizer):
    payload = chat(("user", "hello"), ("assistant", "yes"), ("user", "why?"), ("assistant", "no"))
    out = tokenize_record(payload, tiny_tokenizer, max_seq_len=512)
    learned = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.convert_ids_to_tokens(learned) == ["yes", "<|im_end|>", "no", "<|im_end|>"]


def test_text_records_are_labelled_whole_and_truncated(tiny_tokenizer):
    out = tokenize_record({"text": "the law of the court"}, tiny_tokenizer, max_seq_len=512)
    assert out["labels"] == out["input_ids"]
    assert out["input_ids"][-1] == tiny_tokenizer.eos_token_id
    short = tokenize_record({"text": "the law of the court"}, tiny_tokenizer, max_seq_len=3)
    assert short["input_ids"] == out["input_ids"][:3] == short["labels"]
    payload = chat(("user", "what is the law?"), ("assistant", "the court must answer."))
    assert len(tokenize_record(payload, tiny_tokenizer, max_seq_len=4)["input_ids"]) == 4


def test_a_tokenizer_without_template_gets_chatml_and_a_bad_template_is_refused(tiny_tokenizer):
    payload = chat(("user", "what is the law?"), ("assistant", "yes"))
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert tokenize_record(payload, bare, 512) == tokenize_record(payload, tiny_tokenizer, 512)
    reversed_ = copy.deepcopy(tiny_tokenizer)
    reversed_.chat_template = ("{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        tokenize_record(payload, reversed_, 512)


# ----------------------------------------------------------------------------- packing


def examples_of(lengths: list[int]) -> list[dict]:
    out = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + j for j in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


def check_packs(packs: list[dict], examples: list[dict], max_seq_len: int) -> None:
    placed = sorted(i for p in packs for i in p["example_ids"])
    assert placed == [i for i, e in enumerate(examples) if e["input_ids"]]  # each exactly once
    for p in packs:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == sum(p["seq_lens"])
        assert sum(p["seq_lens"]) <= max_seq_len
        expected_pos, start = [], 0
        for i, n in zip(p["example_ids"], p["seq_lens"]):
            expected_pos += list(range(n))  # positions restart at 0 for every example
            assert p["input_ids"][start:start + n] == examples[i]["input_ids"][:n]
            assert p["labels"][start] == IGNORE_INDEX  # no loss across the boundary
            start += n
        assert p["position_ids"] == expected_pos
    half_full = [p for p in packs if sum(p["seq_lens"]) * 2 <= max_seq_len]
    assert len(half_full) <= 1  # a first-fit property: two half-empty packs would have been merged


def test_pack_is_first_fit_decreasing():
    examples = examples_of([5, 3, 8, 2, 7, 1])
    packs = pack(examples, max_seq_len=10)
    assert [p["example_ids"] for p in packs] == [[2, 3], [4, 1], [0, 5]]
    assert [p["seq_lens"] for p in packs] == [[8, 2], [7, 3], [5, 1]]
    assert packs[0]["position_ids"] == list(range(8)) + list(range(2))
    check_packs(packs, examples, 10)


def test_pack_truncates_overlong_examples_and_skips_empty_ones():
    examples = examples_of([12, 0, 4])
    packs = pack(examples, max_seq_len=10)
    assert [p["seq_lens"] for p in packs] == [[10], [4]]
    assert pack([], 10) == []


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 64), max_size=60), max_seq_len=st.integers(8, 128))
def test_packing_properties(lengths, max_seq_len):
    examples = examples_of(lengths)
    check_packs(pack(examples, max_seq_len), [{"input_ids": e["input_ids"][:max_seq_len]} for e in examples],
                max_seq_len)


def test_packed_real_records(tiny_tokenizer):
    records = [chat(("user", "what is the law?"), ("assistant", "the court must answer.")),
               chat(("user", "who is the judge?"), ("assistant", "the model.")), {"text": "the law of the court"}]
    examples = [tokenize_record(r, tiny_tokenizer, 64) for r in records]
    packs = pack(examples, max_seq_len=64)
    assert len(packs) == 1 and sorted(packs[0]["example_ids"]) == [0, 1, 2]
    check_packs(packs, examples, 64)
