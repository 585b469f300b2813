"""Crash consistency in CI: a real ``lorad run`` on a tiny model is SIGKILLed at random instants of its learning
cycle (ingest, train, eval, swap) and restarted; after each restart the crash rule's invariants must hold
(bench/reliability.py runs the same harness until 54 kills landed inside a non-idle phase and records the results)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402  (bench/reliability.py: the harness is shared with the benchmark)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_instants_loses_nothing(tmp_path):
    res = reliability.crash_trials(4, tmp_path, seed=7, lines_per_file=200, phases=("ingest", "train", "eval", "swap"),
                                   log=print)
    assert res["violations"] == [], res["violations"]
    counted = [t for t in res["trials"] if t["counted"]]
    assert res["kills_in_cycle"] == len(counted) == 4, res["trials"]
    assert all(t["phase"] not in ("idle", "unknown") for t in counted), res["trials"]
    phases = {t["phase"] for t in counted}
    assert "train" in phases and len(phases) >= 3, res["trials"]  # the kills really hit the cycle's work
    assert res["trials"][-1]["chain_end_violations"] == []


def test_the_invariant_checker_catches_violations(tmp_path):
    """The checker must be able to fail: a double-ingested file, a run left running, a tampered champion."""

    from daemon import registry
    from daemon.store import open_store
    from test_reliability_faults import make_adapter
    from conftest import build_tiny_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "m"
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(build_tiny_tokenizer()))).save_pretrained(model_dir)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    (inbox / ".done").mkdir(parents=True)
    maker = reliability.DataMaker(1)
    exp = maker.write(inbox / "a.jsonl", 20)
    store = open_store(state)
    from pipelines.ingest import ingest_file
    from daemon.config import DataConfig

    ingest_file(inbox / "a.jsonl", store, DataConfig(near_dup_threshold=1.0))
    (inbox / "a.jsonl").rename(inbox / ".done" / "a.jsonl")
    v = registry.register_adapter(store, state, make_adapter(model_dir, tmp_path / "ad", 0), base_model=str(model_dir))
    registry.promote(store, v, reason="t")
    assert reliability.check_invariants(state, inbox, {"a.jsonl": exp}) == []

    ingest_file(inbox / ".done" / "a.jsonl", store, DataConfig(near_dup_threshold=1.0))  # the same file again
    with store.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, created_at) VALUES ('r1', 'train', 'running', 0)")
    weights = Path(registry.get_adapter(store, v)["path"]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    store.close()
    problems = " | ".join(reliability.check_invariants(state, inbox, {"a.jsonl": exp}, served={"champion": "base"}))
    for needle in ("2 ingest rows", "run r1: left running", f"champion {v}", "sha256",
                   "server serves 'base'"):
        assert needle in problems, (needle, problems)


def test_a_run_whose_training_process_is_a_zombie_is_recovered(tmp_path):
    """Found by the crash benchmark: a killed daemon's training child was exiting (a zombie, empty cmdline)
    when the new daemon started, so recover_runs took it for another program's live process and left the
    run 'running' for ever."""
    import subprocess
    import time

    from daemon.runs import recover_runs
    from daemon.store import open_store

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited for: a zombie once it exits
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    store = open_store(tmp_path)
    with store.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, pid, created_at) VALUES ('r-z', 'train', 'running', ?, 0)",
                   (child.pid,))
    try:
        assert recover_runs(store) == ["r-z"]
        assert store.query_one("SELECT status FROM runs WHERE id = 'r-z'")["status"] == "interrupted"
    finally:
        child.wait()
        store.close()
