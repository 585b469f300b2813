"""The run: tokenized examples in, a LoRA adapter folder out. ``train`` reads top to bottom like nanoGPT's."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from daemon.config import TrainConfig
from pipelines.hardware import is_quantized
from pipelines.train.batches import collate_cpu, collate_weights, labelled_weight, make_staged_batches
from pipelines.train.checkpoint import latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from pipelines.train.distributed import OneProcess
from pipelines.train.lora import attach_lora
from pipelines.train.loss import chunked_loss_sum
from pipelines.train.protocol import Interrupted, TrainingError, TrainOutcome
from pipelines.train.speed import (SpeedPlan, compile_pays, decoder_layers, packed_attention_kwargs, plan_speed,
                                   speed_setup, uncompile)

ADAPTER_DIRNAME = "adapter"
METRICS = "metrics.jsonl"


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
    dist = dist if dist is not None else OneProcess()

    # -- data: fixed sequences and micro-batches; the order per epoch comes from a seeded permutation
    cfg = _setup_micro_batch_size(cfg, model, max_seq_len, dist)
    data = _setup_data(examples, cfg, max_seq_len, packing, max_steps, dist)

    # -- model: LoRA on the base, warm-started from the parent; fresh optimizer over the LoRA weights only.
    # A 4-bit/8-bit base means memory was chosen over speed: gradient checkpointing starts on.
    use_gc = cfg.gradient_checkpointing or is_quantized(model)
    model = attach_lora(model, cfg, parent_adapter, gradient_checkpointing=use_gc)
    model.train()
    device = dist.compute_device(model)
    compile_layers = _compile_choice(compile_layers, cfg, model, data, dist)
    compile_layers, lora_kernel = dist.speed_limits(compile_layers, lora_kernel)
    plan = plan_speed(model, device, attention=attention, compile_layers=compile_layers, autocast=autocast,
                      max_seq_len=max_seq_len, lora_kernel=lora_kernel)
    # Tokens per LM-head + cross-entropy chunk: smaller [chunk x vocab] work buffers suit the CPU.
    fwd_bwd = _ForwardBackward(data=data, plan=plan, device=device, dist=dist,
                               loss_step=dist.wrap_loss(model, chunked_loss_sum, layers=decoder_layers(model),
                                                        autocast=plan.autocast),
                               pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                               chunk_tokens=chunk_tokens or (2048 if device.type == "cuda" else 512))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), fused=device.type == "cuda" and not dist.sharded)
    state = _resume(run_dir, model, optimizer, data, dist, use_gc)

    # -- the loop: one optimizer step per accumulation group; a checkpoint every N steps
    bar = _progress_bar(progress, data.total_steps, state.step, dist.is_main)
    t_start = clock()
    with speed_setup(model, plan):
        while state.step < data.total_steps:
            spent, stop = dist.any(clock() - t_start > cfg.max_wall_seconds, should_stop is not None and should_stop())
            if spent:
                state.status = "budget"
                break
            if stop:
                if state.step > state.resumed_from and state.step % cfg.checkpoint_every_steps != 0:
                    save_checkpoint(run_dir, model, optimizer, state.checkpoint(data), dist=dist)
                raise Interrupted(f"stopped on request at step {state.step}/{data.total_steps}; checkpointed")
            group = data.step_group(state.step)
            # Normalise by the labelled tokens of the whole accumulation group: every token weighs the same,
            # however the group is split into micro-batches.
            denom = max(1.0, float(sum(data.n_labels[i] for g in group for i in g)))
            lr = lr_at(state.step, data.total_steps, cfg.learning_rate, cfg.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_dev, real = _forward_backward_with_retries(fwd_bwd, group, denom, state, model, optimizer, cfg)
            loss = float(loss_dev) / denom
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {state.step}: aborting (lower train.learning_rate or "
                                    f"check data)")
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor
            optimizer.step()
            state.step += 1
            state.tokens_now += real
            record = _step_record(state, data.total_steps, loss, lr, grad_norm, clock() - t_start, device)
            state.history.append(round(loss, 6))
            if dist.is_main:
                with open(run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if on_step is not None:
                on_step(record)
            if state.step % cfg.checkpoint_every_steps == 0 or state.step == data.total_steps:
                save_checkpoint(run_dir, model, optimizer, state.checkpoint(data), dist=dist)
    if bar is not None:
        bar.close()
    if state.status == "budget" and state.step > state.resumed_from and state.step % cfg.checkpoint_every_steps != 0:
        save_checkpoint(run_dir, model, optimizer, state.checkpoint(data), dist=dist)

    # -- the adapter, as a standard PEFT folder, and the outcome (result.json)
    adapter_dir = run_dir / ADAPTER_DIRNAME
    full_lora = dist.full_lora_state(model)   # FSDP: the LoRA shards gathered on every rank (a collective)
    if dist.is_main:
        save_adapter(adapter_dir, model, full_lora)
    outcome = state.outcome(adapter_dir, data, clock() - t_start, examples=len(examples),
                            parent_adapter=parent_adapter, plan=fwd_bwd.plan)
    outcome.speed.update(dist.describe(data.accum))   # how ranks shared each step, and which one wrote
    if dist.is_main:
        (run_dir / "result.json").write_text(json.dumps(outcome.to_dict(), indent=2))
    dist.barrier()   # no rank leaves (and tears down the group) while rank 0 still writes
    return outcome


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak. Stateless, so resuming needs no scheduler state."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------- setup


def _setup_micro_batch_size(cfg: TrainConfig, model: Any, max_seq_len: int, dist: Any) -> TrainConfig:
    """0 = auto: what this device's memory holds for this model (pipelines/hardware.py); every rank must cut
    the same micro-batches (an "auto" size may differ between them), so the smallest wins."""
    if not cfg.micro_batch_size:
        from pipelines.hardware import micro_batch_for

        cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_for(model, max_seq_len))
    return dataclasses.replace(cfg, micro_batch_size=dist.agree_min(cfg.micro_batch_size))


def _compile_choice(compile_layers: str | bool, cfg: TrainConfig, model: Any, data: "_Data", dist: Any) -> str | bool:
    """``compile_layers`` unless it is "auto": then train.compile (always / never), or for auto False when this
    process's planned tokens would not repay the compilation (``speed.compile_pays``), else "auto" for the speed
    plan (CUDA, unquantized, varlen attention)."""
    if compile_layers != "auto":
        return compile_layers
    if cfg.compile != "auto":
        return cfg.compile == "always"
    per_batch = sum(data.n_tokens) / max(1, len(data.batches))
    tokens = int(data.total_steps * data.accum * per_batch / dist.world_size)
    if compile_pays(model, tokens):
        return "auto"
    if next(model.parameters()).is_cuda and dist.is_main:   # every rank decides alike; one says so
        print(f"lorad train: layers not compiled: ~{tokens:,} planned tokens would not repay the compilation "
              f"(train.compile: auto; 'always' forces it)", file=sys.stderr, flush=True)
    return False


@dataclass
class _Data:
    """The run's fixed sequences and micro-batches, and which micro-batches each optimizer step takes."""

    sequences: list[dict]
    batches: list[list[int]]       # sequence indices per micro-batch
    accum: int                     # micro-batches per optimizer step, over all ranks
    total_steps: int
    seed: int
    order: list[int] | None        # the stage schedule (phases, curriculum), or None: a seeded shuffle per epoch
    n_tokens: list[int]
    n_labels: list[float]          # each sequence's labelled tokens, weighted (the loss normaliser)
    weighted: bool                 # per-token loss weights (train.category_weights)

    def micro_batch(self, k: int) -> list[int]:
        import torch

        if self.order is not None:   # phases in turn, curriculum stages easy -> hard within each
            return self.batches[self.order[k]]
        epoch, i = divmod(k, len(self.batches))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.batches[int(torch.randperm(len(self.batches), generator=g)[i])]

    def step_group(self, step: int) -> list[list[int]]:
        return [self.micro_batch(step * self.accum + a) for a in range(self.accum)]


