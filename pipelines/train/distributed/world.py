"""The process group of one rank and its model: init and shutdown, DDP / FSDP2 wrapping, the loss scaled so a
step equals the one-process step, and LoRA state moved between full and sharded tensors (the package docstring
has the design)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.train.protocol import DistributedError

MODES = ("none", "ddp", "fsdp")
# NVLink multicast (NVLS / symmetric-memory multicast) stays off unless the operator turns it on:
# LoRA's gradient all-reduce is small, and on shared hosts a multicast fault can take every GPU of
# the host down. Setting the variable yourself wins (setdefault).
SAFE_COLLECTIVES_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NODE_RANK_ENV = "LORAD_NODE_RANK"   # this host's node rank, when --node-rank is not given (every rank inherits it)


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
