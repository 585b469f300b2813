"""Idle cost of the daemon: CPU time `lorad run` uses while nothing happens; writes bench/results/idle_cpu.json.

Starts the real daemon (default model, fresh state folder sharing the prepared model cache), waits until
it serves, lets it settle, then reads its CPU time (user + system, the process and its threads, from
/proc/PID/stat) over a window with no requests and no files. Process CPU time is what the daemon itself
burns, so the number holds on a busy machine too (the load average is recorded anyway).

    .venv/bin/python bench/idle_cpu.py [--seconds 120] [--cache lorad-state/cache]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.01  # < 1 % of one core


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="idle window measured")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after ready before measuring")
    ap.add_argument("--cache", type=Path, default=ROOT / "lorad-state" / "cache",
                    help="a prepared model cache (lorad model prepare), copied into the temporary state")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "idle_cpu.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorad-idle-"))
    state = work / "state"
    state.mkdir()
    if args.cache.is_dir():
        shutil.copytree(args.cache, state / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--state", str(state), "--inbox",
                             str(work / "inbox"), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not become ready; see {work / 'daemon.log'}")
            time.sleep(0.5)
        time.sleep(args.settle)
        c0, t0, load0 = cpu_seconds(proc.pid), time.monotonic(), os.getloadavg()
        time.sleep(args.seconds)
        c1, t1, load1 = cpu_seconds(proc.pid), time.monotonic(), os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(60)
    share = (c1 - c0) / (t1 - t0)
    sys.path.insert(0, str(ROOT))
    from bench import _common

    git = _common.commit()
    result = {"benchmark": "idle_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_1m": [load0[0], load1[0]]},
              "git": {"commit": git or None, "dirty": _common.dirty()}, "window_seconds": round(t1 - t0, 1), "cpu_seconds": round(c1 - c0, 3),
              "cpu_share_of_one_core": round(share, 5), "target": f"< {TARGET:.0%} of a core", "met": share < TARGET,
              "note": "daemon with the default model loaded, scheduler and inbox watcher running, no traffic"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
