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
    # Answers as well as losses: per task, group and month, the multiple-choice sets, forgetting in answer form.
    for arm in continual.ARMS:
        a = second[arm]
        assert set(a["answer_score"]) == {"classification", "statutes"}
        assert a["answer_score_by_task"]["classification/2-4问题主题识别"]["metric"] == "accuracy"
        assert a["answer_score_by_task"]["statutes/1-1法条背诵"]["metric"] == "rouge_l"
        assert 0.0 <= a["domain_accuracy"] <= 1.0 and a["accuracy"]["classification"] is not None
        assert len(a["mcq_accuracy"]) == 6 and all(0.0 <= v <= 1.0 for v in a["mcq_accuracy"].values())
        assert set(a["answer_forgetting_by_group"]) == {"classification"}
    assert second["base"]["answer_forgetting"] == 0.0, "the base model's answers cannot change"
    for name in ("domain_accuracy_gain_vs_base", "domain_accuracy_gap_vs_retrain", "answer_forgetting_ratio_vs_naive"):
        assert name in result["goals"]

    # Each task's holdout is split into validation (the daemon's holdout: its gate evaluates on it) and test
    # (reported): no test record ever reached the daemon; the goals are on test, goals_validation beside them.
    assert set(result["holdout_split"]) == {"classification/2-4问题主题识别", "statutes/1-1法条背诵"}
    assert all(v["validation"] > 0 and v["test"] > 0 for v in result["holdout_split"].values())
    assert set(result["goals_validation"]) == set(result["goals"])
    db = sqlite3.connect(work / "state" / "lorad.db")
    ref = sqlite3.connect(work / "reference" / "lorad.db")
    roles = {h: continual.holdout_role(h) for (h,) in ref.execute("SELECT content_hash FROM records "
                                                                   "WHERE split = 'holdout'")}
    daemon_holdout = {h for (h,) in db.execute("SELECT content_hash FROM records WHERE split = 'holdout'")}
    assert daemon_holdout == {h for h, role in roles.items() if role == "validation"}
    gate_seen = {h for (h,) in db.execute("SELECT r.content_hash FROM snapshot_records s JOIN records r "
                                          "ON r.id = s.record_id WHERE s.role = 'holdout'")}
    assert gate_seen and gate_seen <= daemon_holdout
    test_hashes = {h for h, role in roles.items() if role == "test"}
    assert test_hashes and not test_hashes & {h for (h,) in db.execute("SELECT content_hash FROM records")}

    # Holdouts are never trained on: not by the daemon's snapshots, not by the baselines.
    leaked = db.execute("SELECT COUNT(*) FROM snapshot_records s JOIN records r ON r.id = s.record_id "
                        "WHERE r.split = 'holdout' AND s.role != 'holdout'").fetchone()[0]
    holdout = {row[0] for row in ref.execute("SELECT payload FROM records WHERE split = 'holdout'")}   # both halves
    assert leaked == 0 and holdout
    for arm in ("naive", "retrain"):
        rows = [json.loads(x) for x in (work / arm / "month02" / "data.jsonl").read_text().splitlines()]
        assert all(r.get("category") for r in rows), "baseline records keep their task as category"
        trained = {json.dumps({k: v for k, v in r.items() if k != "category"}, ensure_ascii=False,
                              separators=(",", ":")) for r in rows}
        assert not trained & {json.dumps(json.loads(h), ensure_ascii=False, separators=(",", ":")) for h in holdout}


# ----------------------------------------------------------------------------- ablation options (fast, no model)


