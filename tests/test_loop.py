"""The learning loop on a tiny model: ingest -> drift -> train -> eval -> promote, each step a real
subprocess, and an interrupted run resumed by the next runner."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from daemon import registry
from daemon.config import build_config
from daemon.jobs import JobRunner
from daemon.runs import create_run, snapshot_payloads
from daemon.store import open_store
from pipelines.ingest import ingest_file

WORDS = "the law court contract judge party shall must not be by with for what who where".split()


def write_data(path: Path, n: int, seed: int, answer_words: list[str] = WORDS[:5]) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(answer_words) for _ in range(rng.randint(6, 12)))
            f.write(json.dumps({"query": f"{q} {i}", "response": a}) + "\n")
    return path


def config(tmp_path: Path, model_dir: Path, **over):
    data = {
        "paths": {"state_dir": str(tmp_path / "state"), "inbox": str(tmp_path / "inbox")},
        "model": {"base_model": str(model_dir)},
        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64, "holdout_fraction": 0.2,
                 "near_dup_threshold": 1.0},
        "drift": {"min_reference": 20, "min_current": 20, "reference_cap": 120, "permutations": 200},
        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-2, "max_steps": 12,
                  "micro_batch_size": 4, "grad_accum_steps": 1, "checkpoint_every_steps": 4, "warmup_ratio": 0.0},
        "eval": {"max_examples": 40, "bootstrap_samples": 200, "latency_prompts": 0},
        "promote": {"regression_tolerance": 0.5},
        "schedule": {"min_new_records": 20, "cooldown_minutes": 0},
    }
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)


@pytest.mark.integration
def test_manual_cycle_trains_evaluates_and_promotes(tmp_path, tiny_llama_dir, monkeypatch):
    # Relative paths, as `lorad run` started in a project folder has them: the drift, training and evaluation
    # subprocesses read them from the daemon's working directory (they once started in lorad's source root, and
    # the drift step could not find its own config).
    monkeypatch.chdir(tmp_path)
    cfg = config(Path("."), Path(os.path.relpath(tiny_llama_dir, tmp_path)))
    assert not Path(cfg.paths.state_dir).is_absolute() and not Path(cfg.model.base_model).is_absolute()
    # Every job process runs at schedule.job_nice lower priority than the daemon (serving computes first).
    import subprocess

    import daemon.jobs

    niceness, popen = [], subprocess.Popen

    def spy(*args, **kwargs):
        proc = popen(*args, **kwargs)
        niceness.append(os.getpriority(os.PRIO_PROCESS, proc.pid) - os.getpriority(os.PRIO_PROCESS, 0))
        return proc

    monkeypatch.setattr(daemon.jobs.subprocess, "Popen", spy)
    store = open_store(cfg.paths.state_dir)
    result = ingest_file(write_data(tmp_path / "a.jsonl", 150, 1), store, cfg.data)
    assert result.accepted == 150
    promoted, busy = [], []
    runner = JobRunner(cfg, store, on_promoted=promoted.append, on_busy=busy.append)
    out = runner.cycle("drift")
    events = {e["kind"]: e for e in reversed(store.events(limit=50))}
    assert "drift" in events, "the drift step ran and was recorded"
    assert events["drift"]["data"]["reference_source"].startswith("base model")
    assert out["trained"] is True and out["promoted"] is True, out
    assert len(niceness) >= 3 and set(niceness) == {cfg.schedule.job_nice} and cfg.schedule.job_nice > 0, niceness
    # the daemon hears when each job process starts and ends (a CPU engine shares the cores meanwhile)
    assert busy == [True, False] * len(niceness), busy
    version = out["version"]
    assert promoted == [version] and registry.champion(store) == version
    row = registry.get_adapter(store, version)
    report = json.loads(row["eval_report"]) if isinstance(row["eval_report"], str) else row["eval_report"]
    assert report["decision"] is True
    assert report["holdout"]["candidate_loss"] < report["holdout"]["incumbent_loss"]
    assert store.counts()["records_pending"] == 0
    m = runner.metrics.registry
    assert m.get_sample_value("lorad_training_runs_total", {"outcome": "succeeded"}) == 1
    assert m.get_sample_value("lorad_promotions_total", {"reason": "better"}) == 1
    assert m.get_sample_value("lorad_adapter_info", {"version": version, "parent": "", "sha256": row["sha256"]}) == 1

    # Second batch: warm start from the champion, judged against it.
    ingest_file(write_data(tmp_path / "b.jsonl", 60, 2), store, cfg.data)
    out2 = runner.cycle("manual")
    assert out2["trained"] is True, out2
    assert registry.get_adapter(store, out2["version"])["parent"] == version


@pytest.fixture(scope="module")
def expressive_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose random LM head is large enough for LoRA to move probability mass far."""
    import torch
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.initializer_range = 0.15
    d = tmp_path_factory.mktemp("expressive-llama")
    LlamaForCausalLM(config).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.mark.integration
