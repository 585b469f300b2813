"""Checkpoints: adapter + optimizer moments + RNG + data position, as safetensors and JSON, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.files import atomic_dir
from pipelines.train.distributed import load_sharded_lora, shard_like
from pipelines.train.protocol import TrainingError

CHECKPOINTS = "checkpoints"


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, state: dict, keep: int = 2, dist: Any = None) -> Path:
    """adapter + optimizer moments + RNG + data position, as safetensors and JSON, written atomically.

    Always the full (unsharded) one-process layout, so any number of GPUs can resume it. With
    ``dist``, every rank must call this (FSDP gathers shards); rank 0 writes.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def host(v):   # a DTensor shard (FSDP) gathered whole; collective, so every rank runs it
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu").contiguous()

    lora = {k: host(v) for k, v in get_peft_model_state_dict(model).items()}
    opt_tensors, opt_meta = {}, {"param_groups": [], "steps": {}}
    sd = optimizer.state_dict()
    for g in sd["param_groups"]:
        opt_meta["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"params": g["params"]})
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                opt_tensors[f"{pid}.{name}"] = host(value)
            else:
                opt_meta["steps"][f"{pid}.{name}"] = float(value)

    def write(tmp: Path) -> None:
        save_file(lora, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))

    ckpt_root = run_dir / CHECKPOINTS
    final = ckpt_root / f"step-{state['step']:07d}"
    if dist is None or dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        atomic_dir(final, write)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones never carry the step-* name)."""
    done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, sharded: bool = False) -> dict:
    """Restore a checkpoint (any world size wrote it); ``sharded``: the model is under FSDP2, load shards."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        if sharded:
            load_sharded_lora(model, load_file(str(ckpt / "adapter.safetensors")))
        else:
            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as e:  # a damaged checkpoint is refused with a reason, never half-loaded silently
        raise TrainingError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); delete it to restart "
                            f"from the previous one") from e
    meta = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    for key, value in meta["steps"].items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = torch.tensor(value)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, st in per_param.items():
        for k, v in st.items():
            if sharded and v.dim() > 0:
                st[k] = shard_like(v, ordered[pid])
            else:
                st[k] = v.to(device) if v.dim() > 0 else v
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state


def save_adapter(adapter_dir: Path, model: Any, state_dict: dict | None = None) -> None:
    """The trained adapter as a standard PEFT folder, written atomically; ``state_dict``: FSDP's gathered weights."""
    atomic_dir(adapter_dir, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True,
                                                               **({"state_dict": state_dict} if state_dict is not None
                                                                  else {})))
