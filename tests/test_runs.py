"""daemon/runs.py: the runs rows the job runner reads and writes."""

from __future__ import annotations

from daemon import runs
from daemon.store import open_store


def add_run(store, run_id, status, created_at, kind="train", result=None):
    with store.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, created_at, result) VALUES (?, ?, ?, ?, ?)",
                   (run_id, kind, status, created_at, result))


def test_resumable_latest_and_interrupted_runs(tmp_path):
    store = open_store(tmp_path)
    assert runs.last_train_created(store) is None and runs.latest_succeeded_run(store) is None
    add_run(store, "r-old", "succeeded", 1.0, result='{"version": "v0001-a"}')
    add_run(store, "r-new", "succeeded", 2.0, result='{"version": "v0002-b"}')
    add_run(store, "r-queued", "queued", 4.0)
    add_run(store, "r-cut", "running", 3.0)
    add_run(store, "e-1", "interrupted", 9.0, kind="eval")
    runs.interrupt_run(store, "r-cut")
    assert runs.resumable_runs(store) == ["r-cut", "r-queued"]   # train runs only, oldest first
    assert runs.last_train_created(store) == 4.0
    assert runs.latest_succeeded_run(store)["id"] == "r-new"
    assert store.events(kind="train")[0]["subject"] == "r-cut"
