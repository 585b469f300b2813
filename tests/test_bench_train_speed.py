"""The CPU-runnable pieces of the training-speed benchmark (bench/train_speed_arms.py): its arguments, the FLOP
count against a hand computation, the schedule of rounds and the summary on synthetic timings."""

from __future__ import annotations

import argparse

import pytest

from bench import train_speed_arms as arms

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    arms.add_arguments(ap.add_subparsers(dest="cmd", required=True))
    return ap.parse_args(argv)


def test_arguments_default_to_the_issues_protocol_and_refuse_unknown_arms():
    a = parse("rounds", "--out", "d")
    assert a.arms.split(",") == list(arms.ARMS) and a.rounds == 3 and a.steps == 30 and a.headline == "lorad_compiled"
    assert {"seed_8bit", "seed_fp16", "stock", "stock_liger", "stock_flat", "lorad_eager", "lorad_compiled"} <= set(
        arms.ARMS)
    assert parse("adapter-time", "lorad_eager", "--json", "f").tokens == 200 * 32768
    with pytest.raises(SystemExit):
        parse("arm", "lorad_turbo", "--json", "f")
    with pytest.raises(SystemExit):   # the seed recipe is too slow to train 6.5M tokens in a lease
        parse("adapter-time", "seed_8bit", "--json", "f")


def test_flops_per_token_match_a_hand_computation():
    # Per layer: q 64x64, k 64x32, v 64x32 (2 KV heads of 16), o 64x64, gate/up 64x128, down 128x64.
    frozen_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128      # 36,864
    frozen = 2 * frozen_layer + 64 * 1000                                    # + LM head; embedding: a lookup
    lora_layer = 16 * (128 + 96 + 96 + 128 + 3 * 192)                        # r (in + out) per linear: 16,384
    attended = (3 * 4 / 2 + 5 * 6 / 2) / 8                                  # records of 3 and 5 tokens
    want = 4 * frozen + 6 * 2 * lora_layer + 12 * 2 * 64 * attended
    assert arms.lora_flops_per_token(SMALL, [3, 5]) == pytest.approx(want)
    assert want == pytest.approx(4 * 137728 + 6 * 32768 + 4032)
    qv = 2 * 16 * (128 + 96)
    assert arms.lora_flops_per_token(SMALL, [3, 5], targets=("q_proj", "v_proj")) == pytest.approx(
        4 * frozen + 6 * qv + 12 * 2 * 64 * attended)


def test_every_arm_meets_every_gpu_across_rounds():
    lanes = arms.schedule(["a", "b", "c"], rounds=3, gpus=["0", "1", "2"])
    met = {(arm, gpu) for gpu, lane in enumerate(lanes) for _, arm in lane}
    assert met == {(a, g) for a in "abc" for g in range(3)}
    assert [len(lane) for lane in arms.schedule(list(arms.ARMS), 3, ["0"])] == [3 * len(arms.ARMS)]


def test_one_gpu_rotates_the_order_and_later_leases_continue_it():
    (lane,) = arms.schedule(["a", "b", "c"], rounds=3, gpus=["0"])
    assert lane == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    # one round per lease: rounds 1 and 2 measured later are the rounds the 3-round run would have had
    assert arms.schedule(["a", "b", "c"], 1, ["0"], first_round=1)[0] == lane[3:6]
    assert arms.schedule(["a", "b", "c"], 1, ["0"], first_round=2)[0] == lane[6:]
    assert parse("rounds", "--out", "d", "--first-round", "2").first_round == 2


def test_summary_takes_medians_finds_the_strongest_stock_arm_and_skips_failures():
    tps = {"seed_8bit": [1000, 1100, 900], "seed_fp16": [3000, 3100, 2900], "stock": [4800, 4700, 4900],
           "stock_liger": [8200, 8000, 8300], "stock_flat": [7000, 7100, 6900], "lorad_eager": [12000, 12500, 11500],
           "lorad_compiled": [17000, 16000, 18000]}
    rows = [{"arm": a, "round": r, "tokens_per_second": v} for a, vs in tps.items() for r, v in enumerate(vs)]
    rows.append({"arm": "stock_flat_liger", "round": 0, "error": "ImportError: liger_kernel"})
    s = arms.summarize(rows, flops_per_token={"lorad_compiled": 4.0e10}, peak=989e12)
    assert s["strongest_stock_arm"] == "stock_liger"
    assert s["speedup_vs_strongest_stock"] == pytest.approx(17000 / 8200)
    assert s["speedup_vs_seed_as_written"] == pytest.approx(17)
    assert s["speedup_vs_seed_fp16"] == pytest.approx(17000 / 3000)
    assert s["mfu_spec"] == pytest.approx(17000 * 4.0e10 / 989e12)
    assert s["rounds"] == 3 and "stock_flat_liger" not in s["arms"]
    assert s["arms"]["lorad_compiled"]["spread"] == pytest.approx(2000 / 17000)
    eager = arms.summarize(rows, headline="lorad_eager")
    assert eager["speedup_vs_strongest_stock"] == pytest.approx(12000 / 8200) and eager["mfu_spec"] is None


