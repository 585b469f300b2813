"""Multi-process training: launch commands, config checks, and real 2-process DDP / FSDP2 runs on CPU (gloo).

The 2-process runs compare against a one-process run of the same job: a step covers the same
micro-batches whatever the world size, so the per-step losses and the final adapter must agree
(up to float summation order), including after a run checkpointed on 2 processes resumes on 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.multinode import payloads
from daemon.config import ConfigError, build_config
from pipelines.train import distributed as D
from pipelines.train.protocol import DistributedError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure


@pytest.mark.parametrize("accum, world, expected", [
    (4, 1, (4, 4)), (4, 2, (2, 4)), (4, 4, (1, 4)), (3, 2, (2, 4)), (1, 2, (1, 2)), (4, 8, (1, 8)), (8, 3, (3, 9)),
])
def test_plan_world_deals_a_steps_micro_batches_to_ranks(accum, world, expected):
    assert D.plan_world(accum, world) == expected


def test_plan_world_rejects_nonsense():
    with pytest.raises(ValueError, match="world_size"):
        D.plan_world(4, 0)


def test_launch_argv_plain_and_torchrun():
    assert D.launch_argv("none", 4, "/r", python="py", extra=["--no-progress"]) == \
        ["py", "-m", "pipelines.train", "/r", "--no-progress"]
    # the same job command plus --launch: the daemon's orphan check (cmdline names pipelines.train + the run) holds
    assert D.launch_argv("fsdp", 2, "/r", python="py", extra=["--no-progress"]) == \
        ["py", "-m", "pipelines.train", "/r", "--no-progress", "--launch", "fsdp", "--nproc", "2"]
    argv = D.torchrun_argv("fsdp", 2, "/r", python="py", extra=["--no-progress"])
    assert argv[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("-m", 3):] == ["-m", "pipelines.train", "/r", "--no-progress", "--distributed", "fsdp"]
    # 0 = one process per visible GPU, counted by torchrun (the daemon never imports torch for this)
    argv = D.torchrun_argv("ddp", 0, "/r", python="py")
    assert argv[argv.index("--nproc-per-node") + 1] == "gpu"


def test_train_argv_follows_the_config():
    cfg = build_config({"train": {"distributed": "ddp", "num_processes": 8}}).train
    assert D.train_argv(cfg, "/r", python="py", extra=["--no-progress"]) == \
        ["py", "-m", "pipelines.train", "/r", "--no-progress", "--launch", "ddp", "--nproc", "8"]
    assert D.train_argv(build_config({}).train, "/r", python="py") == ["py", "-m", "pipelines.train", "/r"]


@pytest.mark.parametrize("mode, n", [("x", 2), ("ddp", -1)])
def test_launch_argv_rejects_bad_values(mode, n):
    with pytest.raises(ValueError, match="train."):
        D.launch_argv(mode, n, "/r")


def test_config_lists_every_distributed_problem():
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"distributed": "deepspeed", "num_processes": -2}})
    text = str(e.value)
    assert "train.distributed: must be one of none, ddp, fsdp; got 'deepspeed'" in text
    assert "train.num_processes: must be >= 0" in text
    with pytest.raises(ConfigError, match="cannot shard 8-bit"):
        build_config({"train": {"distributed": "fsdp"}, "model": {"quantization": "8bit"}})
    ok = build_config({"train": {"distributed": "fsdp"}, "model": {"quantization": "4bit"}})
    assert ok.train.distributed == "fsdp"


def test_init_without_torchrun_is_one_process_and_refuses_a_mismatch():
    assert D.init("none", environ={}) is None
    assert D.init("ddp", environ={}) is None   # asked for ddp, started plainly: an ordinary one-device run
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 but train.distributed is 'none'"):
        D.init("none", environ={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(DistributedError, match="one of none, ddp, fsdp"):
        D.init("zero3", environ={})


def test_one_process_answers_everything_the_loop_asks_of_a_rank():
    """train() talks to OneProcess and Dist alike: both must offer the same interface."""
    def interface(obj):
        return {n for n in dir(obj) if not n.startswith("_")}

    one = D.OneProcess()
    rank = D.Dist(mode="ddp", rank=0, world_size=2, local_rank=0, device=_device("cpu"))
    assert interface(one) == interface(rank) - {"local_rank", "device"}   # the device comes from the model
    assert one.is_main and not one.sharded and one.can_retry and one.world_size == 1
    assert one.any(True, 0) == [True, False] and one.agree_min(7) == 7 and one.step_size(3) == 3
    assert one.share([[1], [2], [3]]) == [[1], [2], [3]] and one.step_totals("loss", 5, 99) == ("loss", 5)
    assert one.sum("loss") == "loss"
    assert one.speed_limits("auto", "auto") == ("auto", "auto") and one.describe(4) == {}


@pytest.mark.parametrize("mode, rank, world, accum, share, limits", [
    ("ddp", 0, 2, 3, [[0], [2]], ("auto", "auto")),      # 3 micro-batches on 2 ranks: the step grows to 4
    ("ddp", 1, 2, 4, [[1], [3]], ("auto", "auto")),
    ("fsdp", 2, 4, 4, [[2]], (False, "peft")),           # FSDP2: eager layers, PEFT's LoRA forward
])
def test_a_rank_takes_every_world_size_th_micro_batch(mode, rank, world, accum, share, limits):
    dist = D.Dist(mode=mode, rank=rank, world_size=world, local_rank=rank, device=_device("cpu"))
    steps = dist.step_size(accum)
    assert steps == D.plan_world(accum, world)[1]
    assert dist.share([[i] for i in range(steps)]) == share
    assert dist.speed_limits("auto", "auto") == limits and not dist.can_retry
    assert dist.describe(steps) == {"distributed": {"mode": mode, "world_size": world, "micro_batches_per_step": steps,
                                                    "writer_rank": 0}}


def test_peft_key_drops_the_adapter_name():
    assert D.peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_load_kwargs_per_mode():
    assert D.load_kwargs(None, device="auto", dtype="auto", quantization="none") == {"device": "auto", "dtype": "auto"}
    cpu = D.Dist(mode="fsdp", rank=0, world_size=2, local_rank=0, device=_device("cpu"))
    assert D.load_kwargs(cpu, device="auto", dtype="float32", quantization="none") == {"device": "cpu",
                                                                                      "dtype": "float32"}


def _device(kind: str):
    import torch

    return torch.device(kind)


# ----------------------------------------------------------------------------- real 2-process runs (gloo, CPU)


def _job(tmp_path: Path, name: str, model_dir: Path, steps: int, distributed: str = "none", **train) -> Path:
    from pipelines.train import write_job

    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "model": {"base_model": str(model_dir), "device": "cpu", "dtype": "float32",
                                  "quantization": "none"},
                        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64},
                        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3,
                                  "micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 1,
                                  "distributed": distributed, "num_processes": 2, **train}})
    run_dir = tmp_path / name
    write_job(run_dir, payloads=payloads(60, seed=3), config=cfg.to_dict(mask_secrets=False), parent_adapter=None,
              max_steps=steps)
    return run_dir


def _launch(run_dir: Path, mode: str, *extra: str) -> subprocess.CompletedProcess:
    argv = D.launch_argv(mode, 2, run_dir, extra=["--no-progress", *extra])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_on_one(tmp_path, tiny_llama_dir, mode):
    """2 ranks train 3 steps and checkpoint (--stop-at-step); 1 process finishes: same as 1 process throughout."""
    import torch
    from safetensors.torch import load_file

    from pipelines import train as T

    steps = 5
    reference = T.run_job(_job(tmp_path, "reference", tiny_llama_dir, steps), progress=False)

    run_dir = _job(tmp_path, mode, tiny_llama_dir, steps, distributed=mode)
    proc = _launch(run_dir, mode, "--stop-at-step", "3")
    assert proc.returncode == T.EXIT_INTERRUPTED, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = T.latest_checkpoint(run_dir)
    assert ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert _losses(run_dir) == pytest.approx(reference.history[:3], rel=1e-4), "2 ranks must compute the 1-rank loss"
    assert not (run_dir / "adapter").exists()

    resumed = T.run_job(run_dir, progress=False)   # the same run, now on one process
    assert resumed.resumed_from_step == 3 and resumed.steps == steps
    assert resumed.history == pytest.approx(reference.history, rel=1e-4)
    a = load_file(str(Path(reference.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- lorad train's launched path


def _stub_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for `python`: it gets `-m pipelines.train RUN_DIR ... --launch MODE --nproc N`."""
    script = tmp_path / "python-stub"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nfrom pathlib import Path\n"
                      f"argv = sys.argv[1:]\nrun_dir = Path(argv[2])\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_run_launched_replays_progress_and_reads_the_result(tmp_path):
    from pipelines.train import TrainOutcome

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    body = ("assert argv[:2] == ['-m', 'pipelines.train'] and argv[argv.index('--launch') + 1] == 'fsdp'\n"
            "with open(run_dir / 'metrics.jsonl', 'a') as f:\n"
            "    for s in (1, 2): f.write(json.dumps({'step': s, 'total_steps': 2, 'loss': 1.0 / s}) + '\\n')\n"
            "(run_dir / 'result.json').write_text(json.dumps({'adapter_dir': str(run_dir / 'adapter'), "
            "'status': 'completed', 'steps': 2, 'total_steps': 2, 'loss_first': 1.0, 'loss_last': 0.5, 'tokens': 10, "
            "'seconds': 1.0, 'tokens_per_second': 10.0, 'speed': {}}))\n")
    cfg = build_config({"train": {"distributed": "fsdp", "num_processes": 2}}).train
    seen = []
    out = D.run_launched(cfg, run_dir, python=_stub_python(tmp_path, body), progress=False,
                         on_step=seen.append, poll_seconds=0.05)
    assert isinstance(out, TrainOutcome) and out.steps == 2 and out.loss_last == 0.5
    assert [r["step"] for r in seen] == [1, 2]


@pytest.mark.parametrize("code, error, expected", [
    (75, None, "Interrupted"), (1, "CUDA out of memory on rank 1", "CUDA out of memory on rank 1"),
    (1, None, "exited with code 1"),
])
def test_run_launched_maps_exit_codes(tmp_path, code, error, expected):
    from pipelines.train import Interrupted, TrainingError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    body = (f"(run_dir / 'error.json').write_text(json.dumps({{'reason': {error!r}}}))\n" if error else "") + \
        f"sys.exit({code})"
    cfg = build_config({"train": {"distributed": "ddp", "num_processes": 2}}).train
    with pytest.raises(Interrupted if code == 75 else TrainingError, match=expected if code != 75 else "stopped"):
        D.run_launched(cfg, run_dir, python=_stub_python(tmp_path, body), progress=False, poll_seconds=0.05)
