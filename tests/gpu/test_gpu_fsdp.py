"""FSDP2 across two GPUs (torchrun, NCCL): two ranks compute the one-process loss."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gpu_common import GPU

pytestmark = GPU
ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, name: str, model_dir: Path, distributed: str) -> Path:
    from gpu_common import chat_payloads
    from daemon.config import build_config
    from pipelines.train import write_job

    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state")},
                        "model": {"base_model": str(model_dir), "device": "cuda", "dtype": "bfloat16",
                                  "quantization": "none"},
                        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64},
                        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3,
                                  "micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 100,
                                  "distributed": distributed, "num_processes": 2}})
    run_dir = tmp_path / name
    write_job(run_dir, payloads=chat_payloads(60, seed=3), config=cfg.to_dict(mask_secrets=False),
              parent_adapter=None, max_steps=4)
    return run_dir


def test_fsdp_on_two_gpus_matches_one_process(tmp_path, tiny_llama_dir):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"FSDP needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    from pipelines import train as T
    from pipelines.train import distributed as D

    reference = T.run_job(_job(tmp_path, "one", tiny_llama_dir, "none"), progress=False)
    run_dir = _job(tmp_path, "fsdp", tiny_llama_dir, "fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    proc = subprocess.run(D.launch_argv("fsdp", 2, run_dir, extra=["--no-progress"]), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(reference.history, rel=2e-2), "2 ranks must compute the 1-rank loss (bf16)"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
