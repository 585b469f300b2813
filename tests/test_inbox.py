"""Inbox watcher: completeness, temporary names, startup scan, subfolders, symlinks, bursts."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from daemon.inbox import InboxWatcher, is_candidate


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_candidates(tmp_path):
    root = tmp_path
    (root / "sub").mkdir()
    (root / ".done").mkdir()
    for name in ("a.jsonl", "b.jsonl.part", "c.tmp", ".hidden.jsonl", "sub/d.csv", ".done/e.jsonl", "f.json~"):
        (root / name).write_text("x")
    outside = tmp_path.parent / f"outside-{os.getpid()}.jsonl"
    outside.write_text("secret")
    (root / "link.jsonl").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path.parent)
    got = sorted(str(p.relative_to(root)) for p in root.rglob("*") if is_candidate(root, p))
    assert got == ["a.jsonl", "sub/d.csv"]
    assert not is_candidate(root, root / "linkdir" / outside.name)
    assert not is_candidate(root, outside)


def test_a_file_is_ready_only_after_it_settles(tmp_path):
    clock = Clock()
    w = InboxWatcher(tmp_path, on_ready=lambda p, st: None, settle_seconds=2.0, clock=clock)
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "one"}\n')
    w.offer(f)
    assert w.due() == []
    clock.t += 1.5
    with open(f, "a") as fh:  # still being written: size changes, the settle timer restarts
        fh.write('{"text": "two"}\n')
    assert w.due() == []
    clock.t += 1.9
    assert w.due() == []
    clock.t += 0.2
    assert w.due() == [f]
    assert w.due() == [] and w.pending == 0


def test_part_files_count_only_once_renamed(tmp_path):
    clock = Clock()
    w = InboxWatcher(tmp_path, on_ready=lambda p, st: None, settle_seconds=0.0, clock=clock)
    part = tmp_path / "upload.jsonl.part"
    part.write_text("{}\n")
    w.offer(part)
    assert w.due() == []
    final = tmp_path / "upload.jsonl"
    part.rename(final)
    w.offer(final)
    assert w.due() == [final]


def test_live_watcher_startup_scan_subfolders_and_burst(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "early").mkdir(parents=True)
    (inbox / "early" / "before-start.jsonl").write_text("{}\n")  # arrived while the daemon was down
    seen: list[Path] = []
    lock = threading.Lock()

    def on_ready(p: Path, settled: os.stat_result) -> None:
        with lock:
            seen.append(p)
        p.rename(p.with_name("." + p.name))  # the handler moves files out of sight, as the daemon does

    w = InboxWatcher(inbox, on_ready=on_ready, settle_seconds=0.2)
    w.start()
    try:
        burst = inbox / "burst"
        burst.mkdir()
        for i in range(1000):
            (burst / f"f{i:04d}.jsonl").write_text(f'{{"text": "{i}"}}\n')
        tmp = inbox / "late.jsonl.tmp"
        tmp.write_text("{}\n")
        tmp.rename(inbox / "late.jsonl")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(seen) >= 1002:
                    break
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        w.stop()
    names = sorted(p.name for p in seen)
    assert len(names) == 1002 and len(set(names)) == 1002, "every file exactly once"
    assert "before-start.jsonl" in names and "late.jsonl" in names


def test_idle_watcher_sleeps(tmp_path):
    w = InboxWatcher(tmp_path, on_ready=lambda p, st: None, settle_seconds=0.1)
    w.start()
    try:
        t0 = time.process_time()
        time.sleep(1.0)
        used = time.process_time() - t0
    finally:
        w.stop()
    assert used < 0.05, f"idle watcher used {used:.3f} s of CPU in 1 s"


def test_live_watcher_makes_its_own_folders_and_nested_folders_raise_no_watchdog_warning(tmp_path):
    import warnings

    w = InboxWatcher(tmp_path / "inbox", lambda p, st: None, settle_seconds=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.start()
        try:
            assert (tmp_path / "inbox" / ".done" / ".reports").is_dir() and (tmp_path / "inbox" / ".rejected").is_dir()
            for i in range(4):   # a folder dropped with a subfolder: watchdog 7 registers the inner one twice
                (tmp_path / "inbox" / f"drop{i}" / "inner").mkdir(parents=True)
                time.sleep(0.2)
        finally:
            w.stop()
    assert not [c for c in caught if "already exists" in str(c.message)]


def test_live_watcher_sets_links_and_fifos_aside_as_they_arrive(tmp_path):
    inbox = tmp_path / "inbox"
    refused: list[str] = []
    w = InboxWatcher(inbox, on_ready=lambda p, st: None, settle_seconds=0.1,
                     on_refused=lambda p, reason: refused.append(p.name))
    w.start()
    try:
        os.mkfifo(inbox / "pipe.jsonl")
        (inbox / "link.jsonl").symlink_to(tmp_path)
        deadline = time.monotonic() + 10
        while len(refused) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert sorted(refused) == ["link.jsonl", "pipe.jsonl"]
    assert sorted(p.name for p in (inbox / ".rejected").iterdir()) == [
        "link.jsonl", "link.jsonl.rejects.jsonl", "pipe.jsonl", "pipe.jsonl.rejects.jsonl"]