def test_set_overrides_are_yaml_and_checked_by_lorads_config_builder(tmp_path):
    from daemon.config import ConfigError

    continual = load_bench()
    sets = continual.parse_sets(["train.curriculum=easy_to_hard", "data.min_domain_fraction=0.8",
                                 "train.category_weights=[1-1法条背诵=2, 2-4问题主题识别=0.5]"])
    assert sets == {"train": {"curriculum": "easy_to_hard", "category_weights": ["1-1法条背诵=2", "2-4问题主题识别=0.5"]},
                    "data": {"min_domain_fraction": 0.8}}
    cfg = continual.build_run_config(continual.PROFILES["smoke"], tmp_path, "m", [], sets)
    assert cfg.train.curriculum == "easy_to_hard" and cfg.data.min_domain_fraction == 0.8
    assert cfg.train.lora_r == 4, "the profile's own values stay"
    for bad in ("curriculum=easy_to_hard", "train.curriculum", "paths.state_dir=/x"):
        with pytest.raises(ValueError, match="--set"):
            continual.parse_sets([bad])
    with pytest.raises(ConfigError, match="train.curriculm: unknown key"):
        continual.build_run_config(continual.PROFILES["smoke"], tmp_path, "m", [],
                                   continual.parse_sets(["train.curriculm=easy_to_hard"]))
    assert continual.main(["--profile", "smoke", "--set", "train.curriculum=true"]) == 2


def test_goals_that_need_a_missing_arm_report_no_value():
    continual = load_bench()
    arm = {"domain_loss": 2.0, "regression_loss_mean": 3.0, "forgetting": 0.1, "tokens_cumulative": 100}
    months = [{"arms": {"base": {**arm, "domain_loss": 4.0, "forgetting": 0.0, "tokens_cumulative": 0},
                        "lorad": arm}}]
    goals = continual.goals(months)
    assert set(goals) == set(continual.TARGETS)
    assert goals["domain_loss_reduction_vs_base"]["value"] == pytest.approx(0.5)
    for name in ("forgetting_ratio_vs_naive", "token_ratio_vs_retrain", "domain_loss_gap_vs_retrain"):
        assert goals[name]["value"] is None and goals[name]["met"] is False
        assert "not run" in goals[name]["how"]
    assert "naive" in goals["forgetting_ratio_vs_naive"]["how"]


def split(result: dict, arms: tuple[str, ...], months: int) -> dict:
    import copy

    part = copy.deepcopy(result)
    part["arms"] = [a for a in result["arms"] if a in arms]
    part["months"] = part["months"][:months]
    for m in part["months"]:
        m["arms"] = {a: v for a, v in m["arms"].items() if a in arms}
        m["baselines"] = {a: v for a, v in m["baselines"].items() if a in arms}
        if "lorad" not in arms:
            m["lorad"] = None
    return part


