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


# ----------------------------------------------------------------------------- refused candidates


def _ingest(store, tmp_path, name, start, n):
    import json

    from daemon.config import DataConfig
    from pipelines.ingest import ingest_file

    path = tmp_path / name
    path.write_text("".join(json.dumps({"input": f"question {start + i}", "output": f"answer {start + i}"}) + "\n"
                            for i in range(n)))
    ingest_file(path, store, DataConfig(near_dup_threshold=1.0, holdout_fraction=0.2))


def _candidate(store, version, snapshot_id, decision, reason="holdout loss not better"):
    import json
    import time

    with store.transaction() as tx:
        tx.execute("INSERT INTO adapters (version, path, sha256, base_model, snapshot_id, eval_report, created_at) "
                   "VALUES (?, '/x', 'h', 'b', ?, ?, ?)",
                   (version, snapshot_id, json.dumps({"decision": decision, "reason": reason}), time.time()))


def test_a_refused_candidates_records_join_the_next_run_and_are_parked_after_max_refusals(tmp_path):
    from daemon.config import DataConfig

    cfg = DataConfig(near_dup_threshold=1.0, holdout_fraction=0.2, replay_fraction=0.0)
    store = open_store(tmp_path / "state")
    _ingest(store, tmp_path, "m1.jsonl", 0, 40)
    first = runs.build_snapshot(store, cfg, seed=1)
    _candidate(store, "v1", first.id, decision=True)
    runs.hold_refused(store, "v1", "never called for an accepted one", max_refusals=2)   # no-op: not refused
    assert store.counts()["records_pending"] == 0

    _ingest(store, tmp_path, "m2.jsonl", 100, 40)
    second = runs.build_snapshot(store, cfg, seed=1)
    _candidate(store, "v2", second.id, decision=False, reason="holdout loss +24.8 %")
    held = runs.hold_refused(store, "v2", "holdout loss +24.8 %", max_refusals=2)
    assert sorted(held["waiting"]) == sorted(second.new) and held["parked"] == []
    assert store.counts()["records_pending"] == len(second.new)        # refused: not learned, still pending
    assert "the gate refused v2" in store.events(kind="records", limit=1)[0]["reason"]
    waiting = runs.refused_records(store)
    assert waiting["n_waiting"] == len(second.new) and waiting["waiting"][0]["version"] == "v2"

    # the next month's run trains them with whatever arrived since, and judges on both holdouts
    _ingest(store, tmp_path, "m3.jsonl", 200, 40)
    third = runs.build_snapshot(store, cfg, seed=1)
    assert set(second.new) < set(third.new) and set(second.holdout) < set(third.holdout)
    assert not set(first.new) & set(third.new)

    # refused again: month 2's records reach promote.max_refusals = 2 and are parked with both reasons
    _candidate(store, "v3", third.id, decision=False, reason="holdout accuracy collapsed")
    held = runs.hold_refused(store, "v3", "holdout accuracy collapsed", max_refusals=2)
    assert sorted(held["parked"]) == sorted(second.new)
    assert sorted(held["waiting"]) == sorted(set(third.new) - set(second.new))
    assert held["reasons"] == ["holdout loss +24.8 %", "holdout accuracy collapsed"]
    pending = {r[0] for r in store.query(*runs.pending_sql("r.id"))}
    assert pending == set(third.new) - set(second.new)
    status = runs.refused_records(store)
    assert status["n_parked"] == len(second.new) and status["parked"][0]["version"] == "v3"
    assert "2 refused candidates" in status["parked"][0]["reason"]

    # `lorad status` says which records wait and why, and which are parked
    from daemon.cli import _format_status
    from daemon.config import build_config
    from daemon.service import status_snapshot

    text = _format_status(status_snapshot(build_config({"paths": {"state_dir": str(tmp_path / "state")}}), store))
    assert f"waiting    {len(set(third.new) - set(second.new))} records of refused v3 join the next run: " \
           "holdout accuracy collapsed" in text
    assert f"parked     {len(second.new)} records" in text and "last: holdout accuracy collapsed" in text

    # a refused candidate promoted by hand afterwards: its records were learned after all
    store.add_event("promote", subject="v3", ok=True, reason="by hand")
    assert store.counts()["records_pending"] == 0


def test_a_failed_evaluation_keeps_the_records_pending_and_unpark_gives_parked_ones_back(tmp_path):
    """A candidate whose evaluation crashed (or whose promotion failed) is not learned: its new records stay
    pending like a refused one's and count toward parking; `lorad unpark` makes parked records pending again
    and forgets their earlier refusals."""
    import json
    import subprocess
    import sys
    import time

    from daemon.config import DataConfig

    cfg = DataConfig(near_dup_threshold=1.0, holdout_fraction=0.2, replay_fraction=0.0)
    store = open_store(tmp_path / "state")
    _ingest(store, tmp_path, "m1.jsonl", 0, 40)
    first = runs.build_snapshot(store, cfg, seed=1)
    with store.transaction() as tx:   # registered, never judged: what a crashed `lorad eval` leaves
        tx.execute("INSERT INTO adapters (version, path, sha256, base_model, snapshot_id, created_at) "
                   "VALUES ('v1', '/x', 'h', 'b', ?, ?)", (first.id, time.time()))
    assert store.counts()["records_pending"] == 0   # counted as learned until the failure is recorded
    held = runs.hold_unjudged(store, "v1", "evaluation failed (exit 1): CUDA error", max_refusals=2)
    assert sorted(held["waiting"]) == sorted(first.new) and held["parked"] == []
    assert store.counts()["records_pending"] == len(first.new)
    report = json.loads(store.query_one("SELECT eval_report FROM adapters WHERE version = 'v1'")[0])
    assert report == {"decision": False, "reason": "evaluation failed (exit 1): CUDA error", "failed": True}

    # the next run fails to promote too (the gate passed, loading failed): the records reach max_refusals
    second = runs.build_snapshot(store, cfg, seed=1)
    assert set(first.new) == set(second.new) and second.id == first.id   # the same records: the same snapshot
    _candidate(store, "v2", second.id, decision=True, reason="holdout loss -12 %")
    held = runs.hold_unjudged(store, "v2", "gate passed but promotion failed: bad sha256", max_refusals=2)
    assert sorted(held["parked"]) == sorted(first.new)
    assert store.counts()["records_pending"] == 0
    assert runs.refused_records(store)["parked_record_ids"] == sorted(first.new)

    # `lorad unpark` (the real command) gives two of them back; the rest stay parked
    config = tmp_path / "lorad.yaml"
    config.write_text(f"paths:\n  state_dir: {tmp_path / 'state'}\n")
    chosen = sorted(first.new)[:2]
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "unpark", "-c", str(config), *map(str, chosen), "999999"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"unparked": chosen, "not_parked": [999999]}
    pending = {r[0] for r in store.query(*runs.pending_sql("r.id"))}
    assert pending == set(chosen)
    status = runs.refused_records(store)
    assert status["n_parked"] == len(first.new) - 2 and status["parked"][0]["records"] == len(first.new) - 2

    # their two earlier refusals no longer count: one more refusal keeps them waiting, not parked
    third = runs.build_snapshot(store, cfg, seed=1)
    assert set(third.new) == set(chosen)
    _candidate(store, "v3", third.id, decision=False, reason="holdout loss +3 %")
    held = runs.hold_refused(store, "v3", "holdout loss +3 %", max_refusals=2)
    assert sorted(held["waiting"]) == chosen and held["parked"] == []
    usage = subprocess.run([sys.executable, "-m", "daemon.cli", "unpark", "-c", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--all" in usage.stderr
