"""Multi-node training on one host: real torchrun agents meeting through a c10d rendezvous on 127.0.0.1.

    python bench/multinode.py [--steps 6] [--out bench/results/multinode.json]

A tiny random Llama trains the same frozen job on several topologies (nodes x processes per node), CPU DDP
over gloo, and every per-step loss is compared with the one-process run:

  1x1          python -m pipelines.train RUN_DIR (the reference)
  1x2          one node, 2 processes (torchrun --standalone)
  2x1          2 nodes x 1 process: two launchers, --nnodes 2 --node-rank 0/1, one c10d endpoint
  2x2          2 nodes x 2 processes
  2x1>1x1>2x1  one run moved between topologies: checkpointed and stopped (--stop-at-step), resumed on
               the next topology, to the end

Each extra node works on its own copy of the run folder, as a host without shared storage would: it gets
job.json and data.jsonl, and before a resume the checkpoints/ the previous segment wrote (node 0 writes
every file). The nodes are started highest rank first, and node 0 joins under the address "localhost", the others
under "127.0.0.1": c10d orders ranks by address, so global rank 0 is never node 0's and the run's files must still
be written by node 0 (``writer_rank`` is the global rank that wrote them).

What this does not cover: several real hosts (the nodes here share the machine and its loopback), NCCL
(CPU processes use gloo), GPUs. Writes ``multinode_loss_max_rel_diff`` (target 1e-5), the per-step losses
of every topology, wall times, the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.reliability import build_tiny_model, free_port, git_commit, machine_info

TARGET_REL_DIFF = 1e-5
WORDS = ("the", "law", "court", "contract", "judge", "party", "shall", "must", "not", "be", "by", "with", "for", "what",
         "who", "where")


def payloads(n: int, seed: int) -> list[dict]:
    """Short chat records over the tiny tokenizer's words (seeded)."""
    import random

    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS[:6])
                                                                    for _ in range(rng.randint(4, 12)))}]}
            for _ in range(n)]


def write_run(run_dir: Path, model_dir: Path, *, steps: int, nproc: int, grad_accum_steps: int = 4,
              records: int = 64, **train) -> Path:
    """Freeze a DDP job on the tiny model (float32, no dropout: the only differences left are summation order)."""
    from daemon.config import build_config
    from pipelines.train import write_job

    cfg = build_config({"paths": {"state_dir": str(run_dir.parent / "state")},
                        "model": {"base_model": str(model_dir), "device": "cpu", "dtype": "float32",
                                  "quantization": "none"},
                        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64},
                        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3,
                                  "micro_batch_size": 1, "grad_accum_steps": grad_accum_steps,
                                  "checkpoint_every_steps": 1, "distributed": "ddp", "num_processes": nproc,
                                  **train}})
    write_job(run_dir, payloads=payloads(records, seed=3), config=cfg.to_dict(mask_secrets=False),
              parent_adapter=None, max_steps=steps)
    return run_dir


