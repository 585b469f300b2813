"""One incremental LoRA/QLoRA run: a frozen dataset in, a candidate adapter folder out.

Read it top to bottom like nanoGPT's train.py:
  1. wrap the base model with LoRA; warm-start from the parent (champion) adapter's weights,
     with a FRESH optimizer and LR schedule sized to this run's data (not the trainer "resume",
     which would replay old optimizer state tuned to old data);
  2. pack the tokenized examples into sequences (position ids restart per example, so no example
     attends to another) and cut them into micro-batches in a seeded order;
  3. loop: forward (loss computed in chunks, so the [tokens x vocab] logits never exist at once),
     backward, clip, step; every N steps write a checkpoint (adapter + optimizer + RNG + data
     position) atomically, so ``kill -9`` at any instant resumes exactly;
  4. write the adapter as a standard PEFT folder (adapter_model.safetensors + adapter_config.json).

Safety for unattended runs: non-finite loss aborts; a wall-clock budget stops cleanly; CUDA OOM
splits micro-batches smaller and turns on gradient checkpointing before giving up with a reason.
Nothing here is pickled: checkpoints are safetensors + JSON.

The job form (``python -m pipelines.train RUN_DIR``) reads ``RUN_DIR/job.json`` and is what the
daemon's job runner supervises in a subprocess; running it again on the same folder resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon.config import TrainConfig

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
IGNORE = -100


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why (recorded as the run's failure reason)."""


class Interrupted(RuntimeError):
    """The run was asked to stop; its latest state is checkpointed and it resumes from there."""


EXIT_INTERRUPTED = 75  # what `python -m pipelines.train` exits with after a checkpointed stop (EX_TEMPFAIL)


@dataclass
class TrainOutcome:
    """What a finished run reports (also written to ``RUN_DIR/result.json``)."""

    adapter_dir: str
    status: str                      # "completed" | "budget" (wall-clock budget spent, adapter still written)
    steps: int
    total_steps: int
    loss_first: float | None
    loss_last: float | None
    tokens: int                      # real (non-padding) tokens processed, this process and before a resume
    seconds: float
    tokens_per_second: float
    resumed_from_step: int = 0
    micro_batch_splits: int = 1      # >1 after an out-of-memory retry
    gradient_checkpointing: bool = False
    examples: int = 0
    sequences: int = 0
    parent_adapter: str | None = None
    history: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


# ----------------------------------------------------------------------------- data


def make_sequences(examples: list[dict], max_seq_len: int, packing: bool) -> list[dict]:
    """Turn tokenized examples into training sequences with input_ids, labels and position_ids."""
    from pipelines.data import pack

    if packing:
        seqs = [{"input_ids": list(p["input_ids"]), "labels": list(p["labels"]), "position_ids": list(p["position_ids"])}
                for p in pack(examples, max_seq_len)]
    else:
        seqs = [{"input_ids": ex["input_ids"][:max_seq_len], "labels": list(ex["labels"][:max_seq_len]),
                 "position_ids": list(range(min(len(ex["input_ids"]), max_seq_len)))} for ex in examples]
    # The first token of every example is never a target: in a pack, it would be "predicted" from the end of
    # the previous example, a cross-example signal that packing must not create.
    for s in seqs:
        for t, p in enumerate(s["position_ids"]):
            if p == 0:
                s["labels"][t] = IGNORE
    return seqs


def make_batches(sequences: list[dict], micro_batch_size: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]["input_ids"]), i))
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def collate(sequences: list[dict], idx: list[int], pad_id: int, device: Any):
    """Pad a micro-batch; pads get label -100 and their own position run (a separate 'packed' segment)."""
    import torch

    rows = [sequences[i] for i in idx]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"])
        labels[j, :n] = torch.tensor(r["labels"])
        pos[j, :n] = torch.tensor(r["position_ids"])
        pos[j, n:] = torch.arange(width - n)
        real += n
    return ids.to(device), labels.to(device), pos.to(device), real


