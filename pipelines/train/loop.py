"""The run: tokenized examples in, a LoRA adapter folder out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from daemon.config import TrainConfig
from pipelines.hardware import is_quantized
from pipelines.train import distributed
from pipelines.train.batches import collate_cpu, collate_weights, labelled_weight, make_staged_batches
from pipelines.train.checkpoint import _atomic_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from pipelines.train.lora import attach_lora
from pipelines.train.loss import chunked_loss_sum
from pipelines.train.protocol import Interrupted, TrainingError, TrainOutcome
from pipelines.train.speed import SpeedPlan, decoder_layers, packed_attention_kwargs, plan_speed, speed_setup, uncompile

ADAPTER_DIRNAME = "adapter"
METRICS = "metrics.jsonl"


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak. Stateless, so resuming needs no scheduler state."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(examples: list[dict], *, run_dir: Path, model: Any, tokenizer: Any, cfg: TrainConfig,
          max_seq_len: int, packing: bool = True, parent_adapter: Path | None = None,
          max_steps: int | None = None, progress: bool = True, clock: Callable[[], float] = time.monotonic,
          on_step: Callable[[dict], None] | None = None, chunk_tokens: int = 0,
          should_stop: Callable[[], bool] | None = None, attention: str = "auto",
          compile_layers: str | bool = "auto", autocast: str | bool = "auto", lora_kernel: str = "auto",
          dist: Any = None) -> TrainOutcome:
    """Train a LoRA adapter on tokenized ``examples`` and write it to ``run_dir/adapter``.

    Resumes from ``run_dir/checkpoints`` when present (same data and config assumed; the job
    spec in run_dir guarantees that in the daemon). ``attention``, ``compile_layers``, ``autocast`` and
    ``lora_kernel`` override the per-device speed plan (see ``plan_speed``); "auto" is the default.
    ``dist`` (a ``pipelines.train.distributed.Dist``, one per torchrun process) trains under DDP or FSDP2:
    each rank computes its share of every step's micro-batches, rank 0 alone writes files, and
    ``on_step`` runs on every rank with the global record.

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
    if not cfg.micro_batch_size:   # 0 = auto: what this device's memory holds for this model (pipelines/hardware.py)
        from pipelines.hardware import micro_batch_for

        cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_for(model, max_seq_len))
    if dist is not None:   # every rank must cut the same micro-batches (an "auto" size may differ): the smallest wins
        cfg = dataclasses.replace(cfg, micro_batch_size=dist.agree_min(cfg.micro_batch_size))
    # Examples marked with a phase (continued pre-training first) or a curriculum stage are batched apart.
    sequences, batches, stage_groups = make_staged_batches(examples, max_seq_len, packing, cfg.micro_batch_size)
    accum = cfg.grad_accum_steps
    if dist is not None:   # a step's micro-batches are dealt out to the ranks (pipelines/train/distributed.py)
        _, accum = distributed.plan_world(accum, dist.world_size)
    n_tokens = [len(s["input_ids"]) for s in sequences]
    n_labels = [labelled_weight(s) for s in sequences]
    weighted = any("weights" in s for s in sequences)
    steps_per_epoch = max(1, len(batches) // accum)
    total_steps = max_steps or cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if stage_groups is not None:
        from pipelines.data import stage_schedule

        order = stage_schedule(stage_groups, total_steps * accum, cfg.seed)

    def micro_batch(k: int) -> list[int]:
        if stage_groups is not None:   # phases in turn, curriculum stages easy -> hard within each
            return batches[order[k]]
        epoch, i = divmod(k, len(batches))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        return batches[int(torch.randperm(len(batches), generator=g)[i])]

    # -- model: LoRA on the base, warm-started from the parent; fresh optimizer over the LoRA weights only.
    # A 4-bit/8-bit base means memory was chosen over speed: gradient checkpointing starts on.
    splits, use_gc = 1, cfg.gradient_checkpointing or is_quantized(model)
    model = attach_lora(model, cfg, parent_adapter, gradient_checkpointing=use_gc)
    model.train()
    device = next(model.parameters()).device if dist is None else dist.device
    sharded = dist is not None and dist.sharded
    if sharded and compile_layers == "auto":
        compile_layers = False   # FSDP's per-layer hooks and compiled layers are not combined here (not measured)
    if sharded:
        lora_kernel = "peft"     # FSDP2 shards the LoRA weights into DTensors, which the fused kernel does not take
    plan = plan_speed(model, device, attention=attention, compile_layers=compile_layers, autocast=autocast,
                      max_seq_len=max_seq_len, lora_kernel=lora_kernel)
    # The module whose forward is the loss: DDP / FSDP2 around the LoRA model when distributed.
    engine = (None if dist is None else
              distributed.wrap(model, dist, chunked_loss_sum, layers=decoder_layers(model), autocast=plan.autocast))
    world = 1 if dist is None else dist.world_size
    main = dist is None or dist.is_main
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), fused=device.type == "cuda" and not sharded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    step, tokens_before, history, resumed_from = 0, 0, [], 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, sharded=sharded)
        step, tokens_before, history = state["step"], state["tokens"], state["history"]
        splits, resumed_from = state.get("splits", 1), step
        if state.get("total_steps") != total_steps or state.get("sequences") != len(sequences):
            raise TrainingError(f"checkpoint {ckpt} belongs to a different run (steps {state.get('total_steps')} vs "
                                f"{total_steps}, sequences {state.get('sequences')} vs {len(sequences)}); a resume "
                                f"on another number of GPUs needs train.grad_accum_steps to be a multiple of both")

    cuda = device.type == "cuda"
    # Tokens per LM-head + cross-entropy chunk: on CPU 512 (smaller [chunk x vocab] work buffers) measured
    # faster than 2048, the GPU's choice.
    chunk_tokens = chunk_tokens or (2048 if cuda else 512)

    def run_micro(idx: list[int], denom: float, last: bool = True):
        """Forward + backward of one micro-batch, in `splits` pieces; returns (loss sum on device, real tokens).

        Distributed: the loss is scaled by the world size because DDP/FSDP average gradients over ranks;
        ``last`` marks a rank's last micro-batch of the step, the one whose backward all-reduces (DDP).
        """
        loss_total, real_total = None, 0
        piece = math.ceil(len(idx) / splits)
        for s in range(0, len(idx), piece):
            ids, labels, pos, real = collate_cpu(sequences, idx[s:s + piece], pad_id)
            extra = packed_attention_kwargs(plan, pos, device)
            if weighted:
                extra["lorad_token_weights"] = collate_weights(sequences, idx[s:s + piece], ids.shape[1]).to(device)
            if cuda:   # pinned host memory lets the copies overlap the previous micro-batch's backward
                ids, labels, pos = (t.pin_memory().to(device, non_blocking=True) for t in (ids, labels, pos))
            amp = (torch.autocast(device.type, dtype=getattr(torch, plan.autocast)) if plan.autocast
                   else contextlib.nullcontext())
            if engine is None:
                with amp:
                    loss_sum = chunked_loss_sum(model, ids, labels, pos, chunk_tokens=chunk_tokens, decoder_kwargs=extra)
                (loss_sum / denom).backward()
            else:
                with distributed.no_sync(engine, last), amp:
                    loss_sum = engine(ids, labels, pos, extra, chunk_tokens)
                    (loss_sum * world / denom).backward()
            # Summed on the device: one host sync per optimizer step, not one per micro-batch.
            loss_total = loss_sum.detach() if loss_total is None else loss_total + loss_sum.detach()
            real_total += real
        return loss_total, real_total

    metrics_path = run_dir / METRICS
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: the bar shows on a terminal and stays out of logs and pipes.
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                   disable=None if main else True)
    t_start, tokens_now, status = clock(), 0, "completed"
    def checkpoint_state() -> dict:
        return {"step": step, "tokens": tokens_before + tokens_now, "history": history, "splits": splits,
                "total_steps": total_steps, "sequences": len(sequences)}

    with speed_setup(model, plan):
        while step < total_steps:
            spent = clock() - t_start > cfg.max_wall_seconds
            stop = should_stop is not None and should_stop()
            if dist is not None:   # every rank must take the same branch
                spent, stop = dist.any(spent, stop)
            if spent:
                status = "budget"
                break
            if stop:
                if step > resumed_from and step % cfg.checkpoint_every_steps != 0:
                    save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)
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
                    loss_dev, real = None, 0
                    mine = group if dist is None else group[dist.rank::world]
                    for j, idx in enumerate(mine):
                        ls, r = run_micro(idx, denom, last=j == len(mine) - 1)
                        loss_dev, real = (ls if loss_dev is None else loss_dev + ls), real + r
                    if dist is not None:   # the step's loss and tokens over all ranks
                        loss_dev = dist.sum(loss_dev.float())
                        real = sum(n_tokens[i] for g in group for i in g)
                    break
                except torch.OutOfMemoryError:
                    if dist is not None:   # ranks cannot retry independently: they would stop matching collectives
                        raise TrainingError(f"out of GPU memory at step {step} on rank {dist.rank}; lower "
                                            f"train.micro_batch_size, set train.gradient_checkpointing, or use "
                                            f"train.distributed fsdp") from None
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
                except Exception as e:  # noqa: BLE001 -- only a compiler failure is retried, once, in eager mode
                    if not plan.compile_layers or dist is not None:
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    uncompile(model)
                    plan = SpeedPlan(**{**plan.to_dict(), "compile_layers": False})
                    print(f"lorad: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                          f"retrying step {step} without compiling", file=sys.stderr)
            loss = float(loss_dev) / denom
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {step}: aborting (lower train.learning_rate or check data)")
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor
            optimizer.step()
            step += 1
            tokens_now += real
            elapsed = clock() - t_start
            record = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens_before + tokens_now,
                      "tokens_per_second": tokens_now / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed}
            if device.type == "cuda":   # this process's peak so far (rank 0's under DDP/FSDP: ranks are alike)
                record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                record["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            history.append(round(loss, 6))
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if on_step is not None:
                on_step(record)
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)
    if bar is not None:
        bar.close()
    if status == "budget" and step > resumed_from and step % cfg.checkpoint_every_steps != 0:
        save_checkpoint(run_dir, model, optimizer, checkpoint_state(), dist=dist)

    adapter_dir = run_dir / ADAPTER_DIRNAME
    # FSDP: the LoRA shards are gathered on every rank (a collective); rank 0 writes.
    full_lora = distributed.lora_state_full(model) if sharded else None
    if main:
        _atomic_dir(adapter_dir, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True,
                                                                   **({"state_dict": full_lora} if sharded else {})))
    seconds = clock() - t_start
    outcome = TrainOutcome(
        adapter_dir=str(adapter_dir), status=status, steps=step, total_steps=total_steps,
        loss_first=history[0] if history else None, loss_last=history[-1] if history else None,
        tokens=tokens_before + tokens_now, seconds=seconds,
        tokens_per_second=tokens_now / seconds if seconds > 0 else 0.0, resumed_from_step=resumed_from,
        micro_batch_splits=splits, gradient_checkpointing=use_gc, examples=len(examples),
        sequences=len(sequences), parent_adapter=str(parent_adapter) if parent_adapter else None,
        speed=plan.to_dict(), history=history)
    if main:
        (run_dir / "result.json").write_text(json.dumps(outcome.to_dict(), indent=2))
    if dist is not None:
        outcome.speed["distributed"] = {"mode": dist.mode, "world_size": world, "micro_batches_per_step": accum}
        dist.barrier()   # no rank leaves (and tears down the group) while rank 0 still writes
    return outcome
