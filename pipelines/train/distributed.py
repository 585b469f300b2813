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
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.train.protocol import (EXIT_INTERRUPTED, INTERRUPTED_MARKER, DistributedError, Interrupted,
                                      TrainingError, TrainOutcome)

MODES = ("none", "ddp", "fsdp")
# NVLink multicast (NVLS / symmetric-memory multicast) stays off unless the operator turns it on:
# LoRA's gradient all-reduce is small, and on shared hosts a multicast fault can take every GPU of
# the host down. Setting the variable yourself wins (setdefault).
SAFE_COLLECTIVES_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------- pure decisions


def plan_world(grad_accum_steps: int, world_size: int) -> tuple[int, int]:
    """(micro-batches per rank per step, micro-batches per step) for ``world_size`` processes.

    The step keeps its ``grad_accum_steps`` micro-batches when the world size divides it;
    otherwise it grows to the next multiple of the world size (no rank idles inside a step).
    """
    if grad_accum_steps < 1 or world_size < 1:
        raise ValueError(f"grad_accum_steps and world_size must be >= 1, got {grad_accum_steps}, {world_size}")
    per_rank = -(-grad_accum_steps // world_size)
    return per_rank, per_rank * world_size


NODE_RANK_ENV = "LORAD_NODE_RANK"   # this host's node rank, when --node-rank is not given (every rank inherits it)
SLURM_NODE_RANK_ENV = "SLURM_NODEID"   # srun's node index: the node rank under Slurm


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


# ----------------------------------------------------------------------------- the process group


@dataclass
class Dist:
    """This process's place in a torchrun world."""

    mode: str            # "ddp" | "fsdp"
    rank: int
    world_size: int
    local_rank: int
    device: Any          # torch.device this rank computes on
    main_rank: int = 0   # the rank that writes the run's files: the first rank of node 0

    @property
    def is_main(self) -> bool:
        return self.rank == self.main_rank

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over all ranks (stop requests, budgets: every rank must take the same branch)."""
        import torch
        import torch.distributed as td

        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (a setting each rank chose from its own device)."""
        import torch
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())

    def sum(self, value: Any) -> Any:
        """All-reduce SUM of a tensor (returns it)."""
        import torch.distributed as td

        td.all_reduce(value, op=td.ReduceOp.SUM)
        return value

    def check_same(self, **values: int) -> None:
        """Raise unless every rank holds the same ``values`` (e.g. the checkpoint step it resumed from).

        Ranks that disagree would issue different collectives and hang; on hosts without shared storage
        that is a node whose copy of the run folder (data, checkpoints) differs.
        """
        import torch
        import torch.distributed as td

        mine = torch.tensor(list(values.values()), dtype=torch.int64, device=self.device)
        low, high = mine.clone(), mine.clone()
        td.all_reduce(low, op=td.ReduceOp.MIN)
        td.all_reduce(high, op=td.ReduceOp.MAX)
        differ = [f"{name} ranges {int(lo)}..{int(hi)}" for name, lo, hi in zip(values, low, high) if lo != hi]
        if differ:
            raise DistributedError(f"ranks disagree ({'; '.join(differ)}; rank {self.rank} has "
                                   f"{dict(values)}): every node must see the same run folder (shared storage, "
                                   f"or copy RUN_DIR with its checkpoints/ to every node before a resume)")

    # What the training loop asks of its world (``OneProcess`` answers the same for a plain run).

    can_retry = False   # ranks cannot retry a step alone: they would stop matching collectives

    def compute_device(self, model: Any) -> Any:
        return self.device

    def step_size(self, grad_accum_steps: int) -> int:
        """Micro-batches per optimizer step, over all ranks (``plan_world``)."""
        return plan_world(grad_accum_steps, self.world_size)[1]

    def share(self, group: list) -> list:
        """This rank's micro-batches of a step: every world-size-th, starting at its rank."""
        return group[self.rank::self.world_size]

    def step_totals(self, loss_sum: Any, tokens: int, all_tokens: int) -> tuple[Any, int]:
        """The step's loss sum and real tokens over all ranks, from this rank's."""
        return self.sum(loss_sum.float()), all_tokens

    def speed_limits(self, compile_layers: str | bool, lora_kernel: str) -> tuple[str | bool, str]:
        """FSDP2: no compiled layers by default (FSDP's per-layer hooks and compiled layers are not combined
        here), and PEFT's LoRA forward (the LoRA weights become DTensors the fused kernel does not take)."""
        if not self.sharded:
            return compile_layers, lora_kernel
        return (False if compile_layers == "auto" else compile_layers), "peft"

    def wrap_loss(self, model: Any, loss_fn: Callable, *, layers: list, autocast: str | None) -> Callable:
        """The model under DDP / FSDP2 (``wrap``), as a step that computes a micro-batch's loss and backward."""
        return _WrappedLoss(wrap(model, self, loss_fn, layers=layers, autocast=autocast), self.world_size)

    def full_lora_state(self, model: Any) -> dict | None:
        """FSDP: the LoRA shards gathered whole on every rank (a collective), for rank 0 to save."""
        return lora_state_full(model) if self.sharded else None

    def describe(self, micro_batches_per_step: int) -> dict:
        return {"distributed": {"mode": self.mode, "world_size": self.world_size,
                                "micro_batches_per_step": micro_batches_per_step, "writer_rank": self.main_rank}}


