"""Issue 28, decompression bomb: a ~500-byte Parquet file of 1,024 rows of one 2 MB string.

Read naively it decodes into 2 GB of Python strings; lorad must reject its rows with a reason
each, and the ingesting process must grow by less than 1 GiB. The ingest runs in a subprocess so
that this test's memory figures are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

INGEST_AND_MEASURE = r"""
import json, sys
from pathlib import Path
import numpy, pyarrow, pyarrow.parquet  # loaded before the baseline: they are not the bomb's cost
from daemon.config import DataConfig, IngestConfig
from daemon.store import open_store
from pipelines.ingest import ingest_file

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

path, state, report = sys.argv[1:4]
store = open_store(state)
before = kib("VmRSS")
r = ingest_file(path, store, DataConfig(), report_path=report, limits=IngestConfig())
print(json.dumps({"growth_mib": (kib("VmHWM") - before) / 1024, "rejected": r.rejected,
                  "records_total": r.records_total, "accepted": r.accepted, "file_error": r.file_error}))
"""


def write_bomb(path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # One dictionary entry referenced by every row: built without 2 GB in this process. store_schema=False:
    # the reader sees a plain string column, as a bomb made by any other Parquet writer would look.
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 1024, pa.int32()), pa.array(["a" * 2_000_000]))
    pq.write_table(pa.table({"text": column}), path, compression="zstd", store_schema=False)


def test_a_parquet_bomb_is_rejected_with_reasons_and_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.parquet"
    write_bomb(bomb)
    assert bomb.stat().st_size < 2000, "the attack file is tiny on disk"
    report = tmp_path / "bomb.rejects.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INGEST_AND_MEASURE, str(bomb), str(tmp_path / "state"), str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["growth_mib"] < 1024, f"ingesting the bomb grew the process by {out['growth_mib']:.0f} MiB"
    assert out["records_total"] == 1024 and out["rejected"] == 1024 and out["accepted"] == 0
    reasons = [json.loads(line)["reason"] for line in report.read_text().splitlines()]
    assert len(reasons) == 1024, "every row's rejection is in the report"
    assert all("ingest.max_cell_bytes" in r and "2000000 bytes" in r for r in reasons), reasons[:3]
