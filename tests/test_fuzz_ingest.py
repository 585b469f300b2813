"""Property-based fuzzing of every ingest parser (JSONL, JSON array / concatenated, CSV, TSV, Parquet).

Whatever bytes arrive, ingest must never raise, and every record-bearing line must end up exactly once as
accepted, duplicate or rejected (with a reason); stored payloads always have the normalised shape. The
number of examples per property is LORAD_FUZZ_EXAMPLES (CI default below; bench/reliability.py runs more).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import DataConfig
from daemon.store import Store
from pipelines.ingest import FileRejected, iter_records
from pipelines.ingest import ingest_file

EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("LORAD_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CFG = DataConfig(near_dup_threshold=0.9, max_prompt_tokens=64, max_response_tokens=64)

FIELDS = ["input", "output", "instruction", "prompt", "completion", "query", "response", "system", "text",
          "messages", "category", "role", "content", "x"]
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", " ", "\u200b", "\ufeff", "\r\n", "a\x00b", "法院", "🙂", "\\", '"', "\n\n\n"])
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | text
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) |
                           st.dictionaries(st.sampled_from(FIELDS) | text, kids, max_size=5), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x", 3]),
                                           "content": text | st.none() | st.integers()}), max_size=5)
records = st.dictionaries(st.sampled_from(FIELDS), text | scalars, max_size=6) | st.builds(
    lambda m, extra: {"messages": m, **extra}, messages, st.dictionaries(st.sampled_from(FIELDS[:9]), text, max_size=2))


CASES = {"files": 0}


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    """bench/reliability.py counts the fuzz cases: LORAD_FUZZ_REPORT names a JSONL file to append to."""
    yield
    if os.environ.get("LORAD_FUZZ_REPORT"):
        with open(os.environ["LORAD_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps({"suite": "ingest", "cases": CASES["files"]}) + "\n")


def check(path: Path) -> None:
    """The properties every file must satisfy, whatever it holds."""
    CASES["files"] += 1
    try:  # the store-free parser: FileRejected is its only way to refuse
        parsed = list(iter_records(path, CFG))
    except FileRejected as e:
        assert str(e), "a whole-file rejection names its reason"
        parsed = None
    with tempfile.TemporaryDirectory() as d, Store(Path(d) / "lorad.db") as store:
        r = ingest_file(path, store, CFG, report_path=Path(d) / "report.jsonl")
        assert r.records_total == r.accepted + r.duplicates + r.rejected
        n_records = store.query_one("SELECT COUNT(*) FROM records")[0]
        rejects = store.query("SELECT line, outcome, reason FROM rejects")
        if r.file_error is not None:
            assert r.records_total == 0 and n_records == 0 and len(rejects) == 1 and rejects[0]["line"] == 0
            return
        assert n_records == r.accepted
        assert len(rejects) == r.duplicates + r.rejected
        assert all(x["reason"].strip() for x in rejects), "every duplicate and reject has a reason"
        lines = [x["line"] for x in rejects]
        assert len(lines) == len(set(lines)), "a line has exactly one outcome"
        if parsed is not None:
            assert len(parsed) == r.records_total
            assert sum(p.record is not None for p in parsed) >= r.accepted
        report = (Path(d) / "report.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(report) == len(rejects)
        for row in store.query("SELECT kind, payload FROM records"):
            payload = json.loads(row["payload"])
            if row["kind"] == "text":
                assert set(payload) == {"text"} and payload["text"].strip()
            else:
                msgs = payload["messages"]
                assert msgs[-1]["role"] == "assistant" and all(m["content"].strip() for m in msgs
                                                              if m["role"] != "system")
                assert all(m["role"] in ("system", "user", "assistant") for m in msgs)


def write(d: str, name: str, data: bytes) -> Path:
    path = Path(d) / name
    path.write_bytes(data)
    return path


@FUZZ
@given(rows=st.lists(records | json_values, max_size=25), junk=st.lists(st.binary(max_size=30), max_size=3),
       newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_jsonl(rows, junk, newline, bom):
    lines = [json.dumps(r, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass") for r in rows]
    lines += [j.replace(b"\n", b" ") for j in junk]
    data = (b"\xef\xbb\xbf" if bom else b"") + newline.encode().join(lines)
    with tempfile.TemporaryDirectory() as d:
        path = write(d, "f.jsonl", data)
        check(path)
        with Store(Path(d) / "count.db") as store:
            r = ingest_file(path, store, CFG)
            if r.file_error is None:  # one outcome per non-blank line
                assert r.records_total == sum(not_blank(ln, i == 0) for i, ln in enumerate(data.split(b"\n")))


def not_blank(line: bytes, first: bool) -> bool:
    """A line is a record unless it decodes to whitespace only (an undecodable line is a rejected record)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return bool((text[1:] if first and text.startswith("\ufeff") else text).strip())


