"""bench/continual.py on a user's own stream (--stream DIR) and the validation/test split of every month's
holdout: month files in several formats, ordered by name, split before any arm sees them; the test records
never reach an arm's store. Fast: the base arm only, on a tiny random model (the daemon and the training
arms on LawBench are tests/test_continual_smoke.py's)."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest

from tests.test_continual_smoke import load_bench

# words of the tiny test tokenizer's vocabulary (tests/conftest.py), so that losses differ between records
WORDS = ["law", "court", "contract", "judge", "party", "model", "data", "answer", "question", "world", "hello", "user"]


def month_rows(month: int, n: int) -> list[dict]:
    """``n`` distinct English records of two categories: a one-letter choice and a short free answer."""
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 12], WORDS[(i * 5 + month) % 12], WORDS[(i * 7 + 2 * month) % 12]
        if i % 2:
            rows.append({"prompt": f"month {month} question {i}: which is {a}?\nA. {a}\nB. {b}\nC. {c}\nAnswer:",
                         "completion": "A", "category": "choice"})
        else:
            rows.append({"prompt": f"month {month} item {i}: describe {a} {b}", "completion": f"{a} and {b} with {c}",
                         "category": "describe"})
    return rows


def write_stream(folder: Path, n: int = 40) -> None:
    """Three months in three formats, written out of name order: 03 JSONL, 01 CSV, 02 Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "03-march.jsonl").write_text("".join(json.dumps(r) + "\n" for r in month_rows(3, n)))
    with open(folder / "01-january.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion", "category"])
        w.writeheader()
        w.writerows(month_rows(1, n))
    pq.write_table(pa.Table.from_pylist(month_rows(2, n)), folder / "02-february.parquet")
    (folder / ".hidden.jsonl").write_text("not a month\n")
    (folder / "README.md").write_text("notes beside the data are not a month\n")


def test_holdout_role_is_stable_and_about_half():
    continual = load_bench()
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    roles = [continual.holdout_role(h) for h in hashes]
    assert roles == [continual.holdout_role(h) for h in hashes]
    assert set(roles) == {"validation", "test"}
    assert 0.45 < roles.count("test") / len(roles) < 0.55
    assert all(continual.holdout_role(h, test_share=0.0) == "validation" for h in hashes[:100])


def test_stream_files_are_ordered_by_name_and_a_bad_folder_says_why(tmp_path):
    continual = load_bench()
    write_stream(tmp_path / "s", n=4)
    files = continual.stream_files(tmp_path / "s")
    assert [f.name for f in files] == ["01-january.csv", "02-february.parquet", "03-march.jsonl"]
    assert continual.stream_groups(files) == ["01-january", "02-february", "03-march"]
    assert continual.stream_groups([Path("a.csv"), Path("a.jsonl")]) == ["a.csv", "a.jsonl"]
    with pytest.raises(ValueError, match="not a folder"):
        continual.stream_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no month files"):
        continual.stream_files(tmp_path / "empty")
    with pytest.raises(SystemExit):
        continual.main(["--stream", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):   # a stream result must not overwrite the committed LawBench result
        continual.main(["--stream", str(tmp_path / "s")])


def test_a_month_without_test_records_is_refused_with_the_fix(tmp_path):
    from daemon.store import open_store

    continual = load_bench()
    cfg = continual.build_run_config(continual.PROFILES["smoke"], tmp_path, "m", [])
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with open_store(tmp_path / "ref") as store, pytest.raises(RuntimeError, match="data.holdout_fraction"):
        continual.reference_month(store, cfg, tmp_path / "one.jsonl", tmp_path / "out.jsonl", "one", None)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_users_stream_runs_with_a_validation_test_split(tmp_path, tiny_llama_dir):
    continual = load_bench()
    write_stream(tmp_path / "my-support-tickets")
    out, work = tmp_path / "stream.json", tmp_path / "work"
    result = continual.run(continual.PROFILES["smoke"], out=out, work=work, base_model=str(tiny_llama_dir),
                           cache=None, timeout=300, arms=("base",), stream=tmp_path / "my-support-tickets",
                           log=lambda _: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["complete"] and result["stream_name"] == "my-support-tickets"
    assert [m["group"] for m in result["months"]] == ["01-january", "02-february", "03-march"]
    assert [s["file"] for s in result["stream"]] == ["01-january.csv", "02-february.parquet", "03-march.jsonl"]
    assert all(m["tasks"] == ["choice", "describe"] for m in result["months"])

    # Each task's holdout is split into validation and test; the counts add up to the month's holdout.
    split = result["holdout_split"]
    assert set(split) == {f"{g}/{t}" for g in ("01-january", "02-february", "03-march") for t in ("choice", "describe")}
    for s, m in zip(result["stream"], result["months"]):
        assert s["records_in_file"] == 40 and s["train"] + s["validation"] + s["test"] == s["accepted"]
        assert m["records"]["validation"] == s["validation"] > 0 and m["records"]["test"] == s["test"] > 0
        assert sum(split[f"{m['group']}/{t}"]["test"] for t in m["tasks"]) == s["test"]
        assert sum(split[f"{m['group']}/{t}"]["validation"] for t in m["tasks"]) == s["validation"]
        cap = continual.PROFILES["smoke"].holdout_cap
        assert m["records"]["holdout_scored"] == {t: min(cap, split[f"{m['group']}/{t}"]["test"]) for t in m["tasks"]
                                                  if split[f"{m['group']}/{t}"]["test"]}

    # The test records never reached the arms' store; the reference store holds them, split by holdout_role.
    arms_db = sqlite3.connect(work / "state" / "lorad.db")
    ref_db = sqlite3.connect(work / "reference" / "lorad.db")
    held = {h: continual.holdout_role(h) for (h,) in ref_db.execute("SELECT content_hash FROM records "
                                                                     "WHERE split = 'holdout'")}
    in_arms = {h: s for h, s in arms_db.execute("SELECT content_hash, split FROM records")}
    assert {h for h, role in held.items() if role == "test"}.isdisjoint(in_arms)
    assert {h for h, role in held.items() if role == "validation"} == {h for h, s in in_arms.items() if s == "holdout"}

    # Test columns at the top, validation in their own block; goals on both; no LawBench MCQ on a user's stream.
    last = result["months"][-1]["arms"]["base"]
    assert set(last["holdout_loss"]) == set(last["validation"]["holdout_loss"]) == {"01-january", "02-february",
                                                                                       "03-march"}
    assert last["holdout_loss"] != last["validation"]["holdout_loss"]
    assert last["answer_score_by_task"]["01-january/choice"]["metric"] == "accuracy"
    assert last["answer_score_by_task"]["01-january/describe"]["metric"] == "rouge_l"
    assert last["mcq_accuracy"] == {} and "mcq_accuracy" in last["validation"]
    assert last["forgetting"] == 0.0 and last["validation"]["forgetting"] == 0.0   # the base model cannot forget
    assert set(result["goals"]) == set(result["goals_validation"]) == set(continual.TARGETS)
    base_vs_base = result["goals"]["domain_loss_reduction_vs_base"]
    assert base_vs_base["value"] is None and "lorad" in base_vs_base["how"]

    # The plot follows the stream: its name in the titles, never LawBench.
    fig = continual.figure(result)
    titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text()]
    assert any("my-support-tickets test loss" in t for t in titles)
    assert not any("LawBench" in t for t in titles)
    assert out.with_suffix(".png").stat().st_size > 10_000
