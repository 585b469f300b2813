"""The continual-learning benchmark (bench/continual.py) in miniature, so its path cannot rot: two tiny
months of LawBench through the real daemon (inbox -> drift -> train -> eval -> promote), the naive and
retrain baselines, scoring, goals and the plot, on a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_continual", ROOT / "bench" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow   # 10 drift/train/eval subprocesses: 6.4 min on the shared 2-core dev machine, where each
#                     subprocess's imports (torch, peft -> bitsandbytes) alone took 15-80 s
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_stream_runs_through_the_daemon_and_every_arm(tmp_path, tiny_llama_dir):
    continual = load_bench()
    out, work = tmp_path / "continual_smoke.json", tmp_path / "work"
    continual.run(continual.PROFILES["smoke"], out=out, work=work, base_model=str(tiny_llama_dir), cache=None,
                  timeout=300, log=lambda _: None)

    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert [m["group"] for m in result["months"]] == ["classification", "statutes"]
    assert set(result["goals"]) == set(continual.TARGETS)
    for name, goal in result["goals"].items():
        assert isinstance(goal["met"], bool) and goal["target"] == " ".join(map(str, continual.TARGETS[name]))
        assert goal["value"] is None or isinstance(goal["value"], float)
    assert out.with_suffix(".png").stat().st_size > 10_000

    # The lorad arm went through every daemon stage, and its decisions carry their reasons.
    decisions = [d for m in result["months"] for d in m["lorad"]["decisions"]]
    assert {"ingest", "drift", "decide_train", "train", "eval"} <= {d["kind"] for d in decisions}
    assert all(d["reason"] for d in decisions if d["kind"] in ("decide_train", "eval"))
    runs = [r for m in result["months"] for r in m["lorad"]["runs"]]
    assert runs and all(r["status"] == "succeeded" for r in runs)
    if len(runs) == 2:   # the second month warm-starts from the champion and replays the first month
        assert runs[1]["snapshot"]["n_replay"] > 0

    # Same data everywhere: in month 1 every arm trains on the same records with the same config.
    first, second = (m["arms"] for m in result["months"])
    assert first["naive"]["tokens"] == first["retrain"]["tokens"] == first["lorad"]["tokens"] > 0
    assert second["retrain"]["tokens"] > second["naive"]["tokens"] > 0
    assert second["retrain"]["tokens_cumulative"] == first["retrain"]["tokens"] + second["retrain"]["tokens"]
    assert first["base"]["tokens_cumulative"] == 0
    for arm in continual.ARMS:
        assert set(second[arm]["holdout_loss"]) == {"classification", "statutes"}
        assert set(second[arm]["regression_loss"]) == {"chatterbot-en", "chatterbot-zh"}
    assert second["base"]["forgetting"] == 0.0, "the base model cannot forget"

    # Holdouts are never trained on: not by the daemon's snapshots, not by the baselines.
    db = sqlite3.connect(work / "state" / "lorad.db")
    leaked = db.execute("SELECT COUNT(*) FROM snapshot_records s JOIN records r ON r.id = s.record_id "
                        "WHERE r.split = 'holdout' AND s.role != 'holdout'").fetchone()[0]
    holdout = {row[0] for row in db.execute("SELECT payload FROM records WHERE split = 'holdout'")}
    assert leaked == 0 and holdout
    for arm in ("naive", "retrain"):
        trained = {json.dumps(json.loads(x), ensure_ascii=False, separators=(",", ":"))
                   for x in (work / arm / "month02" / "data.jsonl").read_text().splitlines()}
        assert not trained & {json.dumps(json.loads(h), ensure_ascii=False, separators=(",", ":")) for h in holdout}
