"""One incremental LoRA/QLoRA run: a frozen dataset in, a candidate adapter folder out.

The room, in the order a run uses it:

  protocol.py     errors, exit codes and the outcome the job, its launcher and the daemon share (stdlib only)
  job.py          ``python -m pipelines.train RUN_DIR``: write_job freezes a run (data + config), run_job loads
                  the base model, tokenizes, applies the training options and calls train(); exit 0 / 1 / 75
  batches.py      tokenized examples -> packed sequences -> micro-batches of similar length -> padded tensors
  lora.py         attach_lora (warm-start from the parent adapter) and the fused LoRA linear used on CPU
  speed.py        the speed plan per device: packed attention, torch.compile, autocast, the LoRA kernel
  loss.py         the LM head + cross-entropy run per chunk of labelled tokens, its gradient in the same pass
  loop.py         train(): read top to bottom like nanoGPT's train.py
  checkpoint.py   adapter + optimizer + RNG + data position, written atomically; resume; a damaged one refused
  distributed/    several GPUs and hosts through torchrun: world.py (one rank: DDP or FSDP2, ranks, sharded
                  tensors), launcher.py (torchrun commands, the c10d rendezvous across hosts, the follower the
                  other hosts run)

What a run does:
  1. wrap the base model with LoRA; warm-start from the parent (champion) adapter's weights,
     with a FRESH optimizer and LR schedule sized to this run's data (not the trainer "resume",
     which would replay old optimizer state tuned to old data);
  2. pack the tokenized examples into sequences (position ids restart per example, so no example
     attends to another) and cut them into micro-batches in a seeded order;
  3. loop: forward (loss computed in chunks, so the [tokens x vocab] logits never exist at once),
     backward, clip, step; every N steps write a checkpoint atomically, so ``kill -9`` at any
     instant resumes exactly;
  4. write the adapter as a standard PEFT folder (adapter_model.safetensors + adapter_config.json).

Safety for unattended runs: non-finite loss aborts; a wall-clock budget stops cleanly; CUDA OOM
splits micro-batches smaller and turns on gradient checkpointing before giving up with a reason.
Nothing here is pickled: checkpoints are safetensors + JSON.

Heavy libraries (torch, transformers, peft) are imported inside functions: importing this package
loads none of them, so the daemon can import it at startup.
"""

from pipelines.train.protocol import (EXIT_INTERRUPTED, INTERRUPTED_MARKER, DistributedError, Interrupted,
                                      TrainingError, TrainOutcome)
from pipelines.train.batches import (IGNORE, collate_cpu, labelled_weight, make_batches, make_sequences,
                                     make_staged_batches, segment_bounds)
from pipelines.train.lora import attach_lora, dropout_mask, fusable_lora
from pipelines.train.speed import SpeedPlan, packed_attention_kwargs, plan_speed, speed_setup
from pipelines.train.loss import chunked_loss_sum
from pipelines.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pipelines.train.loop import ADAPTER_DIRNAME, lr_at, train
from pipelines.train.job import (apply_training_options, champion_losses, keep_freed_memory, main, run_job,
                                 tokenize_payloads, write_job)

__all__ = [
    "ADAPTER_DIRNAME", "EXIT_INTERRUPTED", "IGNORE", "INTERRUPTED_MARKER", "DistributedError", "Interrupted",
    "SpeedPlan", "TrainOutcome", "TrainingError", "apply_training_options", "attach_lora", "champion_losses",
    "chunked_loss_sum", "collate_cpu", "dropout_mask", "fusable_lora", "keep_freed_memory", "labelled_weight",
    "latest_checkpoint", "load_checkpoint", "lr_at", "main", "make_batches", "make_sequences", "make_staged_batches",
    "packed_attention_kwargs", "plan_speed", "run_job", "save_checkpoint", "segment_bounds", "speed_setup",
    "tokenize_payloads", "train", "write_job",
]