# ----------------------------------------------------------------------------- model pieces


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak. Stateless, so resuming needs no scheduler state."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def attach_lora(model: Any, cfg: TrainConfig, parent_adapter: Path | None, *, gradient_checkpointing: bool) -> Any:
    """Wrap the base model with a LoRA adapter; copy the parent adapter's weights when given."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from pipelines.models import lora_config

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # Keeps the quantized weights frozen and makes inputs require grads; we do not want its fp32 upcast of
        # every non-quantized weight (it costs GBs on large vocabularies), hence use_gradient_checkpointing only.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    if parent_adapter is not None:
        parent_cfg = json.loads((Path(parent_adapter) / "adapter_config.json").read_text())

        def shape(c: dict) -> tuple:
            # target_parameters matters for MoE models (DeepSeek), where dense MLPs are targeted by parameter.
            return (c.get("r"), sorted(c.get("target_modules") or []), sorted(c.get("target_parameters") or []))

        want = shape({"r": lcfg.r, "target_modules": list(lcfg.target_modules or []),
                      "target_parameters": list(getattr(lcfg, "target_parameters", None) or [])})
        if shape(parent_cfg) != want:
            raise TrainingError(
                f"cannot warm-start from {parent_adapter}: its LoRA shape (r, modules, parameters) is "
                f"{shape(parent_cfg)}, this run wants {want}; start from scratch with --parent none or keep the "
                f"LoRA shape")
    model = get_peft_model(model, lcfg)
    if parent_adapter is not None:
        state = load_file(str(Path(parent_adapter) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) or []]
        if missing:
            raise TrainingError(f"parent adapter {parent_adapter} has weights this model lacks: {missing[:3]}...")
    return model


def chunked_loss_sum(model: Any, ids, labels, pos, *, chunk_tokens: int = 2048):
    """Sum of next-token cross-entropy over labelled tokens, without materialising all logits at once.

    The decoder runs once; the LM head + cross-entropy run per chunk of positions under activation
    checkpointing, so peak memory holds one chunk's logits instead of [batch x seq x vocab] twice.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    # attention_mask=None + position_ids => transformers builds a block-diagonal (packed) causal mask.
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE
    hidden, target = hidden[keep], target[keep]

    def piece(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.numel(), chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], target[start:start + chunk_tokens]
        total = total + (checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return total


# ----------------------------------------------------------------------------- checkpoints


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, state: dict, keep: int = 2) -> Path:
    """adapter + optimizer moments + RNG + data position, as safetensors and JSON, written atomically."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        lora = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(lora, str(tmp / "adapter.safetensors"))
        opt_tensors, opt_meta = {}, {"param_groups": [], "steps": {}}
        sd = optimizer.state_dict()
        for g in sd["param_groups"]:
            opt_meta["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"params": g["params"]})
        for pid, st in sd["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    opt_tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
                else:
                    opt_meta["steps"][f"{pid}.{name}"] = float(value)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))

    ckpt_root = run_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{state['step']:07d}"
    _atomic_dir(final, write)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones never carry the step-* name)."""
    done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
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
    for st in per_param.values():
        for k, v in st.items():
            st[k] = v.to(device) if v.dim() > 0 else v
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state


# ----------------------------------------------------------------------------- the run