class OneProcess:
    """A plain one-process run, behind ``Dist``'s interface: every collective is a no-op."""

    mode = "none"
    rank = 0
    main_rank = 0
    world_size = 1
    is_main = True
    sharded = False
    can_retry = True   # an out-of-memory or compile failure is retried with a smaller or eager step

    def compute_device(self, model: Any) -> Any:
        return next(model.parameters()).device

    def barrier(self) -> None:
        pass

    def any(self, *flags: bool) -> list[bool]:
        return [bool(f) for f in flags]

    def agree_min(self, value: int) -> int:
        return value

    def sum(self, value: Any) -> Any:
        return value

    def check_same(self, **values: int) -> None:
        pass

    def step_size(self, grad_accum_steps: int) -> int:
        return grad_accum_steps

    def share(self, group: list) -> list:
        return group

    def step_totals(self, loss_sum: Any, tokens: int, all_tokens: int) -> tuple[Any, int]:
        return loss_sum, tokens

    def speed_limits(self, compile_layers: str | bool, lora_kernel: str) -> tuple[str | bool, str]:
        return compile_layers, lora_kernel

    def wrap_loss(self, model: Any, loss_fn: Callable, *, layers: list, autocast: str | None) -> Callable:
        return _PlainLoss(model, loss_fn)

    def full_lora_state(self, model: Any) -> dict | None:
        return None

    def describe(self, micro_batches_per_step: int) -> dict:
        return {}