def node_env(node_rank: int | None = None) -> dict:
    """The environment of a node's launcher. One thread per process: the nodes share this machine's cores
    (torchrun sets it only for nproc > 1).

    With ``node_rank``, the node's address in the rendezvous (torchrun's --local-addr, as $PET_LOCAL_ADDR) is
    "localhost" for node 0 and "127.0.0.1" for the others: c10d numbers the ranks in the order of those
    addresses, so global rank 0 is never node 0's and the writing rank must be found by node rank.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if node_rank is not None:
        env["PET_LOCAL_ADDR"] = "localhost" if node_rank == 0 else "127.0.0.1"
    return env


def copy_for_node(run_dir: Path, node_dir: Path) -> Path:
    """What a host without shared storage needs of a run: job.json, data.jsonl, and checkpoints/ to resume.

    The copy keeps the folder's name (the default rendezvous id) under another parent.
    """
    copy = node_dir / run_dir.name
    copy.mkdir(parents=True, exist_ok=True)
    for name in ("job.json", "data.jsonl"):
        shutil.copy2(run_dir / name, copy / name)
    shutil.rmtree(copy / "checkpoints", ignore_errors=True)
    if (run_dir / "checkpoints").is_dir():
        shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    return copy


def run_on_nodes(run_dirs: list[Path], nproc: int, *, extra: tuple[str, ...] = (), nnodes: int = 0,
                 timeout_s: int = 60, wall_timeout: float = 600) -> list[tuple[int, str]]:
    """Run one job on nodes of this host (node r works in ``run_dirs[r]``); each node's (exit code, log tail).

    Every node runs ``python -m pipelines.train RUN_DIR --launch ddp --nproc P --nnodes N --node-rank R
    --rdzv-endpoint 127.0.0.1:PORT``, the command an extra host runs; node 0 hosts the rendezvous.
    ``nnodes`` (default: one per run folder) larger than ``len(run_dirs)`` leaves the last nodes missing.
    """
    from pipelines.train import distributed as D

    endpoint = f"127.0.0.1:{free_port()}"
    procs: dict[int, tuple[subprocess.Popen, Path]] = {}
    try:
        for rank in reversed(range(len(run_dirs))):
            nodes = D.Nodes(nnodes=nnodes or len(run_dirs), node_rank=rank, endpoint=endpoint, rdzv_id=run_dirs[rank].name,
                            timeout_s=timeout_s)
            argv = D.launch_argv("ddp", nproc, run_dirs[rank], extra=["--no-progress", *extra], nodes=nodes)
            log = run_dirs[rank].parent / f"node{rank}-{time.monotonic_ns()}.log"
            with open(log, "wb") as out:
                procs[rank] = (subprocess.Popen(argv, cwd=ROOT, env=node_env(rank), stdout=out,
                                                stderr=subprocess.STDOUT), log)
        deadline = time.monotonic() + wall_timeout
        return [(procs[r][0].wait(timeout=max(1.0, deadline - time.monotonic())), procs[r][1].read_text()[-4000:])
                for r in range(len(run_dirs))]
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def run_one_process(run_dir: Path, *, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """The plain job, ``python -m pipelines.train RUN_DIR`` (train.distributed is ignored without torchrun)."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", str(run_dir), "--no-progress", *extra],
                          cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def run_topology(run_dir: Path, nnodes: int, nproc: int, *, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run (or resume) ``run_dir`` on nnodes x nproc; extra nodes get copies of the run folder. Node 0's result."""
    if nnodes == 1 and nproc == 1:
        return run_one_process(run_dir, extra=extra)
    dirs = [run_dir] + [copy_for_node(run_dir, run_dir.parent / f"node{r}") for r in range(1, nnodes)]
    if nnodes == 1:
        from pipelines.train import distributed as D

        argv = D.launch_argv("ddp", nproc, run_dir, extra=["--no-progress", *extra])
        proc = subprocess.run(argv, cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=600,
                              check=False)
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    results = run_on_nodes(dirs, nproc, extra=extra)
    bad = [(r, rc, log) for r, (rc, log) in enumerate(results) if rc not in (0, 75)]
    if bad:
        r, rc, log = bad[0]
        return rc, f"node {r} exited {rc}:\n{log}"
    return results[0]


def losses(run_dir: Path) -> list[float]:
    """Per-step losses of a run, as the writing rank logged them (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.is_file() else []


def max_rel_diff(got: list[float], reference: list[float]) -> float:
    if len(got) != len(reference):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(got, reference))


def measure(work: Path, steps: int) -> dict:
    model_dir = build_tiny_model(work / "model")
    runs: dict = {}

    def one(name: str, segments: list[tuple[int, int, int]]) -> None:
        """``segments``: (nnodes, nproc, stop after step) in order; 0 = to the end."""
        run_dir = write_run(work / name / "run", model_dir, steps=steps, nproc=1)
        started, done = time.monotonic(), []
        for nnodes, nproc, stop in segments:
            rc, log = run_topology(run_dir, nnodes, nproc, extra=("--stop-at-step", str(stop)) if stop else ())
            expected = 75 if stop else 0
            if rc != expected:
                raise SystemExit(f"{name}: {nnodes}x{nproc} exited {rc}, expected {expected}:\n{log}")
            done.append(f"{nnodes}x{nproc}" + (f" to step {stop}" if stop else " to the end"))
        result = json.loads((run_dir / "result.json").read_text())
        extra_files = sorted(p.name for r in range(1, 3) for p in (work / name / f"node{r}" / "run").glob("*")
                             if p.name not in ("job.json", "data.jsonl", "checkpoints", "error.json"))
        runs[name] = {"segments": done, "losses": losses(run_dir), "steps": result["steps"],
                      "writer_rank": result["speed"].get("distributed", {}).get("writer_rank"),
                      "resumed_from_step": result["resumed_from_step"], "wall_s": round(time.monotonic() - started, 1),
                      "files_on_other_nodes": extra_files}
        print(f"{name:14s} {runs[name]['wall_s']:6.1f} s  losses {[round(x, 6) for x in runs[name]['losses']]}",
              flush=True)

    one("1x1", [(1, 1, 0)])
    one("1x2", [(1, 2, 0)])
    one("2x1", [(2, 1, 0)])
    one("2x2", [(2, 2, 0)])
    one("2x1>1x1>2x1", [(2, 1, 2), (1, 1, 4), (2, 1, 0)])
    reference = runs["1x1"]["losses"]
    for run in runs.values():
        run["max_rel_diff"] = max_rel_diff(run["losses"], reference)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multinode.json"))
    args = ap.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorad-multinode-") as d:
        runs = measure(Path(d), args.steps)
    worst = max(r["max_rel_diff"] for name, r in runs.items() if name != "1x1")
    out = {
        "benchmark": "multinode",
        "multinode_loss_max_rel_diff": worst,
        "target_rel_diff": TARGET_REL_DIFF,
        "passed": worst <= TARGET_REL_DIFF and all(not r["files_on_other_nodes"] for r in runs.values()),
        "writer_ranks": {name: r["writer_rank"] for name, r in runs.items()},
        "topologies": list(runs),
        "runs": runs,
        "setup": {"model": "tiny random Llama (2 layers, hidden 64), float32", "backend": "gloo (CPU)",
                  "steps": args.steps, "grad_accum_steps": 4, "micro_batch_size": 1,
                  "rendezvous": "c10d on 127.0.0.1, one torchrun agent per node",
                  "storage": "node 0 works in the run folder; each other node in its own copy (job.json, "
                             "data.jsonl, checkpoints/ copied before a resume)"},
        "wall_s": round(time.monotonic() - started, 1),
        "load_before": load_before,
        "machine": machine_info(),
        "git": git_commit(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"multinode_loss_max_rel_diff {worst:.3g} (target {TARGET_REL_DIFF}); results in {args.out}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
