"""Load in CI: wrk against POST /v1/chat/completions of a real ``lorad serve`` (tiny model) for a few seconds
while the champion is promoted back and forth; every request must succeed (the queue is longer than the
connections, so not even a 429 is expected). bench/reliability.py runs it longer and reports percentiles."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402


@pytest.mark.integration
def test_wrk_load_while_swapping_has_no_unintended_errors(tmp_path):
    assert shutil.which("wrk"), "wrk is missing: `make system-deps` installs Debian's wrk package"
    res = reliability.load_test(tmp_path, seconds=4, connections=4, swap_interval=0.3, log=print)
    assert res["requests"] > 0 and res["status_2xx"] == res["requests"], res
    assert res["unintended_errors"] == 0 and res["status_429"] == 0, res
    assert res["swaps_ok"] >= 1 and res["swaps_failed"] == 0, res
    assert res["server_alive_after"] is True
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p99"]
