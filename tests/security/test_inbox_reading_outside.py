"""Issue 28, reading outside the inbox: a file swapped for a link or a FIFO, and names lorad cannot store.

An attacker who can write into the inbox must not make lorad read anything else, block it, or
make it fail on the same file every few seconds: every such entry is moved to .rejected/ with a
report (or, where it cannot be moved, logged once).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from daemon.config import build_config
from daemon.inbox import InboxWatcher
from daemon.service import Daemon
from daemon.store import open_store
from monitors.metrics import LoradMetrics

SECRET = '{"input": "the operator\'s private question", "output": "the private answer"}\n'


def make_daemon(tmp_path: Path) -> tuple[Daemon, Path]:
    """A daemon with just the parts the inbox handler uses: config, store and metrics."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state"), "inbox": str(inbox)}})
    daemon = Daemon(cfg)
    daemon.store = open_store(cfg.paths.state_dir)
    daemon.metrics = LoradMetrics()
    return daemon, inbox.resolve()


def stored_texts(daemon: Daemon) -> str:
    return " ".join(r["payload"] for r in daemon.store.query("SELECT payload FROM records"))


def rejected_reasons(inbox: Path) -> list[str]:
    return [json.loads(line)["reason"] for f in sorted((inbox / ".rejected").rglob("*.rejects.jsonl"))
            for line in f.read_text().splitlines()]


def test_a_file_swapped_for_a_symlink_while_it_settles_is_never_read(tmp_path, caplog):
    daemon, inbox = make_daemon(tmp_path)
    secret = tmp_path / "outside" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    drop = inbox / "data.jsonl"
    drop.write_text("x" * len(str(secret)))  # the link's own lstat size will be the same
    watcher = InboxWatcher(inbox, daemon.ingest_inbox_file, settle_seconds=0.0, clock=lambda: 0.0)
    watcher.offer(drop)
    mtime = os.lstat(drop).st_mtime_ns
    drop.unlink()
    drop.symlink_to(secret)
    os.utime(drop, ns=(mtime, mtime), follow_symlinks=False)  # and its own mtime too: only the type differs
    with caplog.at_level(logging.WARNING, logger="lorad.inbox"):
        for path in watcher.due():
            daemon.ingest_inbox_file(path)
    assert "private" not in stored_texts(daemon), "records from outside the inbox were stored"
    assert not os.path.lexists(drop) and (inbox / ".rejected" / "data.jsonl").is_symlink(), "the link is set aside"
    assert any("symbolic link" in r for r in rejected_reasons(inbox))
    assert any("symbolic link" in r.getMessage() + str(getattr(r, "reason", "")) for r in caplog.records)
    assert secret.read_text() == SECRET, "the link's target is never touched"


def test_a_symlink_in_place_when_the_handler_opens_the_file_is_not_followed(tmp_path):
    daemon, inbox = make_daemon(tmp_path)
    secret = tmp_path / "secret.csv"
    secret.write_text("input,output\nroot:x:0:0,private\n")
    (inbox / "data.csv").symlink_to(secret)  # swapped in after the watcher's last check
    daemon.ingest_inbox_file(inbox / "data.csv")
    assert "root:x" not in stored_texts(daemon)
    assert "root:x" not in " ".join(r["reason"] or "" for r in daemon.store.query("SELECT reason FROM rejects"))
    assert (inbox / ".rejected" / "data.csv").is_symlink() and secret.exists()


def test_a_fifo_swapped_in_never_blocks_the_handler(tmp_path):
    daemon, inbox = make_daemon(tmp_path)
    fifo = inbox / "data.jsonl"
    os.mkfifo(fifo)
    worker = threading.Thread(target=daemon.ingest_inbox_file, args=(fifo,), daemon=True)
    worker.start()
    worker.join(5.0)
    if worker.is_alive():  # unblock the stuck open so the test process can finish
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not worker.is_alive(), "opening a FIFO blocked the inbox handler"
    assert (inbox / ".rejected" / "data.jsonl").exists() and not os.path.lexists(fifo)
    assert any("FIFO" in r for r in rejected_reasons(inbox))


def test_links_fifos_and_unusable_names_are_set_aside_once_with_a_reason(tmp_path, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "link.jsonl").symlink_to("/etc/hostname")
    bad = os.path.join(os.fsencode(inbox), b"caf\xe9.jsonl")  # Latin-1, not UTF-8
    with open(bad, "w") as f:
        f.write('{"text": "x"}\n')
    long_name = "n" * 245 + ".jsonl"  # fits the file system, not with '.rejects.jsonl' after it
    (inbox / long_name).write_text('{"text": "x"}\n')
    (inbox / "good.jsonl").write_text('{"text": "x"}\n')
    told = []
    watcher = InboxWatcher(inbox, lambda p, st: None, settle_seconds=0.0, clock=lambda: 0.0,
                           on_refused=lambda path, reason: told.append(reason))
    with caplog.at_level(logging.WARNING, logger="lorad.inbox"):
        watcher.scan()
        watcher.scan()  # a second pass finds nothing left to refuse
    assert watcher.due() == [inbox.resolve() / "good.jsonl"]
    assert sorted(os.listdir(inbox)) == [".rejected", "good.jsonl"]
    assert len(os.listdir(inbox / ".rejected")) == 8, "four entries, each with its report"
    reasons = " | ".join(rejected_reasons(inbox))
    for expected in ("FIFO", "symbolic link", "not valid UTF-8", "too long"):
        assert expected in reasons
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 4, "one log line per refused entry, not one per scan"
    assert len(told) == 4, "the daemon is told of each (it counts them as rejected inbox files)"