@FUZZ
@given(rows=st.lists(records | json_values, max_size=20), form=st.sampled_from(["array", "concat", "lines"]),
       cut=st.integers(min_value=0, max_value=50))
def test_json(rows, form, cut):
    if form == "array":
        data = json.dumps(rows, ensure_ascii=False)
    elif form == "concat":
        data = " ".join(json.dumps(r, ensure_ascii=False) for r in rows)
    else:
        data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    raw = data.encode("utf-8", "surrogatepass")
    if cut:  # a truncated upload
        raw = raw[: max(0, len(raw) - cut)]
    with tempfile.TemporaryDirectory() as d:
        check(write(d, "f.json", raw))


@FUZZ
@given(header=st.lists(st.sampled_from(FIELDS) | text, min_size=0, max_size=5),
       rows=st.lists(st.lists(text | st.sampled_from(['"', '""', "a,b", "x\ny", "\t"]), max_size=6), max_size=15),
       sep=st.sampled_from([",", "\t"]), cut=st.integers(min_value=0, max_value=5))
def test_csv_and_tsv(header, rows, sep, cut):
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep)
    w.writerow(header)
    w.writerows(rows)
    raw = buf.getvalue().encode("utf-8", "surrogatepass")
    raw = raw[: len(raw) - cut] if cut else raw
    with tempfile.TemporaryDirectory() as d:
        check(write(d, "f.tsv" if sep == "\t" else "f.csv", raw))


@FUZZ
@given(columns=st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(["str", "int", "null", "list", "struct"]),
                               max_size=4), n=st.integers(0, 12), values=st.lists(text, min_size=12, max_size=12),
       cut=st.booleans())
def test_parquet(columns, n, values, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column(kind: str):
        if kind == "str":
            return pa.array(values[:n], pa.string())
        if kind == "int":
            return pa.array(list(range(n)), pa.int64())
        if kind == "null":
            return pa.array([None] * n, pa.string())
        if kind == "list":
            return pa.array([[v] for v in values[:n]], pa.list_(pa.string()))
        return pa.array([{"role": "user", "content": v} for v in values[:n]])

    table = pa.table({name: column(kind) for name, kind in columns.items()}) if columns else pa.table({"x": []})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.parquet"
        pq.write_table(table, path)
        if cut:  # a torn upload: parquet's footer is gone
            path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
        check(path)


@FUZZ
@given(data=st.binary(max_size=300), ext=st.sampled_from(["jsonl", "json", "csv", "tsv", "parquet", "txt", "ndjson"]))
def test_arbitrary_bytes_under_any_name(data, ext):
    with tempfile.TemporaryDirectory() as d:
        check(write(d, f"f.{ext}", data))


def test_a_reason_quoting_a_line_separator_stays_one_report_line():
    """Found by the fuzzer at 150 examples (bench/reliability.py): a record whose key holds U+2028 was rejected with
    a reason quoting the key, and the raw U+2028 made str.splitlines() read one report entry as two."""
    with tempfile.TemporaryDirectory() as d:
        data = "\n".join(json.dumps(r, ensure_ascii=False) for r in
                         ({"a\u2028b": "x"}, {"c\x85d": "y", "e\u2029": 1})).encode("utf-8")
        check(write(d, "f.jsonl", data))
