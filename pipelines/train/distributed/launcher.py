"""Starting a job on several GPUs or hosts: the torchrun command lines, the node layout (rendezvous, node ranks),
running a launched job and replaying its metrics, and node 0's announcement that the other nodes follow."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.train.distributed.world import MODES, NODE_RANK_ENV, SAFE_COLLECTIVES_ENV
from pipelines.train.protocol import (EXIT_INTERRUPTED, INTERRUPTED_MARKER, DistributedError, Interrupted,
                                      TrainingError, TrainOutcome)

ROOT = Path(__file__).resolve().parents[3]   # lorad's source root: first on a job's PYTHONPATH
SLURM_NODE_RANK_ENV = "SLURM_NODEID"   # srun's node index: the node rank under Slurm


def job_env() -> dict[str, str]:
    """The environment a job process (``python -m daemon.cli ...``, ``python -m pipelines.train ...``) starts with:
    the caller's, with lorad's source root first on PYTHONPATH. Jobs run in the caller's working directory, so the
    relative paths of its config (``paths.state_dir``, ``paths.inbox``, a local ``model.base_model``) and of the
    run folders name what they name for the caller; PYTHONPATH lets ``-m`` find lorad from any directory."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + rest if rest else "")
    return env


@dataclass(frozen=True)
class Nodes:
    """This host's place in a run spanning several hosts (torchrun's c10d rendezvous)."""

    nnodes: int
    node_rank: int
    endpoint: str        # HOST:PORT of the rendezvous store, hosted by node 0
    rdzv_id: str         # the same on every node of one run
    timeout_s: int = 600

    def launcher_args(self) -> list[str]:
        """What ``python -m pipelines.train RUN_DIR --launch MODE`` needs to join this run."""
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.rdzv_id, "--rdzv-timeout", str(self.timeout_s)]

    def torchrun_args(self) -> list[str]:
        # Node 0 hosts the store (is_host), whatever its name resolves to; the others only connect, and wait
        # for it up to the timeout (read_timeout), so they may start first. No restarts: a failed rank fails
        # the run, which the daemon records and resumes from its checkpoint.
        conf = f"is_host={'true' if self.node_rank == 0 else 'false'},join_timeout={self.timeout_s}," \
               f"read_timeout={self.timeout_s}"
        return ["--nnodes", str(self.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.rdzv_id, "--rdzv-conf", conf, "--max-restarts", "0"]


def resolve_nodes(run_name: str, *, nnodes: int = 1, node_rank: int | None = None, endpoint: str = "",
                  rdzv_id: str = "", timeout_s: int = 600, environ: dict | None = None) -> Nodes | None:
    """This host's ``Nodes`` for a run (None: one node, torchrun --standalone).

    The node rank is ``node_rank`` if given, else ``$LORAD_NODE_RANK``, else ``$SLURM_NODEID`` (srun);
    an empty ``rdzv_id`` is the run's name, the same on every node that runs the same run folder.

    Raises:
        DistributedError: naming the value that is missing or out of range and what to set.
    """
    if nnodes < 1:
        raise DistributedError(f"train.nnodes must be >= 1; got {nnodes}")
    if nnodes == 1:
        return None
    env = os.environ if environ is None else environ
    if not endpoint:
        raise DistributedError(f"train.nnodes is {nnodes} but no rendezvous endpoint: set train.rdzv_endpoint "
                               f"(or --rdzv-endpoint) to HOST:PORT of node 0 as the other nodes reach it")
    if node_rank is None:
        for name in (NODE_RANK_ENV, SLURM_NODE_RANK_ENV):
            if env.get(name, "") != "":
                try:
                    node_rank = int(env[name])
                except ValueError:
                    raise DistributedError(f"${name} must be an integer node rank; got {env[name]!r}") from None
                break
        else:
            raise DistributedError(f"a run on {nnodes} nodes needs this node's rank: pass --node-rank R or set "
                                   f"${NODE_RANK_ENV} (0 is the node that hosts the rendezvous; under srun "
                                   f"${SLURM_NODE_RANK_ENV} is used)")
    if not 0 <= node_rank < nnodes:
        raise DistributedError(f"node rank must be in 0..{nnodes - 1} for train.nnodes {nnodes}; got {node_rank}")
    return Nodes(nnodes=nnodes, node_rank=node_rank, endpoint=endpoint, rdzv_id=rdzv_id or run_name,
                 timeout_s=timeout_s)


def launch_argv(mode: str, num_processes: int, run_dir: str | os.PathLike, *, python: str = sys.executable,
                extra: list[str] | tuple[str, ...] = (), nodes: Nodes | None = None) -> list[str]:
    """The command that runs (or resumes) the training job in ``run_dir``: always ``python -m pipelines.train``.

    ``mode`` "none" is the plain one-process job. "ddp" / "fsdp" add ``--launch``: that process
    runs ``torchrun_argv`` (see ``launch``) and exits like the plain job does: 0 done, 75
    checkpointed and stopped (resumable), 1 failed with ``error.json``. ``nodes``: this host's part
    of a run on several hosts (each host runs this command with its own node rank).
    """
    if mode not in MODES:
        raise ValueError(f"train.distributed must be one of {', '.join(MODES)}; got {mode!r}")
    if num_processes < 0:
        raise ValueError(f"train.num_processes must be >= 0 (0 = one per visible GPU); got {num_processes}")
    if nodes is not None and mode == "none":
        raise ValueError(f"a run on {nodes.nnodes} nodes needs train.distributed ddp or fsdp; got 'none'")
    job = [python, "-m", "pipelines.train", str(run_dir), *extra]
    if mode == "none":
        return job
    return [*job, "--launch", mode, "--nproc", str(num_processes), *(nodes.launcher_args() if nodes else [])]


def torchrun_argv(mode: str, num_processes: int, run_dir: str | os.PathLike, *, python: str = sys.executable,
                  extra: list[str] | tuple[str, ...] = (), nodes: Nodes | None = None) -> list[str]:
    """torchrun (``python -m torch.distributed.run``) starting this host's training processes.

    ``num_processes`` 0 = one per visible GPU (torchrun's "gpu"). One node: ``--standalone`` picks a
    free rendezvous port, so several hosts' jobs never collide. Several: the c10d rendezvous of
    ``nodes``. Each rank is told the mode.
    """
    nproc = str(num_processes) if num_processes else "gpu"
    where = ["--standalone", "--nnodes", "1"] if nodes is None else nodes.torchrun_args()
    return [python, "-m", "torch.distributed.run", *where, "--nproc-per-node", nproc,
            "-m", "pipelines.train", str(run_dir), *extra, "--distributed", mode]


def train_argv(train_cfg: Any, run_dir: str | os.PathLike, *, python: str = sys.executable,
               extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``launch_argv`` from a ``TrainConfig`` (what the daemon's job runner and ``lorad train`` run).

    The daemon's host is node 0 of a run on several hosts: it hosts the rendezvous.
    """
    nodes = resolve_nodes(Path(run_dir).name, nnodes=train_cfg.nnodes, node_rank=0, endpoint=train_cfg.rdzv_endpoint,
                          rdzv_id=train_cfg.rdzv_id, timeout_s=train_cfg.rdzv_timeout_seconds)
    return launch_argv(train_cfg.distributed, train_cfg.num_processes, run_dir, python=python, extra=extra,
                       nodes=nodes)


# ----------------------------------------------------------------------------- running a launched job


def run_launched(train_cfg: Any, run_dir: Path, *, python: str = sys.executable, progress: bool = True,
                 on_step: Callable[[dict], None] | None = None, poll_seconds: float = 1.0) -> Any:
    """Run the job in ``run_dir`` under torchrun and wait: the ``lorad train`` path for several GPUs.

    Progress is read from ``metrics.jsonl`` (written by rank 0) and passed to ``on_step``.

    Returns:
        the TrainOutcome from ``result.json``.
    Raises:
        TrainingError: the job failed (its error.json reason, or the exit code and log tail).
        Interrupted: the job checkpointed and stopped (exit 75).
    """
    run_dir = Path(run_dir)
    argv = train_argv(train_cfg, run_dir, python=python, extra=[] if progress else ["--no-progress"])
    seen = 0
    with open(run_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(argv, env=job_env(), stdout=log, stderr=None if progress else log)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_seconds)
                except subprocess.TimeoutExpired:
                    pass
                seen = _replay_metrics(run_dir, seen, on_step)
                if proc.returncode is not None:
                    break
        except BaseException:
            proc.terminate()   # torchrun forwards it; the ranks checkpoint and stop
            proc.wait()
            raise
    if proc.returncode == EXIT_INTERRUPTED:
        raise Interrupted(f"training under torchrun stopped and checkpointed ({run_dir})")
    if proc.returncode != 0:
        err = run_dir / "error.json"
        if err.is_file():
            raise TrainingError(json.loads(err.read_text())["reason"])
        raise TrainingError(f"torchrun exited with code {proc.returncode}; see {run_dir / 'train.log'}")
    result = json.loads((run_dir / "result.json").read_text())
    return TrainOutcome(**{k: v for k, v in result.items() if k in TrainOutcome.__dataclass_fields__})


def _replay_metrics(run_dir: Path, seen: int, on_step: Callable[[dict], None] | None) -> int:
    path = run_dir / "metrics.jsonl"
    if on_step is None or not path.is_file():
        return seen
    lines = path.read_text().split("\n")[:-1]   # complete lines only; a half-written last line waits
    for line in lines[seen:]:
        with contextlib.suppress(ValueError):
            on_step(json.loads(line))
    return len(lines)


# ----------------------------------------------------------------------------- the launcher


def die_with_parent() -> None:
    """preexec_fn: Linux sends this child SIGTERM when its parent dies, even by SIGKILL (torchrun then stops its
    ranks, no orphans holding GPUs; a daemon's training job checkpoints and exits, so a restarted daemon resumes the
    run instead of racing an orphan on the same run folder). Elsewhere nothing: recover_runs stops orphans later."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


RENDEZVOUS_FILE = "rendezvous.json"   # node 0's announcement of a run the other nodes join (``follow``)


def announce(run_dir: Path, mode: str, nproc: int, nodes: Nodes) -> Path:
    """Node 0: write ``RUN_DIR/rendezvous.json``, what ``follow`` on the other nodes needs to join this attempt."""
    import secrets

    info = {"mode": mode, "nproc": nproc, "nnodes": nodes.nnodes, "endpoint": nodes.endpoint,
            "rdzv_id": nodes.rdzv_id, "timeout_s": nodes.timeout_s, "attempt": secrets.token_hex(8)}
    path = Path(run_dir) / RENDEZVOUS_FILE
    tmp = path.with_name(f".{RENDEZVOUS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
    return path


def close_announcement(run_dir: Path) -> None:
    """The world is formed (called by the writing rank after joining): a node that comes later must not join."""
    (Path(run_dir) / RENDEZVOUS_FILE).unlink(missing_ok=True)


def follow(runs_dir: Path, node_rank: int, *, python: str = sys.executable, poll_seconds: float = 2.0,
           should_stop: Callable[[], bool] = lambda: False, log: Callable[[dict], None] = print) -> None:
    """``lorad train-node``: on a host other than the daemon's, join every multi-node run node 0 announces.

    Watches ``runs_dir/*/rendezvous.json`` (the daemon's runs folder on shared storage) and runs this node's
    launcher for each new attempt, one at a time, with its output in ``RUN_DIR/train-node<R>.log``. An
    announcement older than its rendezvous timeout is stale (node 0 died before closing it) and skipped.
    Once ``should_stop`` answers true, a running launcher gets SIGTERM (every rank checkpoints and the run
    stops, resumable) and this returns.
    """
    import signal
    import time

    joined: set[str] = set()
    while not should_stop():
        for path in sorted(Path(runs_dir).glob(f"*/{RENDEZVOUS_FILE}")):
            if should_stop():
                break
            try:
                info, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
                nodes = Nodes(nnodes=int(info["nnodes"]), node_rank=node_rank, endpoint=str(info["endpoint"]),
                              rdzv_id=str(info["rdzv_id"]), timeout_s=int(info["timeout_s"]))
                attempt, mode, nproc = str(info["attempt"]), str(info["mode"]), int(info["nproc"])
            except (OSError, ValueError, KeyError, TypeError):
                continue   # being replaced, closed, or not an announcement: look again next time
            if attempt in joined or age > nodes.timeout_s or node_rank >= nodes.nnodes:
                continue
            joined.add(attempt)
            argv = launch_argv(mode, nproc, path.parent, python=python, extra=["--no-progress"], nodes=nodes)
            log({"event": "join", "run": path.parent.name, "node_rank": node_rank, "nnodes": nodes.nnodes})
            with open(path.parent / f"train-node{node_rank}.log", "ab") as out:
                proc = subprocess.Popen(argv, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
                while proc.poll() is None:
                    if should_stop():
                        proc.send_signal(signal.SIGTERM)   # the launcher passes it on once; the ranks checkpoint
                        proc.wait()
                        break
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=poll_seconds)
            log({"event": "left", "run": path.parent.name, "node_rank": node_rank, "exit": proc.returncode})
        if not should_stop():
            time.sleep(poll_seconds)


def launch(run_dir: Path, mode: str, nproc: int, rank_args: list[str], nodes: Nodes | None = None) -> int:
    """Run the job under torchrun and return the plain job's exit code (``python -m pipelines.train --launch``).

    torchrun reports any non-zero rank as a failure, so a clean stop is signalled by the writing
    rank's marker file rather than an exit code. SIGTERM and SIGINT are passed to torchrun once; it
    forwards them to the ranks, which checkpoint at the next step and stop. ``nodes``: this host's
    part of a run on several hosts; every host runs this with its own node rank.
    """
    import signal

    run_dir = Path(run_dir)
    marker, error = run_dir / INTERRUPTED_MARKER, run_dir / "error.json"
    if nodes is None or nodes.node_rank == 0:   # other nodes may start late, after node 0 wrote a fresh reason
        marker.unlink(missing_ok=True)
        error.unlink(missing_ok=True)   # a reason left by an earlier attempt must not describe this one
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in SAFE_COLLECTIVES_ENV.items()}}
    env[NODE_RANK_ENV] = str(nodes.node_rank if nodes else 0)
    if nproc == 0 and not _has_gpu():
        error.write_text(json.dumps({"reason": "train.num_processes 0 means one process per GPU, and this host has "
                                               "none: set train.num_processes (CPU processes, gloo)"}))
        return 1
    announced = announce(run_dir, mode, nproc, nodes) if nodes is not None and nodes.node_rank == 0 else None
    proc = subprocess.Popen(torchrun_argv(mode, nproc, run_dir, python=sys.executable, extra=rank_args, nodes=nodes),
                            env=env, start_new_session=True, preexec_fn=die_with_parent)
    forwarded = []

    def forward(signum, _frame):
        if not forwarded and proc.poll() is None:
            forwarded.append(signum)
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    if announced is not None:
        announced.unlink(missing_ok=True)   # the ranks never formed a world (or one exited early)
    if marker.is_file():
        return EXIT_INTERRUPTED
    if rc != 0 and not error.is_file():
        why = "a rank crashed or was killed"
        if nodes is not None:
            why += (f", or not all {nodes.nnodes} nodes joined rendezvous {nodes.rdzv_id!r} at {nodes.endpoint} "
                    f"within {nodes.timeout_s} s")
        log = run_dir / ("train.log" if nodes is None or nodes.node_rank == 0 else f"train-node{nodes.node_rank}.log")
        error.write_text(json.dumps({"reason": f"torchrun exited with code {rc} ({why}); see {log}"}))
    return 0 if rc == 0 else 1


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