def test_a_damaging_candidate_is_rejected_with_the_reason(tmp_path, expressive_llama_dir):
    # The champion learned to answer with the first five words; the regression set holds more of that
    # (an older holdout). New data teaches conflicting answers with other words and no replay: the
    # candidate wins on its own holdout but forgets, so the gate must refuse it, naming the set.
    old_style = write_data(tmp_path / "regression.jsonl", 60, 7)
    cfg = config(tmp_path, expressive_llama_dir, eval={"regression_sets": [str(old_style)]},
                 data={"replay_fraction": 0.0}, train={"max_steps": 30}, promote={"regression_tolerance": 0.5})
    store = open_store(cfg.paths.state_dir)
    ingest_file(write_data(tmp_path / "a.jsonl", 150, 1), store, cfg.data)
    first = JobRunner(cfg, store).cycle("manual")
    assert first["promoted"] is True, first

    cfg = config(tmp_path, expressive_llama_dir, eval={"regression_sets": [str(old_style)]},
                 data={"replay_fraction": 0.0}, train={"max_steps": 30}, promote={"regression_tolerance": 0.02})
    ingest_file(write_data(tmp_path / "b.jsonl", 150, 2, answer_words=WORDS[8:13]), store, cfg.data)
    out = JobRunner(cfg, store).cycle("manual")
    report = registry.get_adapter(store, out["version"])["eval_report"]
    assert out["trained"] is True and out["promoted"] is False, report
    assert report["holdout"]["candidate_loss"] < report["holdout"]["incumbent_loss"], "it did learn the new data"
    assert f"regression set {old_style} loss +" in out["reason"] and "> 2 % tolerance" in out["reason"], out["reason"]
    assert registry.champion(store) == first["version"]
    assert store.events(kind="eval", limit=1)[0]["reason"] == out["reason"]

    # The refused candidate's records are not lost: they stay pending and the next run trains them.
    refused_new = {rid for rid, role, _ in snapshot_payloads(store, report_snapshot(store, out["version"]),
                                                             roles=("new",))}
    assert out["records_waiting"] == len(refused_new) > 0
    assert store.counts()["records_pending"] == len(refused_new)
    assert store.events(kind="records", limit=1)[0]["subject"] == out["version"]
    ingest_file(write_data(tmp_path / "c.jsonl", 30, 3), store, cfg.data)
    cfg = config(tmp_path, expressive_llama_dir, eval={"regression_sets": [str(old_style)]},
                 data={"replay_fraction": 0.0}, train={"max_steps": 4}, promote={"regression_tolerance": 0.9})
    nxt = JobRunner(cfg, store).cycle("manual")
    assert nxt["trained"] is True, nxt
    trained = {rid for rid, role, _ in snapshot_payloads(store, report_snapshot(store, nxt["version"]),
                                                         roles=("new",))}
    assert refused_new < trained, "the refused records joined the next run with the new ones"


def report_snapshot(store, version):
    return registry.get_adapter(store, version)["snapshot_id"]


@pytest.mark.integration
def test_interrupted_run_is_resumed_by_the_next_runner(tmp_path, tiny_llama_dir):
    cfg = config(tmp_path, tiny_llama_dir)
    store = open_store(cfg.paths.state_dir)
    ingest_file(write_data(tmp_path / "a.jsonl", 120, 3), store, cfg.data)
    from daemon.runs import build_snapshot, snapshot_payloads

    snap = build_snapshot(store, cfg.data, seed=0)
    payloads = [p for _, _, p in snapshot_payloads(store, snap.id)]
    run_id, run_dir = create_run(store, cfg, payloads, parent="champion", trigger="drift", snapshot_id=snap.id)
    with store.transaction() as tx:  # as a daemon killed mid-run leaves it (after recover_runs)
        tx.execute("UPDATE runs SET status = 'interrupted' WHERE id = ?", (run_id,))
    runner = JobRunner(cfg, store)
    assert runner.resume_interrupted() == [run_id]
    row = store.query_one("SELECT status, result FROM runs WHERE id = ?", (run_id,))
    assert row["status"] == "succeeded"
    assert registry.champion(store) == json.loads(row["result"])["version"]


@pytest.mark.integration
def test_the_warm_up_leaves_the_next_drift_check_only_the_new_records_to_featurize(tmp_path, tiny_llama_dir):
    cfg = config(tmp_path, tiny_llama_dir)
    store = open_store(cfg.paths.state_dir)
    ingest_file(write_data(tmp_path / "a.jsonl", 60, 1), store, cfg.data)
    runner = JobRunner(cfg, store)
    warmed = runner.warm_drift_reference()
    assert warmed["status"] == "warmed" and warmed["reference_features"] == "computed", warmed
    assert warmed["scored_by"] == "base" and cfg.drift.min_reference <= warmed["n_reference"] <= cfg.drift.reference_cap
    folder = tmp_path / "check"
    folder.mkdir()
    report = runner.drift_check(folder)
    assert report["reference_features"] == "cached" and report["n_current"] >= cfg.drift.min_current, report
    assert runner.current is None
    # After a promotion the runner queues the next warm-up itself (the new champion's data is the reference).
    out = runner.cycle("drift")
    assert out["promoted"] is True and runner._queue == ["warm"]
