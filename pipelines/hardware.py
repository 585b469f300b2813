"""Hardware-aware defaults: dtype, quantization and micro-batch size from the machine found.

``choose_defaults`` is a pure function of plain values (device kind, GPU memory, bf16 support, the
model's size and shape, the sequence length), so its table of cases is tested without a GPU.
``detect_hardware`` (torch, imported inside) and ``model_shape`` (config.json + safetensors
headers, stdlib only) gather those values; ``resolve_config`` replaces the "auto" settings of a
Config (``model.dtype``, ``model.quantization``, ``train.micro_batch_size`` = 0) with the choice and
leaves every explicit setting alone.

The memory model is deliberately simple and conservative; an out-of-memory step still splits its
micro-batch and turns on gradient checkpointing (pipelines/train/), so a choice that is slightly
too large costs a retry, not a run:
  - 16-bit weights take 2 bytes per parameter, NF4 about 0.56 (4 bits + double-quantized scales),
    with embeddings and the LM head left in 16 bits (approximated by the 4-bit figure: small);
  - one packed training sequence keeps ~34 x seq_len x hidden bytes of 16-bit activations per
    layer (Korthikanti et al. 2022, without the attention-score term that flash attention avoids),
    and with gradient checkpointing (always on for a quantized base) ~2 x seq_len x hidden per
    layer plus one layer's full activations;
  - 10 % of the card and 2 GiB (CUDA context, LoRA weights + AdamW state, logits chunks) stay free.
On a CPU there is no such retry: the kernel's OOM killer ends the training process without an exception.
So the CPU micro-batch comes from the memory the machine has available (/proc/meminfo, a cgroup limit):
  - float32 weights (4 bytes per parameter) plus their bf16 copies under autocast (2 more);
  - one packed sequence keeps ~112 x seq_len x hidden bytes per layer (float32 and bf16 autocast
    intermediates both stay alive for the backward pass; measurements in docs/hardware.md);
    with gradient checkpointing ~8 x seq_len x hidden per layer (the float32 layer inputs) plus one layer;
  - 20 % of the memory and 2 GiB (the daemon serving beside it, the interpreter, logits chunks) stay free.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
CPU_MICRO_BATCH = 4        # larger batches gain nothing on a few cores (bench/train_speed.py)
CPU_MICRO_BATCH_TOKENS = 4096   # ... nor more tokens per micro-batch: two long sequences train slower than one
MAX_MICRO_BATCH = 16       # beyond this, gradient accumulation does the same work with fewer padding tokens
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN_LAYER = 2
CPU_ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 112
CPU_CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN_LAYER = 8
RESERVE_BYTES = 2 * GiB
USABLE_FRACTION = 0.9
CPU_USABLE_FRACTION = 0.8


@dataclass(frozen=True)
class Hardware:
    """What the machine offers: ``device`` is "cpu" or "cuda"; memory of the first GPU in bytes."""

    device: str
    name: str = "cpu"
    gpu_memory_bytes: int | None = None
    gpu_count: int = 0
    bf16: bool = False         # GPU: bf16 supported; CPU: bf16 units (AMX or AVX512-BF16), see cpu_bf16_matmul
    memory_bytes: int | None = None   # CPU: memory available to this process (None = unknown)


@dataclass(frozen=True)
class ModelShape:
    """What the defaults need to know about the base model (None = unknown, e.g. a hub id)."""

    params: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None


@dataclass(frozen=True)
class HardwarePlan:
    """The chosen defaults and why."""

    device: str
    dtype: str
    quantization: str
    micro_batch_size: int
    reason: str
    train_compute: str = ""    # the dtype training matmuls run in (bf16 autocast over fp32/bf16 weights, or dtype)
    gradient_checkpointing: bool = False   # needed for one sequence to fit (CPU; a GPU turns it on at an OOM)
    serve_prefill: str = ""    # the dtype serving's prompt prefill runs its matmuls in (decode keeps ``dtype``)

    def to_dict(self) -> dict:
        return asdict(self)


def _pow2_floor(x: float) -> int:
    n = 1
    while n * 2 <= x:
        n *= 2
    return n


def choose_defaults(hw: Hardware, shape: ModelShape | None = None, *, max_seq_len: int = 4096) -> HardwarePlan:
    """Pick dtype, quantization and micro-batch size for training/serving on ``hw``.

    CPU: float32 weights (half-precision matmuls are slow or missing on most CPUs), no quantization;
    training matmuls, and serving's prompt prefill, in bf16 autocast where the CPU has bf16 units
    (AMX or AVX512-BF16: 1.4x to several times its fp32 rate, see docs/hardware.md), else fp32; serving's decode
    steps stay fp32 (one token a row: autocast would cast every weight each step for matmuls too small to gain);
    micro-batch 4 (larger gains nothing on a few
    cores) or fewer: at most 4096 tokens, and as many sequences as the available memory holds; gradient
    checkpointing when even one does not fit (``cpu_defaults``).
    CUDA: bfloat16 where the GPU supports it (compute capability >= 8), else float16; 4-bit NF4 when
    the 16-bit weights plus one sequence's activations do not fit the usable memory; the micro-batch
    is the largest power of two (1..16) whose activations fit what the weights leave free.
    """
    shape = shape or ModelShape()
    if hw.device != "cuda" or not hw.gpu_memory_bytes:
        return cpu_defaults(hw, shape, max_seq_len)
    dtype = "bfloat16" if hw.bf16 else "float16"
    usable = hw.gpu_memory_bytes * USABLE_FRACTION - RESERVE_BYTES
    mem = f"{hw.gpu_memory_bytes / GiB:.0f} GiB {hw.name}"
    if not shape.params:
        # Without the model's size, fall back to a table by card size (an OOM retry corrects a bad guess).
        mb = 8 if hw.gpu_memory_bytes >= 70 * GiB else 4 if hw.gpu_memory_bytes >= 32 * GiB else \
            2 if hw.gpu_memory_bytes >= 16 * GiB else 1
        return HardwarePlan("cuda", dtype, "none", mb, f"{mem}, model size unknown: {dtype}, no quantization, "
                                                       f"micro-batch {mb} by card size", train_compute=dtype,
                            serve_prefill=dtype)
    full_seq, checkpointed = _sequence_bytes(shape, max_seq_len, ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER,
                                             CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN_LAYER)
    weights16 = 2 * shape.params
    if weights16 + full_seq <= usable:
        quantization, weights, per_seq = "none", weights16, full_seq
        why = f"16-bit weights ({weights16 / GiB:.1f} GiB) fit"
    else:
        quantization, weights, per_seq = "4bit", int(0.56 * shape.params), checkpointed
        why = f"16-bit weights ({weights16 / GiB:.1f} GiB) + one sequence do not fit, so NF4 ({weights / GiB:.1f} GiB)"
    headroom = usable - weights
    mb = max(1, min(MAX_MICRO_BATCH, _pow2_floor(headroom / per_seq))) if headroom > per_seq else 1
    if headroom < per_seq:
        why += "; even one sequence may not fit: lower data.max_seq_len or use train.distributed fsdp"
    return HardwarePlan("cuda", dtype, quantization, mb, f"{mem}: {why}; micro-batch {mb} at {max_seq_len} tokens",
                        train_compute=dtype, serve_prefill=dtype)


def _sequence_bytes(shape: ModelShape, max_seq_len: int, full_per: int, checkpointed_per: int) -> tuple[int, int]:
    """Activation bytes of one ``max_seq_len`` sequence in training: without gradient checkpointing, and with it
    (the kept layer inputs plus one layer's full activations, recomputed in the backward pass)."""
    layers = shape.num_layers or 32
    per_token_layer = (shape.hidden_size or 4096) * layers
    full = full_per * max_seq_len * per_token_layer
    return full, checkpointed_per * max_seq_len * per_token_layer + full // max(1, layers)


def cpu_defaults(hw: Hardware, shape: ModelShape, max_seq_len: int) -> HardwarePlan:
    """The CPU plan: float32 weights, bf16 autocast with bf16 units (training, serving's prefill), and the micro-batch
    the memory holds."""
    compute = "bfloat16" if hw.bf16 else "float32"
    matmuls = ("bf16 autocast (the CPU has bf16 units: AMX or AVX512-BF16)" if hw.bf16
               else "float32 (no AMX or AVX512-BF16)")
    head = f"no CUDA GPU: float32, no quantization, training matmuls and serving's prefill in {matmuls}"
    cap = max(1, min(CPU_MICRO_BATCH, CPU_MICRO_BATCH_TOKENS // max_seq_len))
    if not hw.memory_bytes or not shape.params:
        return HardwarePlan("cpu", "float32", "none", cap,
                            f"{head}; micro-batch {cap} ({CPU_MICRO_BATCH_TOKENS} tokens at most; memory or model "
                            f"size unknown)", train_compute=compute, serve_prefill=compute)
    per_seq, checkpointed = _sequence_bytes(shape, max_seq_len, CPU_ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER,
                                            CPU_CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN_LAYER)
    weights = shape.params * (6 if hw.bf16 else 4)
    headroom = hw.memory_bytes * CPU_USABLE_FRACTION - RESERVE_BYTES - weights
    mem = f"{hw.memory_bytes / GiB:.1f} GiB available"
    if headroom >= per_seq:
        mb = min(cap, _pow2_floor(headroom / per_seq))
        return HardwarePlan("cpu", "float32", "none", mb,
                            f"{head}; micro-batch {mb} ({mem}; ~{per_seq / GiB:.1f} GiB per {max_seq_len}-token "
                            f"sequence)", train_compute=compute, serve_prefill=compute)
    why = (f"{head}; micro-batch 1 with gradient checkpointing ({mem}; one {max_seq_len}-token sequence needs "
           f"~{per_seq / GiB:.1f} GiB without it")
    if headroom < checkpointed:
        why += f", ~{checkpointed / GiB:.1f} GiB with it: may not fit, lower data.max_seq_len"
    return HardwarePlan("cpu", "float32", "none", 1, why + ")", train_compute=compute, gradient_checkpointing=True,
                        serve_prefill=compute)


# ----------------------------------------------------------------------------- gathering the inputs


def available_memory_bytes() -> int | None:
    """Memory this process can still use: MemAvailable, or less under a cgroup (container) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    try:   # cgroup v2: the limit minus what the group already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = max(0, int(limit) - used)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def cpu_bf16_matmul() -> bool:
    """True when this CPU computes bf16 products in hardware and torch's oneDNN uses them: AMX tiles (Intel
    Sapphire Rapids and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake).

    Measured on a 2-core AMD EPYC with AVX512-BF16 and no AMX (SmolLM2-135M): bf16 autocast trains 1.42x as
    fast as float32 (bench/train_speed.py cpu, cpu_lorad_bf16 against cpu_lorad_fp32) and prefills a 200-token
    prompt in 219 ms against 405; with AMX the gain is larger still. Elsewhere autocast only adds casts.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a private probe that moved or a build without cpuinfo: assume no
            pass
    return False


@functools.lru_cache(maxsize=1)
def _omp_pause() -> Any:
    """libgomp's ``omp_pause_resource_all`` from the copy torch loaded (Linux), or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith(".so.1")}
        for path in sorted(paths):
            fn = ctypes.CDLL(path).omp_pause_resource_all
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    except (OSError, AttributeError):
        pass
    return None


def release_openmp_workers() -> bool:
    """Let the calling thread's OpenMP worker threads go; its next parallel region starts them again (~0.1 ms).

    GNU OpenMP (torch's CPU build) keeps the workers of every thread that ever ran a parallel region, and once
    they outnumber the CPUs it stops spinning between regions, so every small op of the thread that computes pays
    a wake-up. On 2 cores, with the model loaded in one thread and decoding in another, a 135M decode step's small
    attention ops took 8x longer. So a thread that is done with torch for a while calls this
    (``omp_pause_resource_all(omp_pause_soft)``, which frees only the caller's pool). Returns whether it was
    called: False where torch did not load libgomp (other platforms, or not imported yet).
    """
    fn = _omp_pause()
    if fn is None:
        return False
    fn(1)  # omp_pause_soft
    return True


def is_quantized(model: Any) -> bool:
    """True for a bitsandbytes 4/8-bit base model (QLoRA)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def cpu_autocast(model: Any) -> str | None:
    """"bfloat16" when a model on the CPU should run its matmuls in bf16 autocast: unquantized fp32 or bf16
    weights on a CPU with bf16 units (``cpu_bf16_matmul``); else None. Training and evaluation both ask here."""
    import torch

    dtype = next(model.parameters()).dtype
    if is_quantized(model) or dtype not in (torch.float32, torch.bfloat16) or not cpu_bf16_matmul():
        return None
    return "bfloat16"


# serve.cpu_prefill_dtype and serve.cpu_weights_dtype: the plan's choice, or one forced
SERVE_CPU_DTYPE_CHOICES = ("auto", "float32", "bfloat16")
BF16_DECODE_MIN_SPEEDUP = 1.25  # "auto" serves bf16 weights on a CPU only where its bf16 products clearly win


@functools.lru_cache(maxsize=4)
def bf16_matvec_speedup(rows: int = 1536, cols: int = 576, footprint: int = 64 << 20) -> float:
    """How many times faster this CPU multiplies one vector by a bf16 matrix than by a float32 one.

    A decode step is such products over weights no cache holds, so the probe cycles through copies of a
    ``rows x cols`` matrix (the default model's MLP shape) that together exceed ``footprint`` bytes in float32, on
    the calling thread, best of 5 interleaved passes each (~0.3 s). bf16 reads half the bytes; whether the CPU turns
    that into speed depends on its bf16 dot products: 1.5-2.4x on the dev VM's AMD EPYC with AVX512-BF16; on the
    Intel Xeon with AMX measured earlier a one-token forward was slower in bf16 (39 against 35 ms); without bf16
    units, far below 1. Another process computing on the same cores at the same priority skews it (there the bf16
    passes' parallel regions wait for preempted workers: 0.05 seen): the daemon's jobs run niced
    (``schedule.job_nice``), and its idle drift warm-up waits until serving is ready.
    """
    import time

    import torch
    import torch.nn.functional as F

    copies = max(2, footprint // (rows * cols * 4))
    gen = torch.Generator().manual_seed(0)
    w32 = [torch.randn(rows, cols, generator=gen) for _ in range(copies)]
    w16 = [w.to(torch.bfloat16) for w in w32]
    x32 = torch.randn(1, cols, generator=gen)
    x16 = x32.to(torch.bfloat16)

    def once(x, ws) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for w in ws:
                F.linear(x, w)
        return time.perf_counter() - t0

    once(x32, w32[:2]), once(x16, w16[:2])  # first calls: kernel choice, thread pool
    # Interleaved passes, best of each: a load that comes or goes during the probe slows both sides alike.
    t32, t16 = zip(*((once(x32, w32), once(x16, w16)) for _ in range(5)))
    return min(t32) / min(t16)


def serve_weights_dtype(setting: str = "auto", *, device: str = "cpu") -> str | None:
    """"bfloat16" when serving on a CPU should load bf16 weights instead of float32 (``serve.cpu_weights_dtype``):
    "bfloat16" always, "float32" never, "auto" where ``bf16_matvec_speedup`` reaches ``BF16_DECODE_MIN_SPEEDUP``
    (a decode step reads every weight once a token: half the bytes, when the CPU's bf16 units keep up, is up to
    half the time). None on a GPU (it serves 16-bit weights already) or where float32 stays."""
    if setting not in SERVE_CPU_DTYPE_CHOICES:
        raise ValueError(f"serve.cpu_weights_dtype must be one of {SERVE_CPU_DTYPE_CHOICES}, got {setting!r}")
    if device == "cuda" or setting == "float32":
        return None
    if setting == "bfloat16":
        return "bfloat16"
    return "bfloat16" if cpu_bf16_matmul() and bf16_matvec_speedup() >= BF16_DECODE_MIN_SPEEDUP else None


def serve_prefill_autocast(model: Any, setting: str = "auto") -> str | None:
    """"bfloat16" when serving should prefill prompts under bf16 autocast, else None (the weights' own dtype).

    Only float32 weights on a CPU qualify (a GPU serves 16-bit weights already). ``setting`` is
    ``serve.cpu_prefill_dtype``: "float32" never, "bfloat16" always, "auto" as the hardware plan says
    (``choose_defaults``: where the CPU has bf16 units, AMX or AVX512-BF16).
    """
    import torch

    if setting not in SERVE_CPU_DTYPE_CHOICES:
        raise ValueError(f"serve.cpu_prefill_dtype must be one of {SERVE_CPU_DTYPE_CHOICES}, got {setting!r}")
    weight = next(model.parameters())
    if setting == "float32" or weight.device.type != "cpu" or weight.dtype != torch.float32 or is_quantized(model):
        return None
    if setting == "bfloat16":
        return "bfloat16"
    return "bfloat16" if choose_defaults(detect_hardware("cpu")).serve_prefill == "bfloat16" else None


def detect_hardware(device: str = "auto") -> Hardware:
    """The first CUDA GPU torch sees (unless ``device`` is "cpu"), or the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return Hardware("cpu", bf16=cpu_bf16_matmul(), memory_bytes=available_memory_bytes())
    props = torch.cuda.get_device_properties(0)
    return Hardware("cuda", name=props.name, gpu_memory_bytes=int(props.total_memory),
                    gpu_count=torch.cuda.device_count(), bf16=bool(torch.cuda.is_bf16_supported()))


def model_shape(source: Path | str) -> ModelShape:
    """Parameters, hidden size and layers of a local model directory, read without loading it.

    Parameters are counted from the safetensors headers (the first 8 bytes give the JSON header's
    length); a hub id or a folder without safetensors gives None for what it cannot tell.
    """
    folder = Path(str(source))
    if not folder.is_dir():
        return ModelShape()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config.get("text_config", config)
    params = 0
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return ModelShape(None, config.get("hidden_size"), config.get("num_hidden_layers"))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info.get("shape", []):
                    n *= dim
                params += n
    return ModelShape(params or None, config.get("hidden_size"), config.get("num_hidden_layers"))


def resolve_config(cfg: Any, hw: Hardware | None = None, shape: ModelShape | None = None) -> tuple[Any, HardwarePlan]:
    """Replace the "auto" settings of ``cfg`` with the hardware plan; explicit settings win.

    Resolves ``model.dtype`` "auto", ``model.quantization`` "auto" and ``train.micro_batch_size`` 0.
    Without ``shape``, the base model is located (a GGUF is converted once) and its shape read.
    """
    import dataclasses

    m = cfg.model
    if hw is None:
        hw = detect_hardware(m.device)
    if shape is None:
        from pipelines.model_source import resolve_base_model

        try:
            source = resolve_base_model(m.base_model, Path(cfg.paths.state_dir) / "cache", revision=m.revision or None)
        except Exception:  # the loader reports the real problem with its own message later
            source = None
        shape = model_shape(source) if source is not None else ModelShape()
    plan = choose_defaults(hw, shape, max_seq_len=cfg.data.max_seq_len)
    model = dataclasses.replace(
        m, dtype=plan.dtype if m.dtype == "auto" else m.dtype,
        quantization=plan.quantization if m.quantization == "auto" else m.quantization)
    train = dataclasses.replace(cfg.train, micro_batch_size=cfg.train.micro_batch_size or plan.micro_batch_size,
                                gradient_checkpointing=cfg.train.gradient_checkpointing or plan.gradient_checkpointing)
    return dataclasses.replace(cfg, model=model, train=train), plan


def micro_batch_for(model: Any, max_seq_len: int) -> int:
    """The plan's micro-batch size for an already loaded model on the device it sits on."""
    device = next(model.parameters()).device
    hw = detect_hardware("cuda" if device.type == "cuda" else "cpu")
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    # bitsandbytes packs two 4-bit weights per stored element.
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    shape = ModelShape(params, getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None))
    return choose_defaults(hw, shape, max_seq_len=max_seq_len).micro_batch_size
