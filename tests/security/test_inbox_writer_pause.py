"""Issue 28: a writer that pauses longer than the settle time, or writes while lorad reads, loses no line."""

from __future__ import annotations

import json
from pathlib import Path

import pipelines.ingest
from daemon.config import DataConfig, build_config
from daemon.service import Daemon
from daemon.store import Store, open_store
from monitors.metrics import LoradMetrics
from pipelines.ingest import ingest_file


def make_daemon(tmp_path: Path) -> tuple[Daemon, Path]:
    """A daemon with just the parts the inbox handler uses: config, store and metrics."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state"), "inbox": str(inbox)}})
    daemon = Daemon(cfg)
    daemon.store = open_store(cfg.paths.state_dir)
    daemon.metrics = LoradMetrics()
    return daemon, inbox.resolve()


def line(i: int) -> str:
    return json.dumps({"input": f"question number {i}", "output": f"answer number {i}"}) + "\n"


def test_lines_written_after_the_read_are_read_before_the_file_moves_to_done(tmp_path, monkeypatch):
    daemon, inbox = make_daemon(tmp_path)
    drop = inbox / "data.jsonl"
    drop.write_text(line(1))
    real_ingest = pipelines.ingest.ingest_file

    def writer_resumes_after_the_read(path, *args, **kwargs):
        result = real_ingest(path, *args, **kwargs)
        with open(drop, "a") as f:  # the writer wakes up after its pause, before the move to .done/
            f.write(line(2))
        return result

    monkeypatch.setattr(pipelines.ingest, "ingest_file", writer_resumes_after_the_read)
    daemon.ingest_inbox_file(drop)
    assert drop.exists(), "a file that grew after it was read must not be moved to .done/ yet"
    monkeypatch.setattr(pipelines.ingest, "ingest_file", real_ingest)
    daemon.ingest_inbox_file(drop)  # the watcher hands it over again once it settles
    texts = " ".join(r["payload"] for r in daemon.store.query("SELECT payload FROM records"))
    assert "question number 1" in texts and "question number 2" in texts
    assert (inbox / ".done" / "data.jsonl").read_text() == line(1) + line(2)


def test_a_file_written_while_it_is_read_keeps_nothing_and_says_so(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(line(1) + line(2))
    store = Store(":memory:")
    calls = []

    def counter_that_lets_the_writer_append(text: str) -> int:
        if not calls:
            with open(path, "a") as f:
                f.write(line(3))
        calls.append(text)
        return len(text)

    r = ingest_file(path, store, DataConfig(near_dup_threshold=1.0), count_tokens=counter_that_lets_the_writer_append)
    assert r.changed and "changed while it was being read" in r.file_error
    assert store.query_one("SELECT COUNT(*) FROM records")[0] == 0, "a half-read file keeps nothing"
    again = ingest_file(path, store, DataConfig(near_dup_threshold=1.0))
    assert not again.changed and again.accepted == 3