def _lease(rounds: dict[int, dict[str, float]], commit: str = "c" * 40, dirty=False, card: str = "H100") -> dict:
    rows = [{"arm": arm, "round": r, "tokens_per_second": v, "flops_per_token": 4.0e10, "card": card}
            for r, tps in rounds.items() for arm, v in tps.items()]
    return {"commit": commit, "dirty": dirty, "timed_steps": 30, "warmup_steps": 3, "info": {"card": card},
            "rows": rows, "summary": {"headline_arm": "lorad_compiled"}}


ROUND = {"seed_8bit": 1000.0, "seed_fp16": 3000.0, "stock": 4800.0, "stock_liger": 8000.0, "lorad_compiled": 16000.0}


def test_per_round_ratios_and_their_range():
    rows = [{"arm": a, "round": r, "tokens_per_second": v * (1 + r)} for r in range(2) for a, v in ROUND.items()]
    rows[-1]["tokens_per_second"] = 16000.0 * 2 * 1.1          # round 1: lorad 10 % faster relative to stock
    s = arms.summarize(rows)
    assert s["per_round"]["0"]["speedup_vs_strongest_stock"] == pytest.approx(2.0)
    assert s["per_round"]["1"]["speedup_vs_strongest_stock"] == pytest.approx(2.2)
    assert s["per_round_range"]["speedup_vs_seed_fp16"] == pytest.approx([16 / 3, 16 / 3 * 1.1])


def test_merge_rounds_joins_leases_of_one_clean_commit_and_replaces_the_old_headline():
    old = {"speedup_vs_seed": 8.06, "speedup_vs_stock": 4.2, "mfu": 0.62, "qlora_peak_gib": 7.1, "cpu_cases": {}}
    a, b = _lease({0: ROUND}), _lease({1: {k: v * 1.1 for k, v in ROUND.items()}}, card="H200")
    out = arms.merge_rounds([a, b], old, ["a.json", "b.json"])
    assert "speedup_vs_seed" not in out and "mfu" not in out and out["qlora_peak_gib"] == 7.1 and "cpu_cases" in out
    assert out["strongest_stock_arm"] == "stock_liger" and out["rounds"] == 2
    assert out["speedup_vs_strongest_stock"] == pytest.approx(2.0)
    assert out["speedup_vs_seed_as_written"] == pytest.approx(16.0)
    assert out["gpu_rounds"]["commit"] == "c" * 40 and [x["info"]["card"] for x in out["gpu_rounds"]["leases"]] == [
        "H100", "H200"]
    assert {r["lease"] for r in out["gpu_rounds"]["rows"]} == {0, 1} and out["rounds_cards"] == ["H100", "H200"]


@pytest.mark.parametrize("second, match", [
    (_lease({1: ROUND}, commit="d" * 40), "different"),
    (_lease({1: ROUND}, dirty=True), "clean"),
    (_lease({1: ROUND}, dirty=None), "clean"),
    (_lease({0: ROUND}), "more than one lease"),
])
def test_merge_rounds_refuses_what_is_not_one_run(second, match):
    with pytest.raises(ValueError, match=match):
        arms.merge_rounds([_lease({0: ROUND}), second], {}, ["a.json", "b.json"])


def test_merge_qlora_takes_a_clean_run_and_refuses_others():
    run = {"info": {"commit": "e" * 40, "dirty": False, "card": "H100"},
           "cases": {"qlora_lorad": {"peak_allocated_gib": 7.0, "tokens_per_second": 3300.0},
                     "qlora_stock": {"peak_allocated_gib": 32.0}, "qlora_lorad_noamp": {"error": "timed out"}}}
    out = arms.merge_qlora(run, {"qlora_peak_gib": 7.13, "cpu_cases": {}}, "gpu.json")
    assert out["qlora_peak_gib"] == 7.0 and set(out["qlora"]) == {"qlora_lorad", "qlora_stock"} and "cpu_cases" in out
    assert out["qlora_run"]["info"]["commit"] == "e" * 40
    with pytest.raises(ValueError, match="clean"):
        arms.merge_qlora({**run, "info": {"commit": "e" * 40}}, {}, "gpu.json")
    with pytest.raises(ValueError, match="qlora_lorad"):
        arms.merge_qlora({**run, "cases": {"qlora_stock": {}}}, {}, "gpu.json")