def train(examples: list[dict], *, run_dir: Path, model: Any, tokenizer: Any, cfg: TrainConfig,
          max_seq_len: int, packing: bool = True, parent_adapter: Path | None = None,
          max_steps: int | None = None, progress: bool = True, clock: Callable[[], float] = time.monotonic,
          on_step: Callable[[dict], None] | None = None, chunk_tokens: int = 2048,
          should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
    """Train a LoRA adapter on tokenized ``examples`` and write it to ``run_dir/adapter``.

    Resumes from ``run_dir/checkpoints`` when present (same data and config assumed; the job
    spec in run_dir guarantees that in the daemon).

    Raises:
        TrainingError: non-finite loss, out of memory at the smallest split, bad parent adapter, no data.
    """
    import torch

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise TrainingError("no training examples (every record was empty or too long?)")
    torch.manual_seed(cfg.seed)

    # -- data: fixed sequences and micro-batches; the order per epoch comes from a seeded permutation
    sequences = make_sequences(examples, max_seq_len, packing)
    batches = make_batches(sequences, cfg.micro_batch_size)
    accum = cfg.grad_accum_steps
    n_labels = [sum(1 for lab in s["labels"][1:] if lab != IGNORE) for s in sequences]
    steps_per_epoch = max(1, len(batches) // accum)
    total_steps = max_steps or cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))

    def micro_batch(k: int) -> list[int]:
        epoch, i = divmod(k, len(batches))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        return batches[int(torch.randperm(len(batches), generator=g)[i])]

    # -- model: LoRA on the base, warm-started from the parent; fresh optimizer over the LoRA weights only
    splits, use_gc = 1, cfg.gradient_checkpointing
    model = attach_lora(model, cfg, parent_adapter, gradient_checkpointing=use_gc)
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    step, tokens_before, history, resumed_from = 0, 0, [], 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        step, tokens_before, history = state["step"], state["tokens"], state["history"]
        splits, resumed_from = state.get("splits", 1), step
        if state.get("total_steps") != total_steps or state.get("sequences") != len(sequences):
            raise TrainingError(f"checkpoint {ckpt} belongs to a different run (steps {state.get('total_steps')} vs "
                                f"{total_steps}, sequences {state.get('sequences')} vs {len(sequences)})")

    def run_micro(idx: list[int], denom: float) -> tuple[float, int]:
        """Forward + backward of one micro-batch, in `splits` pieces; returns (loss sum, real tokens)."""
        loss_total, real_total = 0.0, 0
        piece = math.ceil(len(idx) / splits)
        for s in range(0, len(idx), piece):
            ids, labels, pos, real = collate(sequences, idx[s:s + piece], pad_id, device)
            loss_sum = chunked_loss_sum(model, ids, labels, pos, chunk_tokens=chunk_tokens)
            (loss_sum / denom).backward()
            loss_total += float(loss_sum.detach())
            real_total += real
        return loss_total, real_total

    metrics_path = run_dir / METRICS
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: the bar shows on a terminal and stays out of logs and pipes.
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr, disable=None)
    t_start, tokens_now, status = clock(), 0, "completed"
    def checkpoint_state() -> dict:
        return {"step": step, "tokens": tokens_before + tokens_now, "history": history, "splits": splits,
                "total_steps": total_steps, "sequences": len(sequences)}

    while step < total_steps:
        if clock() - t_start > cfg.max_wall_seconds:
            status = "budget"
            break
        if should_stop is not None and should_stop():
            if step > resumed_from and step % cfg.checkpoint_every_steps != 0:
                save_checkpoint(run_dir, model, optimizer, checkpoint_state())
            raise Interrupted(f"stopped on request at step {step}/{total_steps}; checkpointed")
        group = [micro_batch(step * accum + a) for a in range(accum)]
        # Normalise by the labelled tokens of the whole accumulation group: every token weighs the same,
        # however the group is split into micro-batches.
        denom = max(1.0, float(sum(n_labels[i] for g in group for i in g)))
        lr = lr_at(step, total_steps, cfg.learning_rate, cfg.warmup_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        while True:
            try:
                optimizer.zero_grad(set_to_none=True)
                loss_sum, real = 0.0, 0
                for idx in group:
                    ls, r = run_micro(idx, denom)
                    loss_sum, real = loss_sum + ls, real + r
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if splits < cfg.micro_batch_size:
                    splits *= 2
                elif not use_gc:
                    use_gc = True
                    model.get_base_model().gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                    model.enable_input_require_grads()
                else:
                    raise TrainingError(f"out of GPU memory at step {step} even with micro-batches of "
                                        f"1 sequence and gradient checkpointing; lower data.max_seq_len") from None
                print(f"lorad: out of memory; retrying step {step} with {splits} splits, "
                      f"gradient checkpointing {'on' if use_gc else 'off'}", file=sys.stderr)
        loss = loss_sum / denom
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step}: aborting (lower train.learning_rate or check data)")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        step += 1
        tokens_now += real
        elapsed = clock() - t_start
        record = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_before + tokens_now,
                  "tokens_per_second": tokens_now / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed}
        history.append(round(loss, 6))
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
        if on_step is not None:
            on_step(record)
        if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
            save_checkpoint(run_dir, model, optimizer, checkpoint_state())
    if bar is not None:
        bar.close()
    if status == "budget" and step > resumed_from and step % cfg.checkpoint_every_steps != 0:
        save_checkpoint(run_dir, model, optimizer, checkpoint_state())

    adapter_dir = run_dir / ADAPTER_DIRNAME
    _atomic_dir(adapter_dir, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    seconds = clock() - t_start
    outcome = TrainOutcome(
        adapter_dir=str(adapter_dir), status=status, steps=step, total_steps=total_steps,
        loss_first=history[0] if history else None, loss_last=history[-1] if history else None,
        tokens=tokens_before + tokens_now, seconds=seconds,
        tokens_per_second=tokens_now / seconds if seconds > 0 else 0.0, resumed_from_step=resumed_from,
        micro_batch_splits=splits, gradient_checkpointing=use_gc, examples=len(examples),
        sequences=len(sequences), parent_adapter=str(parent_adapter) if parent_adapter else None, history=history)
    (run_dir / "result.json").write_text(json.dumps(outcome.to_dict(), indent=2))
    return outcome


# ----------------------------------------------------------------------------- the job form


def tokenize_payloads(payloads: Iterable[dict], tokenizer: Any, max_seq_len: int) -> list[dict]:
    """Chat-template and label each record (completion-only for chat, all tokens for text)."""
    from pipelines.data import tokenize_record

    out = []
    for p in payloads:
        ex = tokenize_record(p, tokenizer, max_seq_len)
        if ex is not None and any(lab != IGNORE for lab in ex["labels"]):
            out.append(ex)
    return out


def write_job(run_dir: Path, *, payloads: Iterable[dict], config: dict, parent_adapter: str | None,
              max_steps: int | None = None) -> Path:
    """Freeze a run: its data (JSONL of payloads) and its full config, so any process can run or resume it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data.jsonl"
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in payloads:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
    job = {"config": config, "parent_adapter": parent_adapter, "max_steps": max_steps, "data": data.name}
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    return run_dir / "job.json"


def run_job(run_dir: Path, *, progress: bool = True, on_step: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
    """Run (or resume) the job frozen in ``run_dir/job.json``."""
    from daemon.config import build_config
    from pipelines.models import load_base_model

    run_dir = Path(run_dir)
    job = json.loads((run_dir / "job.json").read_text())
    cfg = build_config(job["config"])
    m = cfg.model
    model, tokenizer = load_base_model(m.base_model, Path(cfg.paths.state_dir) / "cache", dtype=m.dtype,
                                       quantization=m.quantization, device=m.device, revision=m.revision or None,
                                       trust_remote_code=m.trust_remote_code, for_training=True)
    with open(run_dir / job["data"], encoding="utf-8") as f:
        payloads = [json.loads(line) for line in f if line.strip()]
    examples = tokenize_payloads(payloads, tokenizer, cfg.data.max_seq_len)
    parent = Path(job["parent_adapter"]) if job.get("parent_adapter") else None
    return train(examples, run_dir=run_dir, model=model, tokenizer=tokenizer, cfg=cfg.train,
                 max_seq_len=cfg.data.max_seq_len, packing=cfg.data.packing, parent_adapter=parent,
                 max_steps=job.get("max_steps"), progress=progress, on_step=on_step, should_stop=should_stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train RUN_DIR``: exit 0 with result.json, 1 with error.json (reason)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    import signal
    import threading

    # SIGTERM (the daemon shutting down) = checkpoint at the next step boundary and exit 75; resumable.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        outcome = run_job(args.run_dir, progress=not args.no_progress, should_stop=stop.is_set)
    except Interrupted as e:
        print(f"lorad train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as e:
        (args.run_dir / "error.json").write_text(json.dumps({"reason": str(e)}))
        print(f"lorad train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
