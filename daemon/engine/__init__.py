"""Inference engine: one base model, per-row LoRA adapters, a preallocated KV cache, one batched step.

Map (arrows point down):
  api.py        what callers touch: errors (HTTP status each), SamplingParams, SwapResult, GenerationHandle
  build.py      build_engine: the engine for a running daemon, from its config
  scheduler.py  Engine: submit/queue (429 beyond serve.max_queue), the decode thread, warm-up, failure
  batching.py   continuous batching (a mixin of Engine): admit waiting requests into free cache slots,
                prefill them together, then one decode forward for every running row whatever version it
                is pinned to; read-back one step behind the device; a row that fails ends alone
  model_prep.py end-of-sequence ids, the float32 output head of CPU bf16 prefill
  versions.py   champion pointer, preload into a LoRA slot, swap/activate/rollback, pins held for the
                control plane, registry glue (promote_and_swap, rollback_and_swap, follow_champion)
  step.py       the attention function (transformers' AttentionInterface) over the slot cache, prefill and
                decode forwards, CUDA graphs per (batch, context) bucket, sampling on the device
  lora.py       SlotLoRA: every Linear of the decoder gets stacked A/B tables, one column block per adapter
                slot; each row selects its slot by index inside the captured step; loads copy in place
  kernels.py    Triton (GPU): the decode attention over the slot cache, the LoRA B product in one kernel
  cache.py      the KV cache: slots x positions per layer, sized from free GPU memory or a CPU token budget

Why not stock parts (measured on one H100, see docs/decisions.md): transformers' static-cache ``generate``
compiles and graph-captures its decode step (~200 req/s at 32 for the 135M default) but serves one
adapter set per call: PEFT's per-row ``adapter_names`` splits every LoRA layer into one matmul per
adapter outside any graph (35 req/s static, 5.8 dynamic), and ``hotswap_adapter`` swaps the one adapter
in place but cannot mix versions in a batch. ``generate_batch`` (continuous batching, paged cache) has
no per-row adapters and measured 3.6-10.7 req/s. So the engine keeps transformers' modules and
AttentionInterface, and writes its own per-row LoRA tables and static slot cache, which make a step of
any version mix one fixed-shape graph: a swap is a tensor copy, never a recompile or a new capture.

torch, transformers and safetensors are imported inside functions: ``lorad --help`` stays instant.
"""

from daemon.engine.api import (BASE_LABEL, CHAMPION_ALIASES, AdapterUnavailable, EngineClosed, EngineError,
                               GenerationHandle, InvalidRequest, QueueFull, SamplingParams, SwapResult,
                               UnknownModel, label)
from daemon.engine.build import build_engine
from daemon.engine.scheduler import Engine
from daemon.engine.versions import follow_champion, promote_and_swap, rollback_and_swap

__all__ = ["BASE_LABEL", "CHAMPION_ALIASES", "AdapterUnavailable", "Engine", "EngineClosed", "EngineError",
           "GenerationHandle", "InvalidRequest", "QueueFull", "SamplingParams", "SwapResult", "UnknownModel",
           "build_engine", "follow_champion", "label", "promote_and_swap", "rollback_and_swap"]