def init(mode: str, environ: dict | None = None) -> Dist | None:
    """Join the torchrun world described by the environment; None for a one-process run.

    Raises:
        DistributedError: torchrun started several processes but ``mode`` is "none" (or the reverse
            cannot be served: a mode without the environment simply runs as one process).
    """
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if mode not in MODES:
        raise DistributedError(f"train.distributed must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        if world > 1:
            raise DistributedError(f"started by torchrun with WORLD_SIZE={world} but train.distributed is 'none'; "
                                   f"set train.distributed to ddp or fsdp, or start one process")
        return None
    if world == 1 and "RANK" not in env:
        return None   # ddp/fsdp asked for, but one plain process: the ordinary single-device run
    import torch
    import torch.distributed as td

    for k, v in SAFE_COLLECTIVES_ENV.items():
        os.environ.setdefault(k, v)
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                   f"set train.num_processes to at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not td.is_initialized():
        td.init_process_group(backend, device_id=device if backend == "nccl" else None)
    dist = Dist(mode=mode, rank=rank, world_size=world, local_rank=local_rank, device=device)
    dist.main_rank = _main_rank(dist, env)
    return dist


def main_rank_of(node_ranks: list[int], local_world_size: int) -> int:
    """The writing rank from every rank's node rank (index = global rank): the first rank of node 0.

    Raises:
        DistributedError: the node ranks are not 0..nnodes-1 with ``local_world_size`` ranks each (two
            hosts given the same node rank, or none given 0).
    """
    nnodes = max(1, len(node_ranks) // max(1, local_world_size))
    counts = {n: node_ranks.count(n) for n in sorted(set(node_ranks))}
    if sorted(counts) != list(range(nnodes)) or any(n != local_world_size for n in counts.values()):
        raise DistributedError(f"the {nnodes} nodes of this run gave node ranks {counts} (node rank: ranks); each "
                               f"node needs its own rank in 0..{nnodes - 1} (--node-rank or ${NODE_RANK_ENV})")
    return node_ranks.index(0)


def _main_rank(dist: Dist, env: Any) -> int:
    """Gather every rank's node rank (``$LORAD_NODE_RANK``, set by the launcher) and pick the writer."""
    local_world = int(env.get("LOCAL_WORLD_SIZE", dist.world_size))
    if local_world == dist.world_size:
        return 0   # one node: torchrun's rank 0 is on it
    import torch
    import torch.distributed as td

    # torchrun started by hand on each host, without lorad's launcher: its own node index (GROUP_RANK)
    mine = torch.tensor([int(env.get(NODE_RANK_ENV, env.get("GROUP_RANK", -1)))], dtype=torch.int64,
                        device=dist.device)
    every = [torch.zeros_like(mine) for _ in range(dist.world_size)]
    td.all_gather(every, mine)
    return main_rank_of([int(t.item()) for t in every], local_world)


def shutdown(dist: Dist | None) -> None:
    if dist is None:
        return
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def load_kwargs(dist: Dist | None, *, device: str, dtype: str, quantization: str) -> dict:
    """How each rank loads the base model (``pipelines.models.load_base_model`` keyword arguments).

    DDP: the whole base on this rank's GPU. FSDP: unquantized weights load on the CPU in the
    compute dtype and ``fully_shard`` moves only this rank's shard to the GPU (the full model never
    sits on one card); 4-bit weights must be quantized on the GPU, so they load there with a
    floating-point storage dtype that FSDP can shard (bitsandbytes' ``quant_storage``).
    """
    if dist is None:
        return {"device": device, "dtype": dtype}
    if dist.device.type != "cuda":
        return {"device": "cpu", "dtype": dtype}
    if dtype == "auto":
        import torch

        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dist.sharded and quantization == "none":
        return {"device": "cpu", "dtype": dtype}
    kwargs = {"device": "cuda", "dtype": dtype}
    if dist.sharded and quantization == "4bit":
        kwargs["quant_storage"] = dtype
    return kwargs


# ----------------------------------------------------------------------------- wrapping


def _loss_module(model: Any, loss_fn: Callable) -> Any:
    import torch

    class LossModule(torch.nn.Module):
        """The wrapper's root module: its forward is the training loss, so DDP's reducer and FSDP's
        root hooks (which unshard the embeddings and LM head) see every forward."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, labels, pos, decoder_kwargs, chunk_tokens):
            return loss_fn(self.model, ids, labels, pos, chunk_tokens=chunk_tokens, decoder_kwargs=decoder_kwargs)

    return LossModule()


def wrap(model: Any, dist: Dist, loss_fn: Callable, *, layers: list, autocast: str | None) -> Any:
    """Put the LoRA-wrapped model under DDP or FSDP2; returns the module whose forward is the loss.

    ``layers`` are the decoder layers (each becomes one FSDP unit: its weights are gathered just
    before it runs and freed after). With bf16 autocast FSDP gathers in bf16 and reduces gradients
    in fp32; the LoRA weights and AdamW moments stay fp32 shards.
    """
    import torch

    if not dist.sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if dist.device.type == "cuda" and any(p.device != dist.device for p in model.parameters()):
            model.to(dist.device)   # a loader that ignored torch.cuda.set_device: DDP needs the whole model here
            stray = {str(p.device) for p in model.parameters()} - {str(dist.device)}
            if stray:
                raise DistributedError(f"rank {dist.rank}: model weights on {sorted(stray)}, expected {dist.device}; "
                                       f"load the base on this rank's GPU")
        # Every rank built the same base and seeded LoRA init; broadcasting the (small) trainable
        # weights from rank 0 makes that a guarantee, without DDP's broadcast of the frozen base.
        import torch.distributed as td

        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    td.broadcast(p.data, src=0)
        root = _loss_module(model, loss_fn)
        return DDP(root, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                   init_sync=False, gradient_as_bucket_view=True, broadcast_buffers=False)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=getattr(torch, autocast), reduce_dtype=torch.float32)
          if autocast else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    root = _loss_module(model, loss_fn)
    fully_shard(root, mp_policy=mp)
    return root


def no_sync(wrapped: Any, last: bool):
    """DDP: skip the gradient all-reduce on all but a rank's last micro-batch of a step."""
    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


class _PlainLoss:
    """One process: a micro-batch's loss under ``amp``, then its backward (outside autocast)."""

    def __init__(self, model: Any, loss_fn: Callable):
        self.model, self.loss_fn = model, loss_fn

    def __call__(self, ids, labels, pos, decoder_kwargs: dict, chunk_tokens: int, *, denom: float, last: bool,
                 amp: Any) -> Any:
        with amp:
            loss_sum = self.loss_fn(self.model, ids, labels, pos, chunk_tokens=chunk_tokens,
                                    decoder_kwargs=decoder_kwargs)
        (loss_sum / denom).backward()
        return loss_sum


class _WrappedLoss:
    """DDP / FSDP2: the loss scaled by the world size, because the wrapper averages gradients over ranks;
    ``last`` marks a rank's last micro-batch of the step, the one whose backward all-reduces (DDP)."""

    def __init__(self, wrapped: Any, world_size: int):
        self.wrapped, self.world_size = wrapped, world_size

    def __call__(self, ids, labels, pos, decoder_kwargs: dict, chunk_tokens: int, *, denom: float, last: bool,
                 amp: Any) -> Any:
        with no_sync(self.wrapped, last), amp:
            loss_sum = self.wrapped(ids, labels, pos, decoder_kwargs, chunk_tokens)
            (loss_sum * self.world_size / denom).backward()
        return loss_sum


# ----------------------------------------------------------------------------- full <-> sharded tensors


def full(t: Any) -> Any:
    """A sharded (DTensor) tensor gathered whole; anything else unchanged. Collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(value: Any, ref: Any) -> Any:
    """``value`` (a full tensor) laid out like ``ref``: this rank's shard when ``ref`` is a DTensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank read the same file, so each cuts its own shard (no traffic).
        return distribute_tensor(value.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                                 src_data_rank=None)
    return value.to(ref.device)


def peft_key(param_name: str, adapter: str = "default") -> str:
    """The name PEFT saves a LoRA parameter under (``get_peft_model_state_dict`` drops the adapter name)."""
    return param_name.replace(f".{adapter}.", ".")


def load_sharded_lora(model: Any, tensors: dict) -> None:
    """Copy full LoRA tensors (PEFT names) into a sharded model's LoRA parameters.

    Raises:
        DistributedError: a trainable parameter has no tensor in ``tensors``.
    """
    import torch

    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = peft_key(name)
            if key not in tensors:
                missing.append(key)
                continue
            p.copy_(shard_like(tensors[key].to(p.dtype), p))
    if missing:
        raise DistributedError(f"checkpoint lacks {len(missing)} LoRA weight(s), e.g. {missing[:2]}")


def lora_state_full(model: Any) -> dict:
    """The trainable (LoRA) entries of ``model.state_dict()`` gathered whole, under their model names."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: full(v).detach().cpu() for k, v in model.state_dict().items() if k in names}


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
    root = Path(__file__).resolve().parents[2]   # the repository root: pipelines/train/distributed.py
    seen = 0
    with open(run_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=str(root), stdout=log, stderr=None if progress else log)
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


def _die_with_parent() -> None:
    """Linux: torchrun gets SIGTERM if this launcher dies, and stops its ranks (no orphans holding GPUs)."""
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

    root = Path(__file__).resolve().parents[2]
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
                proc = subprocess.Popen(argv, cwd=str(root), stdout=out, stderr=subprocess.STDOUT)
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
                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
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
