"""Training across nodes: torchrun's c10d rendezvous, node ranks, and real 2-node CPU runs on 127.0.0.1.

The 2-node runs start two real launchers (``python -m pipelines.train RUN_DIR --launch ddp --nnodes 2
--node-rank 0/1 --rdzv-endpoint 127.0.0.1:PORT``), each with its own torchrun agent, as two hosts would.
They share this machine's loopback and use gloo, not NCCL (docs/multi-machine.md says so).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import multinode as M
from daemon.config import ConfigError, build_config
from pipelines.train import distributed as D
from pipelines.train.protocol import DistributedError

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- pure


@pytest.mark.parametrize("kwargs, env, expected", [
    ({}, {}, None),                                                    # one node: --standalone, no rendezvous
    ({"nnodes": 2, "endpoint": "h:29400", "node_rank": 1}, {}, D.Nodes(2, 1, "h:29400", "run-7")),
    ({"nnodes": 2, "endpoint": "h:1"}, {"LORAD_NODE_RANK": "1"}, D.Nodes(2, 1, "h:1", "run-7")),
    ({"nnodes": 3, "endpoint": "h:1"}, {"SLURM_NODEID": "2"}, D.Nodes(3, 2, "h:1", "run-7")),   # under srun
    ({"nnodes": 2, "endpoint": "h:1"}, {"LORAD_NODE_RANK": "0", "SLURM_NODEID": "1"}, D.Nodes(2, 0, "h:1", "run-7")),
    ({"nnodes": 2, "endpoint": "h:1", "node_rank": 0, "rdzv_id": "job-9", "timeout_s": 30}, {"LORAD_NODE_RANK": "1"},
     D.Nodes(2, 0, "h:1", "job-9", 30)),                               # the command line wins over the environment
])
def test_resolve_nodes(kwargs, env, expected):
    assert D.resolve_nodes("run-7", environ=env, **kwargs) == expected


@pytest.mark.parametrize("kwargs, env, message", [
    ({"nnodes": 2, "node_rank": 0}, {}, "no rendezvous endpoint: set train.rdzv_endpoint"),
    ({"nnodes": 2, "endpoint": "h:1"}, {}, "needs this node's rank: pass --node-rank R or set $LORAD_NODE_RANK"),
    ({"nnodes": 2, "endpoint": "h:1", "node_rank": 2}, {}, "node rank must be in 0..1 for train.nnodes 2; got 2"),
    ({"nnodes": 2, "endpoint": "h:1"}, {"LORAD_NODE_RANK": "one"}, "$LORAD_NODE_RANK must be an integer"),
    ({"nnodes": 0}, {}, "train.nnodes must be >= 1"),
])
def test_resolve_nodes_refuses_with_the_fix(kwargs, env, message):
    with pytest.raises(DistributedError) as e:
        D.resolve_nodes("run", environ=env, **kwargs)
    assert message in str(e.value)


def test_node_zero_hosts_the_rendezvous_and_others_connect():
    def argv(rank):
        return D.torchrun_argv("ddp", 2, "/r", python="py", nodes=D.Nodes(2, rank, "10.0.0.1:29400", "run", 90))

    a = argv(0)
    assert "--standalone" not in a and a[a.index("--nnodes") + 1] == "2" and a[a.index("--rdzv-backend") + 1] == "c10d"
    assert a[a.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and a[a.index("--rdzv-id") + 1] == "run"
    assert a[a.index("--rdzv-conf") + 1] == "is_host=true,join_timeout=90,read_timeout=90"
    assert argv(1)[argv(1).index("--rdzv-conf") + 1].startswith("is_host=false,")
    assert a[a.index("-m", 3):] == ["-m", "pipelines.train", "/r", "--distributed", "ddp"]
    # one node keeps --standalone (a free port of its own)
    assert "--standalone" in D.torchrun_argv("ddp", 2, "/r", python="py")


def test_the_daemon_is_node_zero_of_a_multi_node_run():
    cfg = build_config({"train": {"distributed": "ddp", "num_processes": 4, "nnodes": 3,
                                  "rdzv_endpoint": "node0.example:29400", "rdzv_timeout_seconds": 120}}).train
    assert D.train_argv(cfg, "/state/runs/cycle-1", python="py", extra=["--no-progress"]) == [
        "py", "-m", "pipelines.train", "/state/runs/cycle-1", "--no-progress", "--launch", "ddp", "--nproc", "4",
        "--nnodes", "3", "--node-rank", "0", "--rdzv-endpoint", "node0.example:29400", "--rdzv-id", "cycle-1",
        "--rdzv-timeout", "120"]
    with pytest.raises(ValueError, match="needs train.distributed ddp or fsdp"):
        D.launch_argv("none", 1, "/r", nodes=D.Nodes(2, 0, "h:1", "r"))


def test_config_lists_every_multi_node_problem():
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"nnodes": 2}})
    assert "train.nnodes is 2 but train.distributed is 'none'" in str(e.value)
    assert "train.nnodes is 2 but train.rdzv_endpoint is empty" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"nnodes": 0, "rdzv_id": "a b", "rdzv_timeout_seconds": 5}})
    assert "train.nnodes: must be >= 1" in str(e.value) and "train.rdzv_id: must be 1-128 letters" in str(e.value)
    assert "train.rdzv_timeout_seconds: must be >= 10" in str(e.value)
    for bad in ("node0", "node0:", ":29400", "node0:99999", "no de:1"):
        with pytest.raises(ConfigError, match="train.rdzv_endpoint"):
            build_config({"train": {"distributed": "ddp", "nnodes": 2, "rdzv_endpoint": bad}})
    ok = build_config({"train": {"distributed": "fsdp", "nnodes": 2, "rdzv_endpoint": "[fd00::1]:29400"}})
    assert ok.train.nnodes == 2


@pytest.mark.parametrize("node_ranks, local_world, main", [
    ([0, 1], 1, 0), ([1, 0], 1, 1),                 # c10d put node 1's process first: node 0's writes
    ([1, 1, 0, 0], 2, 2), ([0, 0, 1, 1], 2, 0), ([2, 0, 1], 1, 1),
])
def test_the_writing_rank_is_node_zeros_first(node_ranks, local_world, main):
    assert D.main_rank_of(node_ranks, local_world) == main


@pytest.mark.parametrize("node_ranks, local_world", [([0, 0], 1), ([1, 2], 1), ([-1, -1], 1), ([0, 1, 1, 1], 2)])
def test_node_ranks_that_do_not_make_a_world_are_refused(node_ranks, local_world):
    with pytest.raises(DistributedError, match="each node needs its own rank"):
        D.main_rank_of(node_ranks, local_world)


def test_a_node_without_its_rank_fails_with_the_reason(tmp_path, tiny_llama_dir, monkeypatch):
    """The launcher reads train.nnodes and the endpoint from the run's job.json; the node rank must come from
    the command line or the environment (else two hosts could both claim node 0)."""
    from pipelines.train import main

    for name in ("LORAD_NODE_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    run_dir = M.write_run(tmp_path / "run", tiny_llama_dir, steps=2, nproc=1, nnodes=2,
                          rdzv_endpoint="127.0.0.1:29400")
    assert main([str(run_dir), "--launch", "ddp", "--nproc", "1", "--no-progress"]) == 1
    assert "needs this node's rank" in json.loads((run_dir / "error.json").read_text())["reason"]


def test_one_process_per_gpu_on_a_host_without_one_says_what_to_set(tmp_path, tiny_llama_dir):
    import torch

    from pipelines.train import main

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    run_dir = M.write_run(tmp_path / "run", tiny_llama_dir, steps=2, nproc=0)
    assert main([str(run_dir), "--launch", "ddp", "--nproc", "0", "--no-progress"]) == 1
    assert "set train.num_processes" in json.loads((run_dir / "error.json").read_text())["reason"]


# ----------------------------------------------------------------------------- real nodes on 127.0.0.1 (gloo)


def _ok(results: list[tuple[int, str]], node0: int) -> None:
    assert results[0][0] == node0, results[0][1]
    assert all(rc in (0, 75) for rc, _ in results), [log for _, log in results]


@pytest.mark.integration
def test_two_nodes_match_one_process_and_resume_across_topologies(tmp_path, tiny_llama_dir):
    """2 nodes x 1 process to step 2 (the daemon's command and `lorad train-node`, one shared folder), 1 process to
    step 4, then 2 nodes again where node 1 has only its own copy of the folder (no shared storage): every step's
    loss within 1e-5 of the 1-process run."""
    from pipelines import train as T

    steps = 5
    reference = T.run_job(M.write_run(tmp_path / "ref" / "run", tiny_llama_dir, steps=steps, nproc=1),
                          progress=False).history
    state = tmp_path / "state"   # the daemon's state folder, shared by both nodes (as over NFS)
    run_dir = M.write_run(state / "runs" / "cycle-1", tiny_llama_dir, steps=steps, nproc=1, nnodes=2,
                          rdzv_endpoint=f"127.0.0.1:{M.free_port()}", rdzv_timeout_seconds=60)

    # 2x1 as the daemon runs it: node 0 = the job runner's command, node 1 = `lorad train-node` following the runs
    # (node_env: node 1's process becomes c10d's global rank 0, node 0's the writer)
    agent = subprocess.Popen([sys.executable, "-m", "daemon.cli", "train-node", "--state", str(state), "--node-rank",
                              "1"], cwd=ROOT, env=M.node_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        cfg = build_config(json.loads((run_dir / "job.json").read_text())["config"])
        argv = D.train_argv(cfg.train, run_dir, extra=["--no-progress", "--stop-at-step", "2"])
        node0 = subprocess.run(argv, cwd=ROOT, env=M.node_env(0), capture_output=True, text=True, timeout=600,
                               check=False)
    finally:
        agent.send_signal(signal.SIGTERM)
        followed = agent.communicate(timeout=120)[0]
    assert node0.returncode == T.EXIT_INTERRUPTED, node0.stdout[-3000:] + node0.stderr[-3000:]
    assert '"event": "join", "run": "cycle-1", "node_rank": 1, "nnodes": 2' in followed, followed[-3000:]
    assert agent.returncode == 0 and not (run_dir / D.RENDEZVOUS_FILE).exists()
    assert M.losses(run_dir) == pytest.approx(reference[:2], rel=1e-5)
    assert len(M.losses(run_dir)) == 2, "exactly one rank (node 0's first) writes metrics"

    rc, log = M.run_one_process(run_dir, extra=("--stop-at-step", "4"))   # 2x1 -> 1x1
    assert rc == T.EXIT_INTERRUPTED, log
    assert M.losses(run_dir) == pytest.approx(reference[:4], rel=1e-5)

    # 1x1 -> 2x1 without shared storage: node 1's copy lacks the checkpoints, so the ranks would resume from
    # different steps; they agree first and refuse, saying what to copy
    node1 = M.copy_for_node(run_dir, tmp_path / "node1")
    shutil.rmtree(node1 / "checkpoints")
    results = M.run_on_nodes([run_dir, node1], 1)
    assert results[0][0] == 1
    reason = json.loads((run_dir / "error.json").read_text())["reason"]
    assert "ranks disagree (checkpoint_step ranges 0..4" in reason and "checkpoints/" in reason

    node1 = M.copy_for_node(run_dir, tmp_path / "node1")   # now with checkpoints/
    _ok(M.run_on_nodes([run_dir, node1], 1), node0=0)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == steps and result["resumed_from_step"] == 4
    assert result["speed"]["distributed"]["writer_rank"] == 1, "node 1's process was rank 0; node 0's wrote"
    assert M.losses(run_dir) == pytest.approx(reference, rel=1e-5)
    assert M.max_rel_diff(M.losses(run_dir), reference) <= M.TARGET_REL_DIFF
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # node 0 wrote every file; node 1's copy got none (its rank was not the writer)
    assert not {"adapter", "metrics.jsonl", "result.json"} & {p.name for p in node1.iterdir()}


@pytest.mark.integration
def test_a_node_that_never_joins_fails_the_run_with_the_reason(tmp_path, tiny_llama_dir):
    run_dir = M.write_run(tmp_path / "run", tiny_llama_dir, steps=2, nproc=1)
    results = M.run_on_nodes([run_dir], 1, nnodes=2, timeout_s=10, wall_timeout=120)
    assert results[0][0] == 1, results[0][1]
    reason = json.loads((run_dir / "error.json").read_text())["reason"]
    assert "not all 2 nodes joined rendezvous 'run'" in reason and "within 10 s" in reason
    assert not (run_dir / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- lorad train-node


def test_follow_joins_each_fresh_announcement_once(tmp_path):
    """`lorad train-node` runs this node's launcher for each announced attempt: not twice, not a stale one, not
    a run with fewer nodes than this node's rank."""
    import os
    import time

    runs = tmp_path / "runs"
    nodes = D.Nodes(2, 0, "127.0.0.1:29400", "fresh", 60)
    for name in ("fresh", "stale", "small"):
        (runs / name).mkdir(parents=True)
    D.announce(runs / "fresh", "ddp", 2, nodes)
    old = D.announce(runs / "stale", "ddp", 2, D.Nodes(2, 0, "127.0.0.1:29400", "stale", 60))
    os.utime(old, (time.time() - 120, time.time() - 120))   # node 0 died before closing it, 2 minutes ago
    D.announce(runs / "small", "ddp", 2, D.Nodes(1, 0, "127.0.0.1:29400", "small", 60))
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "python-stub"   # stands in for the launcher: records its argv
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    events = []
    deadline = time.monotonic() + 3   # the stub's run, then many more polls of the announcements left in place
    D.follow(runs, 1, python=str(stub), poll_seconds=0.01, should_stop=lambda: time.monotonic() > deadline,
             log=events.append)
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(argvs) == 1, argvs
    assert argvs[0] == ["-m", "pipelines.train", str(runs / "fresh"), "--no-progress", "--launch", "ddp", "--nproc",
                        "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id",
                        "fresh", "--rdzv-timeout", "60"]
    assert [e["event"] for e in events] == ["join", "left"] and events[1]["exit"] == 0


@pytest.mark.parametrize("args, message", [
    (["--node-rank", "0"], "node rank >= 1"),
    ([], "node rank >= 1"),
])
def test_train_node_needs_a_rank_other_than_the_daemons(tmp_path, monkeypatch, capsys, args, message):
    from daemon.cli import main

    monkeypatch.delenv("LORAD_NODE_RANK", raising=False)
    (tmp_path / "runs").mkdir()
    assert main(["train-node", "--state", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_train_node_needs_the_shared_state_folder(tmp_path, capsys):
    from daemon.cli import main

    assert main(["train-node", "--state", str(tmp_path / "not-mounted"), "--node-rank", "1"]) == 2
    assert "mount the daemon's state folder" in capsys.readouterr().err
