"""Pure pieces of bench/reliability.py's crash harness: no daemon, no model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402


def test_stage_durations_learn_a_stage_the_table_did_not_list():
    """The job runner reports stages the table never named (drift_warm, after a promotion): they are learnt,
    not a KeyError that ends the benchmark."""
    durations = {"drift": 3.0, "train": 3.0}
    reliability.learn_stage_durations(durations, {"drift_warm": 10.0, "drift": 12.0, "train": 13.0})
    assert durations["drift_warm"] == 2.0          # first sighting 10.0, next stage 12.0
    assert durations["drift"] == 0.5 * 3.0 + 0.5 * 1.0
    assert durations["train"] == 3.0                # nothing seen after it yet: unchanged


def test_a_kill_counts_only_inside_the_cycles_work():
    busy = {"job": {"stage": "train"}, "inbox_pending": 0}
    assert reliability.classify_kill(busy, file_in_inbox=False) == "train"
    assert reliability.classify_kill({"job": {"stage": "drift_warm"}}, file_in_inbox=False) == "drift_warm"
    assert reliability.classify_kill({"job": None, "inbox_pending": 0}, file_in_inbox=True) == "ingest"
    assert reliability.classify_kill({"job": None, "inbox_pending": 1}, file_in_inbox=True) == "inbox_settle"
    assert reliability.classify_kill({"job": None, "inbox_pending": 0}, file_in_inbox=False) == "idle"
    assert reliability.classify_kill(None, file_in_inbox=True) == "unknown"