def test_merging_runs_that_each_ran_some_arms_gives_the_whole_runs_goals(tmp_path):
    continual = load_bench()
    whole = json.loads((ROOT / "bench" / "results" / "continual_gpu.json").read_text(encoding="utf-8"))
    a, b = split(whole, ("base", "lorad"), 2), split(whole, ("naive", "retrain"), 1)
    merged = continual.merge([a, b], ["a.json", "b.json"])
    assert len(merged["months"]) == 1 and merged["complete"] is False   # b finished one month only
    assert merged["goals"] == continual.goals(whole["months"][:1])
    merged = continual.merge([a, split(whole, ("naive", "retrain"), 2)], ["a.json", "b.json"])
    assert merged["goals"] == continual.goals(whole["months"][:2])
    assert merged["months"][1]["lorad"] == whole["months"][1]["lorad"]
    assert [p["arms"] for p in merged["parts"]] == [["base", "lorad"], ["naive", "retrain"]]

    other = split(whole, ("naive", "retrain"), 2)
    other["config"]["train"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="config differs"):
        continual.merge([a, other], ["a.json", "b.json"])
    # A daemon-only setting (the replay share) may differ between the lorad part and a baselines part ...
    replay = split(whole, ("base", "lorad"), 2)
    replay["config"]["data"]["replay_fraction"] = 0.4
    replay["overrides"] = {"data": {"replay_fraction": 0.4}}
    merged = continual.merge([split(whole, ("naive", "retrain"), 2), replay], ["b.json", "a.json"])
    assert merged["config"]["data"]["replay_fraction"] == 0.4 and merged["parts"][0]["file"] == "a.json"
    # Overrides that spell out a default give the same config: they merge.
    spelled = split(whole, ("naive", "retrain"), 2)
    spelled["overrides"] = {"train": {"seed": whole["config"]["train"]["seed"]}}
    assert continual.merge([a, spelled], ["a.json", "b.json"])["goals"] == continual.goals(whole["months"][:2])
    # ... but not between two parts that both hold the daemon's settings.
    with pytest.raises(ValueError, match="config differs|overrides differs"):
        continual.merge([replay, split(whole, ("lorad",), 2)], ["a.json", "c.json"])
    with pytest.raises(ValueError, match="both ran"):
        continual.merge([a, split(whole, ("base", "naive"), 2)], ["a.json", "b.json"])
    other = split(whole, ("naive", "retrain"), 2)
    other["months"][1]["records"]["holdout"] += 1
    with pytest.raises(ValueError, match="month 2 accepted"):
        continual.merge([a, other], ["a.json", "b.json"])

    for name, part in (("a.json", a), ("b.json", split(whole, ("naive", "retrain"), 2))):
        (tmp_path / name).write_text(json.dumps(part), encoding="utf-8")
    out = tmp_path / "merged.json"
    assert continual.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["goals"] == continual.goals(whole["months"][:2])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_text_records_come_from_the_train_split_only(tmp_path):
    from pipelines.ingest import Normaliser, _Invalid, stable_split

    continual = load_bench()
    profile = continual.PROFILES["cpu"]
    cfg = continual.build_run_config(profile, tmp_path, "m", [])
    group, tasks = profile.months[0]   # statutes: the answers are statute texts
    plain = continual.month_file(tasks, 60, 7, tmp_path / "plain.jsonl", group=group, data_cfg=cfg.data)
    info = continual.month_file(tasks, 60, 7, tmp_path / "text.jsonl", group=group, text_records=5,
                                text_chars=300, data_cfg=cfg.data)
    assert plain["text_records"] == 0 and 0 < info["text_records"] <= 5
    rows = [json.loads(x) for x in (tmp_path / "text.jsonl").read_text().splitlines()]
    assert rows[:info["records"]] == [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert all(r["category"] in tasks for r in rows[:info["records"]])
    texts = rows[info["records"]:]
    assert len(texts) == info["text_records"]
    normalise = Normaliser(cfg.data)
    held = []
    for r in rows[:info["records"]]:
        try:
            record = normalise(r)
        except _Invalid:   # ingest would reject it (too long for the cpu profile): in no split
            continue
        if stable_split(record.content_hash, cfg.data.holdout_fraction) == "holdout":
            held.append(record.payload["messages"])
    assert held, "the sample has holdout records to keep out"
    for t in texts:
        assert t["category"] == f"text/{group}" and len(t["text"]) <= 300
        assert stable_split(normalise(t).content_hash, cfg.data.holdout_fraction) == "train"
        for messages in held:   # no holdout question or statute text leaks into the raw text
            assert messages[-2]["content"] not in t["text"]
            if len(messages[-1]["content"]) >= continual.DISTINCT_ANSWER_CHARS:
                assert messages[-1]["content"] not in t["text"]


def test_ablation_weights_favour_the_newest_group_and_differences_are_run_minus_control():
    spec = importlib.util.spec_from_file_location("bench_continual_ablation", ROOT / "bench" / "continual_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    months = (("a", ("a1", "a2")), ("b", ("b1",)), ("c", ("c1",)))
    assert ablation.newest_first_weights(months) == ["a1=1", "a2=1", "b1=1.5", "c1=2"]
    runs = ablation.variants(months, 3)
    assert runs["control"]["sets"] == [] and runs["no_text_records"]["text_records"] == 0
    assert all(v["text_records"] == 3 for n, v in runs.items() if n != "no_text_records")
    control = {"months_done": 3, "domain_loss": 2.0, "regression_loss_mean": 3.0, "forgetting": None,
               "tokens_cumulative": 100, "promotions": 2}
    run = {**control, "domain_loss": 1.5, "tokens_cumulative": 80, "promotions": 3}
    diff = ablation.differences(run, control)
    assert diff["domain_loss"] == -0.5 and diff["domain_loss_relative"] == -0.25 and diff["tokens_cumulative"] == -20
    assert diff["forgetting"] is None and diff["promotions"] == 1
    assert ablation.differences({**run, "months_done": 2}, control) is None, "an unfinished run is not compared"


def load_ablation():
    spec = importlib.util.spec_from_file_location("bench_continual_ablation", ROOT / "bench" / "continual_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_sweeps_read_the_validation_split_never_test():
    ablation = load_ablation()
    test = {"domain_loss": 1.0, "regression_loss_mean": 2.0, "forgetting": 0.5, "holdout_loss": {"g": 1.0}}
    val = {"domain_loss": 3.0, "regression_loss_mean": 4.0, "forgetting": 0.25, "holdout_loss": {"g": 3.0}}
    arm = {**test, "tokens_cumulative": 10, "validation": val}
    run = {"complete": True, "months": [{"arms": {"lorad": arm, "base": {**arm, "tokens_cumulative": 0}},
                                         "lorad": {"decisions": [], "runs": []}}]}
    s = ablation.summarize(run)
    assert s["scored_on"] == "validation"
    assert (s["domain_loss"], s["regression_loss_mean"], s["forgetting"]) == (3.0, 4.0, 0.25)
    assert s["domain_loss_by_group"] == {"g": 3.0} and s["domain_loss_by_month"] == [3.0]
    assert s["base"]["domain_loss"] == 3.0 and s["tokens_cumulative"] == 10


def test_the_replay_sweep_picks_on_validation_goals():
    ablation = load_ablation()
    runs = ablation.replay_variants()
    assert runs["baselines"]["arms"] == "base,naive,retrain"
    assert runs["chars035"]["sets"] == ["data.replay_unit=chars", "data.replay_fraction=0.35"]
    assert all(v["arms"] == "lorad" and v["text_records"] == 0 for n, v in runs.items() if n != "baselines")

    def goals(met: int, gap: float | None) -> dict:
        out = {f"g{i}": {"met": i < met, "value": 0.0} for i in range(6)}
        out["domain_loss_gap_vs_retrain"] = {"met": False, "value": gap}
        return out

    done = {"summary": {"complete": True}}
    picked = ablation.pick({"a": {**done, "sets": ["x"], "goals": goals(4, 0.01)},
                            "b": {**done, "sets": ["y"], "goals": goals(5, 0.05)},
                            "c": {**done, "sets": ["z"], "goals": goals(5, 0.02)},
                            "d": {"summary": {"complete": False}, "sets": [], "goals": goals(6, 0.0)},
                            "e": {**done, "sets": [], "goals": None}})
    assert picked["run"] == "c" and picked["sets"] == ["z"] and picked["split"] == "validation"
    assert set(picked["candidates"]) == {"a", "b", "c"}, "unfinished or ungoaled runs are not candidates"
    assert ablation.pick({"e": {**done, "goals": None}}) is None


def with_validation(result: dict, shift: float) -> dict:
    """A copy of a result made before the split, each arm given a validation block (its losses + ``shift``)."""
    import copy

    out = copy.deepcopy(result)
    for m in out["months"]:
        for arm in m["arms"].values():
            arm["validation"] = {**{k: v for k, v in arm.items() if k != "validation"},
                                 "domain_loss": arm["domain_loss"] + shift}
    return out


def test_a_replay_run_gets_its_goals_on_validation_from_the_baselines_run():
    continual, ablation = load_bench(), load_ablation()
    whole = with_validation(json.loads((ROOT / "bench" / "results" / "continual_gpu.json").read_text("utf-8")), 0.5)
    lorad, baselines = split(whole, ("lorad",), 5), split(whole, ("base", "naive", "retrain"), 5)
    goals = ablation.merged_validation_goals(continual, lorad, baselines, "chars035")
    assert goals == continual.goals(whole["months"], split="validation") != continual.goals(whole["months"])
    assert goals["domain_loss_gap_vs_retrain"]["value"] == pytest.approx(
        (whole["months"][-1]["arms"]["lorad"]["domain_loss"] + 0.5)
        / (whole["months"][-1]["arms"]["retrain"]["domain_loss"] + 0.5) - 1)
    assert ablation.merged_validation_goals(continual, lorad, None, "chars035") is None
    other = split(whole, ("base", "naive", "retrain"), 5)
    other["config"]["train"]["learning_rate"] = 1.0   # not the same benchmark
    assert ablation.merged_validation_goals(continual, lorad, other, "chars035") is None
