"""Ingest's fast paths give exactly what the plain definitions give: stored JSON, content hashes, token estimates.

Content hashes are record identity across versions (``records.content_hash UNIQUE``): a state folder written by
an older lorad must deduplicate against new ingests, so the hashes below are pinned to the values the first
release computed, and every shortcut is compared with the definition it replaces.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import DataConfig
from daemon.store import open_store
from pipelines import ingest as ing
from pipelines.ingest import records

# Computed by the code before the fast paths (json.JSONEncoder over the payload dict, then sha256).
PINNED = [
    ({"system": "你是一名法律专家。", "query": "根据《刑法》第12条，\"正当防卫\"如何认定？\n请说明",
      "response": "答：需满足\t五个条件。"},
     "2dfb0a55bee99945961dc40aa3599b8cb412dbb8a7bd6209c92bcd551e522d71"),
    ({"input": "What is 2+2?", "output": "4"}, "507471604dc331bfc5bf0f395de7da2ffb0b407c3ac18f166fb5d7accf0050a5"),
    ({"instruction": "Translate", "input": "猫", "output": "cat \\ \"quoted\""},
     "7808cee1696a309c208f6e78af2767fb0c6fbf4f119d97a45231be2801686952"),
    ({"prompt": "a\r\nb  \n\n\n\nc", "completion": "ok\u200b!", "category": " civil "},
     "6c253f140de545d3052440c744b4f5f3d5a094c3fbf9026a7a7c8f0d276ecbec"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi 🙂"},
                   {"role": "assistant", "content": "hello\u2028there"}, {"role": "user", "content": "e\u0301"},
                   {"role": "assistant", "content": "\x01bye\x7f"}]},
     "3f75f3282de3a9f5ed4aae7bf2bc2e46042f27ee7477243acc2aef35cc5e8092"),
    ({"text": "第一条 为了规范……\n\n第二条"}, "e41e965b42431231f75d603a4591472ae5ecc0bbac7df840a47b20c2b71b37b3"),
]


@pytest.mark.parametrize("obj,content_hash", PINNED)
def test_content_hashes_are_pinned(obj, content_hash):
    record = ing.Normaliser(DataConfig())(obj)
    assert record.content_hash == content_hash
    assert record.payload_json == records._ENCODE(record.payload)


TEXT = st.text(max_size=40) | st.sampled_from(["", " ", "\u200b", "\ufeff", "\r\n", "a\x00b", "法院", "🙂", "\\", '"',
                                               "\n\n\n", "a \nb", "\u2028x", "\x7f\x85", "e\u0301", "\ud800x"])
FIELDS = ["input", "output", "instruction", "prompt", "completion", "query", "response", "system", "text",
          "category", "x"]
TURNS = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3).map(
    lambda pairs: [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])
OBJECTS = (st.dictionaries(st.sampled_from(FIELDS), TEXT | st.none() | st.integers(), max_size=6)
           | st.builds(lambda system, turns: {"messages": ([{"role": "system", "content": system}] if system else [])
                                              + turns}, TEXT, TURNS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECTS)
def test_stored_json_and_hash_follow_their_definition(obj):
    """payload_json is the canonical json.dumps of the payload and content_hash its sha256, for every shape."""
    for cfg in (DataConfig(), DataConfig(min_response_chars=0, max_prompt_tokens=3, max_response_tokens=2)):
        try:
            record = ing.Normaliser(cfg)(obj)
        except ing.InvalidRecord:
            continue
        assert record.payload_json == json.dumps(record.payload, ensure_ascii=False, separators=(",", ":"))
        assert record.content_hash == hashlib.sha256(record.payload_json.encode("utf-8")).hexdigest()
        assert record.n_chars == sum(len(m["content"]) for m in record.payload.get("messages", [])) + \
            len(record.payload.get("text", ""))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
def test_json_piece_matches_json_and_the_token_estimate(text):
    literal, utf8, tokens = records._json_piece(text)
    assert literal == json.dumps([text], ensure_ascii=False)[1:-1]  # through the encoder, not its string helper
    assert utf8 == literal.encode("utf-8")
    assert tokens == ing.estimate_tokens(text)


def test_printable_text_has_nothing_for_the_cleaner_to_remove():
    """The cleaner skips its control-character, \\r and line steps for printable text: that must lose nothing."""
    every_char = "".join(chr(c) for c in range(0x110000))
    removed = set(records._CONTROL.findall(every_char)) | {"\r", "\n"}
    assert not [hex(ord(c)) for c in removed if c.isprintable()]


def test_a_callers_token_counter_is_asked_as_before():
    """Counts are cached only for the built-in estimate; a caller's counter sees every field, in order."""
    seen: list[str] = []

    def counter(text: str) -> int:
        seen.append(text)
        return 1

    normalise = ing.Normaliser(DataConfig(), counter)
    for _ in range(2):
        normalise({"system": "sys", "query": "q", "response": "r"})
    normalise({"input": "i", "output": "o"})
    assert seen == ["sys", "q", "r", "sys", "q", "r", "i", "o"]


def test_the_page_cache_is_restored_after_an_ingest(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n', encoding="utf-8")
    with open_store(tmp_path / "state") as store:
        before = store.query_one("PRAGMA cache_size")[0]
        assert ing.ingest_file(path, store, DataConfig()).accepted == 1
        assert store.query_one("PRAGMA cache_size")[0] == before


def test_a_state_folder_from_before_still_deduplicates(tmp_path):
    """A database created with 4 KiB pages (every store before PAGE_SIZE) keeps its pages and its dedup."""
    import sqlite3

    from daemon.store import PAGE_SIZE, Store

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj, _ in PINNED), encoding="utf-8")
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute("PRAGMA page_size = 4096")
    con.execute("PRAGMA journal_mode = WAL")
    con.close()
    with Store(old) as store:
        first = ing.ingest_file(path, store, DataConfig())
    with Store(old) as store:
        assert store.query_one("PRAGMA page_size")[0] == 4096
        again = ing.ingest_file(path, store, DataConfig())
        hashes = [r[0] for r in store.query("SELECT content_hash FROM records ORDER BY id")]
    assert (first.accepted, again.accepted, again.duplicates) == (len(PINNED), 0, len(PINNED))
    assert hashes == [h for _, h in PINNED]
    with Store(tmp_path / "new.db") as store:
        assert store.query_one("PRAGMA page_size")[0] == PAGE_SIZE
