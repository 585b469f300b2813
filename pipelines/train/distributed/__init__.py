"""Multi-GPU training on PyTorch's own wrappers: DDP (replicated base) and FSDP2 (sharded base).

lorad does not implement data parallelism itself. ``torchrun`` (``python -m torch.distributed.run``)
starts one process per GPU; each runs the ordinary ``python -m pipelines.train RUN_DIR`` job and
this module wraps its model in ``torch.nn.parallel.DistributedDataParallel`` or
``torch.distributed.fsdp.fully_shard``. The training loop in ``pipelines/train/loop.py`` stays one
loop; with ``dist`` set it only changes which micro-batches a rank computes, scales the loss so
the wrapper's gradient average equals the single-process gradient, and lets rank 0 alone write.

World-size-independent runs. An optimizer step always covers the same micro-batches, whatever
the number of processes: the ``train.grad_accum_steps`` micro-batches of a step are dealt out
to the ranks (rank r takes every W-th), so W GPUs do the work of one step in parallel and the
loss, gradient, step count and checkpoints are those of a one-process run. Checkpoints hold
full (unsharded) LoRA weights and optimizer moments in the one-process layout, so a run
checkpointed on 2 GPUs resumes on 1, 4 or 8 (or the other way round). When W does not divide
``grad_accum_steps``, each rank takes ceil(accum / W) micro-batches and a step grows to that
times W (``plan_world``): then a resume on another world size is refused unless it gives the
same step size.

Several hosts. The same job spans ``train.nnodes`` hosts through torchrun's c10d rendezvous: every
node runs the launcher (``python -m pipelines.train RUN_DIR --launch MODE --node-rank R ...``), node 0
(the daemon's) hosts the rendezvous store at ``train.rdzv_endpoint``, and the nodes meet under one
rendezvous id (the run's folder name by default). A world of N nodes x P processes is just a world of
N*P ranks to the loop above, so losses and checkpoints do not depend on the topology. c10d numbers the
ranks in its own order, so the writing rank is the first rank of node 0 (``main_rank``), not global
rank 0: a run's files land on the node that launched it even without shared storage.

Imports of torch live inside functions: the daemon builds launch commands without loading it.

Map:
  world.py    one rank's side: MODES, plan_world, ``init`` (the process group, the writing rank), ``Dist`` and
              ``OneProcess`` (what the loop asks of its world), DDP / FSDP2 wrapping, LoRA state full <-> sharded
  launcher.py the launcher's side: torchrun command lines (``launch_argv``, ``train_argv``), ``Nodes`` and
              ``resolve_nodes``, ``run_launched`` (the ``lorad train`` path), node 0's ``announce`` and the other
              nodes' ``follow``, ``launch`` (one host's torchrun)
"""

from pipelines.train.distributed.launcher import (SLURM_NODE_RANK_ENV, Nodes, resolve_nodes,
                                                  launch_argv, torchrun_argv, train_argv, run_launched,
                                                  RENDEZVOUS_FILE, announce, close_announcement, follow, launch)
from pipelines.train.distributed.world import (MODES, NODE_RANK_ENV, SAFE_COLLECTIVES_ENV, plan_world, Dist,
                                               OneProcess, init, main_rank_of, shutdown, load_kwargs, wrap, no_sync,
                                               full, shard_like, peft_key, load_sharded_lora, lora_state_full)

__all__ = ["Dist", "MODES", "NODE_RANK_ENV", "Nodes", "OneProcess", "RENDEZVOUS_FILE", "SAFE_COLLECTIVES_ENV",
           "SLURM_NODE_RANK_ENV", "announce", "close_announcement", "follow", "full", "init", "launch",
           "launch_argv", "load_kwargs", "load_sharded_lora", "lora_state_full", "main_rank_of", "no_sync",
           "peft_key", "plan_world", "resolve_nodes", "run_launched", "shard_like", "shutdown", "torchrun_argv",
           "train_argv", "wrap"]