def _setup_data(examples: list[dict], cfg: TrainConfig, max_seq_len: int, packing: bool, max_steps: int | None,
                dist: Any) -> _Data:
    """The run's sequences and micro-batches, how many make a step, and how many steps."""
    # Examples marked with a phase (continued pre-training first) or a curriculum stage are batched apart.
    sequences, batches, stage_groups = make_staged_batches(examples, max_seq_len, packing, cfg.micro_batch_size)
    accum = dist.step_size(cfg.grad_accum_steps)   # distributed: a step's micro-batches are dealt out to the ranks
    steps_per_epoch = max(1, len(batches) // accum)
    total_steps = max_steps or cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    order = None
    if stage_groups is not None:
        from pipelines.data import stage_schedule

        order = stage_schedule(stage_groups, total_steps * accum, cfg.seed)
    return _Data(sequences=sequences, batches=batches, accum=accum, total_steps=total_steps, seed=cfg.seed,
                 order=order, n_tokens=[len(s["input_ids"]) for s in sequences],
                 n_labels=[labelled_weight(s) for s in sequences], weighted=any("weights" in s for s in sequences))


@dataclass
class _State:
    """What a run carries from step to step and into its checkpoints and outcome."""

    use_gc: bool                   # gradient checkpointing (turned on by an out-of-memory retry)
    step: int = 0
    tokens_before: int = 0         # tokens processed before a resume
    tokens_now: int = 0            # tokens processed by this process
    history: list = field(default_factory=list)
    splits: int = 1                # pieces each micro-batch is cut into (>1 after an out-of-memory retry)
    resumed_from: int = 0
    status: str = "completed"

    def checkpoint(self, data: _Data) -> dict:
        return {"step": self.step, "tokens": self.tokens_before + self.tokens_now, "history": self.history,
                "splits": self.splits, "total_steps": data.total_steps, "sequences": len(data.sequences)}

    def outcome(self, adapter_dir: Path, data: _Data, seconds: float, *, examples: int,
                parent_adapter: Path | None, plan: SpeedPlan) -> TrainOutcome:
        return TrainOutcome(
            adapter_dir=str(adapter_dir), status=self.status, steps=self.step, total_steps=data.total_steps,
            loss_first=self.history[0] if self.history else None,
            loss_last=self.history[-1] if self.history else None,
            tokens=self.tokens_before + self.tokens_now, seconds=seconds,
            tokens_per_second=self.tokens_now / seconds if seconds > 0 else 0.0, resumed_from_step=self.resumed_from,
            micro_batch_splits=self.splits, gradient_checkpointing=self.use_gc, examples=examples,
            sequences=len(data.sequences), parent_adapter=str(parent_adapter) if parent_adapter else None,
            speed=plan.to_dict(), history=self.history)


def _resume(run_dir: Path, model: Any, optimizer: Any, data: _Data, dist: Any, use_gc: bool) -> _State:
    """The state of the newest checkpoint in ``run_dir`` (weights, optimizer and RNG restored), or a fresh one."""
    state = _State(use_gc=use_gc)
    ckpt = latest_checkpoint(run_dir)
    # Every rank must resume from the same step of the same data (hosts without shared storage may differ).
    dist.check_same(checkpoint_step=int(ckpt.name.split("-")[-1]) if ckpt else 0, total_steps=data.total_steps,
                    sequences=len(data.sequences))
    if ckpt is None:
        return state
    saved = load_checkpoint(ckpt, model, optimizer, sharded=dist.sharded)
    state.step, state.tokens_before, state.history = saved["step"], saved["tokens"], saved["history"]
    state.splits, state.resumed_from = saved.get("splits", 1), state.step
    if saved.get("total_steps") != data.total_steps or saved.get("sequences") != len(data.sequences):
        raise TrainingError(f"checkpoint {ckpt} belongs to a different run (steps {saved.get('total_steps')} vs "
                            f"{data.total_steps}, sequences {saved.get('sequences')} vs {len(data.sequences)}); a "
                            f"resume on another number of GPUs needs train.grad_accum_steps to be a multiple of both")
    return state


def _progress_bar(progress: bool, total: int, initial: int, main: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    # disable=None: the bar shows on a terminal and stays out of logs and pipes.
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                disable=None if main else True)


# ----------------------------------------------------------------------------- one step


@dataclass
class _ForwardBackward:
    """Forward and backward passes over this rank's share of a step's micro-batches."""

    data: _Data
    plan: SpeedPlan
    device: Any
    dist: Any
    loss_step: Callable          # (ids, labels, pos, decoder kwargs, chunk tokens, denom, last, amp) -> loss sum
    pad_id: int
    chunk_tokens: int

    def step(self, group: list[list[int]], denom: float, splits: int) -> tuple[Any, int]:
        """Gradients of the step accumulated; returns (loss sum over all ranks on device, real tokens)."""
        loss_dev, real = None, 0
        mine = self.dist.share(group)
        for j, idx in enumerate(mine):
            ls, r = self.micro_batch(idx, denom, splits, last=j == len(mine) - 1)
            loss_dev, real = (ls if loss_dev is None else loss_dev + ls), real + r
        return self.dist.step_totals(loss_dev, real, sum(self.data.n_tokens[i] for g in group for i in g))

    def micro_batch(self, idx: list[int], denom: float, splits: int, last: bool) -> tuple[Any, int]:
        """Forward + backward of one micro-batch in ``splits`` pieces; ``last`` marks a rank's last of the step."""
        import torch

        sequences, device = self.data.sequences, self.device
        loss_total, real_total = None, 0
        piece = math.ceil(len(idx) / splits)
        for s in range(0, len(idx), piece):
            ids, labels, pos, real = collate_cpu(sequences, idx[s:s + piece], self.pad_id)
            extra = packed_attention_kwargs(self.plan, pos, device)
            if self.data.weighted:
                extra["lorad_token_weights"] = collate_weights(sequences, idx[s:s + piece], ids.shape[1]).to(device)
            if device.type == "cuda":   # pinned host memory lets the copies overlap the previous backward
                ids, labels, pos = (t.pin_memory().to(device, non_blocking=True) for t in (ids, labels, pos))
            amp = (torch.autocast(device.type, dtype=getattr(torch, self.plan.autocast)) if self.plan.autocast
                   else contextlib.nullcontext())
            loss_sum = self.loss_step(ids, labels, pos, extra, self.chunk_tokens, denom=denom, last=last, amp=amp)
            # Summed on the device: one host sync per optimizer step, not one per micro-batch.
            loss_total = loss_sum.detach() if loss_total is None else loss_total + loss_sum.detach()
            real_total += real
        return loss_total, real_total


def _forward_backward_with_retries(fwd_bwd: _ForwardBackward, group: list[list[int]], denom: float, state: _State,
                                   model: Any, optimizer: Any, cfg: TrainConfig) -> tuple[Any, int]:
    """``fwd_bwd.step``, retried after CUDA OOM (smaller pieces, then gradient checkpointing) and once after a
    torch.compile failure (eager). Distributed ranks cannot retry alone (their collectives would stop
    matching): there the first failure is final."""
    import torch

    dist = fwd_bwd.dist
    while True:
        try:
            optimizer.zero_grad(set_to_none=True)
            return fwd_bwd.step(group, denom, state.splits)
        except torch.OutOfMemoryError:
            if not dist.can_retry:
                raise TrainingError(f"out of GPU memory at step {state.step} on rank {dist.rank}; lower "
                                    f"train.micro_batch_size, set train.gradient_checkpointing, or use "
                                    f"train.distributed fsdp") from None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if state.splits < cfg.micro_batch_size:
                state.splits *= 2
            elif not state.use_gc:
                state.use_gc = True
                model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            else:
                raise TrainingError(f"out of GPU memory at step {state.step} even with micro-batches of "
                                    f"1 sequence and gradient checkpointing; lower data.max_seq_len") from None
            print(f"lorad: out of memory; retrying step {state.step} with {state.splits} splits, "
                  f"gradient checkpointing {'on' if state.use_gc else 'off'}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 -- only a compiler failure is retried, once, in eager mode
            if not fwd_bwd.plan.compile_layers or not dist.can_retry:
                raise
            optimizer.zero_grad(set_to_none=True)
            uncompile(model)
            fwd_bwd.plan = SpeedPlan(**{**fwd_bwd.plan.to_dict(), "compile_layers": False})
            print(f"lorad: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                  f"retrying step {state.step} without compiling", file=sys.stderr)


def _step_record(state: _State, total_steps: int, loss: float, lr: float, grad_norm: float, elapsed: float,
                 device: Any) -> dict:
    """The metrics.jsonl line of the step just taken."""
    import torch

    record = {"step": state.step, "total_steps": total_steps, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "tokens": state.tokens_before + state.tokens_now,
              "tokens_per_second": state.tokens_now / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed}
    if device.type == "cuda":   # this process's peak so far (rank 0's under DDP/FSDP: ranks are alike)
        record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return record
