"""`lorad train --data` then `lorad eval` from the command line, as a new user runs them (tiny model, CPU)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def cli_env(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("LORAD_MODEL__BASE_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("LORAD_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("LORAD_EVAL__MAX_EXAMPLES", "8")
    monkeypatch.setenv("LORAD_EVAL__ANSWER_EXAMPLES", "4")
    monkeypatch.setenv("LORAD_EVAL__LATENCY_PROMPTS", "1")
    monkeypatch.setenv("LORAD_EVAL__BOOTSTRAP_SAMPLES", "100")
    data, holdout = tmp_path / "train.jsonl", tmp_path / "holdout.jsonl"
    data.write_text("".join(json.dumps({"input": f"w{i} w{i + 1}", "output": f"w{i + 2} w{i + 3}"}) + "\n"
                            for i in range(12)), encoding="utf-8")
    holdout.write_text("".join(json.dumps({"input": f"w{i} w{i + 2}", "output": f"w{i + 4}"}) + "\n"
                               for i in range(6)), encoding="utf-8")
    return tmp_path / "state", data, holdout


def test_lorad_train_then_eval_with_a_holdout(cli_env, capsys):
    from daemon.cli import main

    state, data, holdout = cli_env
    assert main(["train", "--data", str(data), "--state", str(state), "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    version = out.split(":", 1)[0]
    assert version.startswith("v") and f"lorad eval --candidate {version} --holdout FILE" in out
    # trained from files, not from the inbox: no data snapshot, so eval asks for the holdout by name
    assert main(["eval", "--candidate", version, "--state", str(state)]) == 1
    assert "--holdout FILE" in capsys.readouterr().err
    assert main(["eval", "--candidate", version, "--holdout", str(holdout), "--state", str(state), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["candidate"] == version and report["incumbent"] == "base"
    assert report["tests"]["holdout"]["n"] == 6 and report["decision"] in ("promote", "reject")
    assert set(report["metrics"]["candidate"]) >= {"holdout_loss", "chatterbot-en_loss", "chatterbot-zh_loss"}
    # each model's regression-set losses are kept for its next evaluation (the candidate's for when it is promoted)
    folder = state / "cache" / "eval-answers"
    kept = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in folder.glob("*.json")}
    assert set(kept) == {version, "base"} and all(len(doc["losses"]) == 2 for doc in kept.values())


@pytest.mark.parametrize("argv", [["eval", "--candidate", "v0001-aaaaaaaa"], ["unpark", "--all"],
                                  ["drift", "--adapter", "v0001-aaaaaaaa", "--reference", "{data}",
                                   "--current", "{data}"]])
def test_commands_that_read_the_state_refuse_a_missing_one_and_create_nothing(argv, tmp_path, capsys):
    """A mistyped --state is named in the error; no empty state folder is left behind (nothing loads a model)."""
    from daemon.cli import EXIT_FAILED, main

    data = tmp_path / "x.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n", encoding="utf-8")
    state = tmp_path / "typo-state"
    assert main([a.format(data=data) for a in argv] + ["--state", str(state)]) == EXIT_FAILED
    assert f"no lorad state in {state}" in capsys.readouterr().err
    assert not state.exists()
