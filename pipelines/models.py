"""Base-model loading (dtype, quantization, device, padding) and LoRA target resolution.

Where the model's files come from (a local folder, a hub id, a GGUF converted once into the cache)
is pipelines/model_source.py; ``resolve_base_model`` and ``ModelLoadError`` are read from here too.

Heavy libraries (torch, transformers, peft, bitsandbytes) are imported inside the functions
that need them, so importing this module costs only the standard library and `lorad --help`
stays instant.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Callable, NamedTuple

from pipelines.model_source import EMBEDDED_DEFAULT, ModelLoadError, resolve_base_model  # noqa: F401

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "4bit", "8bit")   # auto: pipelines.hardware picks for this GPU and model
DEVICES = ("auto", "cpu", "cuda")
TARGET_MODES = ("all-linear", "attention")


# LoRA targets per config.model_type: (attention projections, MLP projections). Names are leaf
# module names as PEFT's target_modules matches them (suffix match on the dotted module path).
_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
# DeepSeek V2/V3 multi-head latent attention: q_proj when q_lora_rank is None (V2-Lite), else the
# low-rank pair q_a_proj -> q_b_proj; keys/values go through kv_a_proj_with_mqa -> kv_b_proj.
# kv_a_layernorm / q_a_layernorm are RMSNorms, not linear layers. In transformers 5 the routed
# experts are fused 3-D parameters (mlp.experts.gate_up_proj / .down_proj), not nn.Linear modules,
# so the MLP names below reach the dense layers (first_k_dense_replace) and the shared experts
# only (lora_config explains how they reach PEFT). The router (mlp.gate) holds a bare weight
# parameter and is never a target.
_MLA_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_TARGET_TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_LLAMA_ATTENTION, _LLAMA_MLP),
    "mistral": (_LLAMA_ATTENTION, _LLAMA_MLP),
    "qwen2": (_LLAMA_ATTENTION, _LLAMA_MLP),
    "qwen3": (_LLAMA_ATTENTION, _LLAMA_MLP),
    "deepseek_v2": (_MLA_ATTENTION, _LLAMA_MLP),
    "deepseek_v3": (_MLA_ATTENTION, _LLAMA_MLP),
}
# Leaf names the unknown-architecture scan never targets: the output head and MoE routers, whose
# low-rank update would shift which experts see which tokens rather than adapt what they compute.
_NEVER_SCANNED = frozenset({"lm_head", "embed_out", "output", "gate", "router", "shared_expert_gate"})



# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device 'cuda' requested but torch {torch.__version__} sees no CUDA GPU; use device 'cpu' or 'auto', "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPU matmuls in half precision are slow or unsupported on many CPUs.
        return torch.float32
    return getattr(torch, dtype)


def _bnb_config(quantization: str, compute_dtype: Any, device: str) -> Any:
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a broken native library
        raise ModelLoadError(
            f"quantization {quantization!r} needs bitsandbytes, which failed to import ({exc}); "
            "install it with `pip install 'bitsandbytes>=0.49'` or set quantization 'none'"
        ) from exc
    if device == "cpu":
        # bitsandbytes runs 4/8-bit layers on CPU only from 0.49 on; older releases crash deep
        # inside the first forward pass.
        version = tuple(int(p) for p in re.findall(r"\d+", bitsandbytes.__version__)[:2])
        if version < (0, 49):
            raise ModelLoadError(
                f"quantization {quantization!r} on CPU needs bitsandbytes >= 0.49, found {bitsandbytes.__version__}; "
                "upgrade it, use a CUDA device, or set quantization 'none'"
            )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NF4 fits normally distributed weights better than FP4 (QLoRA)
            bnb_4bit_use_double_quant=True,  # quantize the scales too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(
    spec: str,
    cache_dir: pathlib.Path,
    *,
    dtype: str = "auto",
    quantization: str = "none",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    for_training: bool = False,
    quant_storage: str | None = None,
) -> tuple[Any, Any]:
    """Load the base causal LM and its tokenizer.

    Args:
        spec: base_model setting; see resolve_base_model.
        cache_dir: lorad's cache folder (GGUF conversions live there).
        dtype: "auto" (bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU),
            "float32", "bfloat16" or "float16".
        quantization: "none", "4bit" (bitsandbytes NF4, double quant, compute in dtype), "8bit", or
            "auto" (pipelines.hardware.choose_defaults: 4bit on a GPU the 16-bit weights do not fit).
        device: "auto" (cuda if available), "cpu" or "cuda".
        revision: hub revision for hub ids.
        trust_remote_code: allow the checkpoint's own modeling code (needed by some DeepSeek repos).
        for_training: pad on the right (labels line up); otherwise eval mode and left padding,
            which batched generation needs. k-bit preparation is left to the trainer.
        quant_storage: 4-bit only: the dtype the packed weights are stored in ("bfloat16" lets FSDP
            shard them like the other weights; None = bitsandbytes' uint8).

    Returns:
        (model, tokenizer); the tokenizer always has a pad token.

    Raises:
        ValueError: dtype, quantization or device is not one of the allowed values.
        ModelLoadError: the model cannot be found, converted or loaded.
    """
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("quantization", quantization, QUANTIZATIONS)
    _check_choice("device", device, DEVICES)

    resolved_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, resolved_device)
    source = resolve_base_model(spec, cache_dir, revision=revision)
    if quantization == "auto":
        from pipelines.hardware import Hardware, choose_defaults, detect_hardware, model_shape

        hw = detect_hardware() if resolved_device == "cuda" else Hardware("cpu")
        quantization = choose_defaults(hw, model_shape(source)).quantization
    from_hub = isinstance(source, str)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if from_hub and revision:
        kwargs["revision"] = revision
    model_kwargs: dict[str, Any] = {
        **kwargs,
        "dtype": torch_dtype,
        # Pickled weights (pytorch_model.bin) can run code when loaded: only safetensors are ever read.
        "use_safetensors": True,
        # Place weights straight on the target device: no full CPU copy of a large model first.
        "device_map": {"": resolved_device},
    }
    if quantization != "none":
        model_kwargs["quantization_config"] = _bnb_config(quantization, torch_dtype, resolved_device)
        if quant_storage and quantization == "4bit":   # FSDP-QLoRA: shardable float storage of the packed weights
            import torch

            model_kwargs["quantization_config"].bnb_4bit_quant_storage = getattr(torch, quant_storage)

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(source), **model_kwargs)
    except Exception as exc:
        raise ModelLoadError(_load_failure_message(spec, source, quantization, resolved_device, exc)) from exc

    _ensure_pad_token(spec, model, tokenizer)
    tokenizer.padding_side = "right" if for_training else "left"
    # k-bit preparation and gradient checkpointing are train.py's calls: they trade memory for
    # speed per run, and an fp32 upcast here would cost every inference load too.
    if not for_training:
        model.eval()
    return model, tokenizer


PURPOSES = ("serve", "train", "eval", "drift")


class BaseModel(NamedTuple):
    """A loaded base model, its tokenizer, the config it was loaded with and the hardware plan (or None)."""

    model: Any
    tokenizer: Any
    cfg: Any
    plan: Any


def settings_for(purpose: str, cfg: Any, *, hardware_plan: bool = True) -> tuple[Any, Any]:
    """The config a base model is loaded with for ``purpose`` (each has its own dtype policy), and the plan.

      serve, train  "auto" dtype and quantization (and train's micro-batch) come from the hardware plan
                    (``pipelines.hardware.resolve_config``); ``hardware_plan=False`` keeps them as written;
                    serve on a CPU loads bf16 weights instead of float32 where ``serve.cpu_weights_dtype`` says so
                    (``pipelines.hardware.serve_weights_dtype``: "auto" where this CPU's bf16 products are faster)
      eval          as written: ``load_base_model`` resolves "auto" (fp32 on a CPU, bf16/fp16 on a GPU)
      drift         as eval, except "auto" on a CPU with native bf16 runs the whole model in bf16: features
                    need only a forward pass, and both windows are featurized in the same dtype

    Returns:
        (cfg with ``model`` settings for the purpose, the HardwarePlan or None)
    """
    import dataclasses

    from pipelines.hardware import cpu_bf16_matmul, resolve_config, serve_weights_dtype

    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if purpose in ("serve", "train") and hardware_plan:
        resolved, plan = resolve_config(cfg)
        m = resolved.model
        if (purpose == "serve" and cfg.model.dtype == "auto" and plan.device == "cpu" and m.dtype == "float32"
                and m.quantization == "none" and serve_weights_dtype(cfg.serve.cpu_weights_dtype) == "bfloat16"):
            resolved = dataclasses.replace(resolved, model=dataclasses.replace(m, dtype="bfloat16"))
            plan = dataclasses.replace(plan, dtype="bfloat16", serve_prefill="bfloat16",
                                       reason=f"{plan.reason}; serving loads bf16 weights: this CPU's bf16 "
                                              "matrix-vector products are faster (serve.cpu_weights_dtype)")
        return resolved, plan
    if purpose == "drift" and cfg.model.dtype == "auto" and cfg.model.device != "cuda":
        import torch

        if not torch.cuda.is_available() and cpu_bf16_matmul():
            return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16")), None
    return cfg, None


def load_for(purpose: str, cfg: Any, *, loader: Callable[..., tuple[Any, Any]] | None = None,
             placement: Callable[[Any], dict] | None = None) -> BaseModel:
    """Load the base model of ``cfg`` (a lorad Config) for one purpose: serve, train, eval or drift.

    Args:
        purpose: picks the dtype policy (``settings_for``); train also pads on the right.
        loader: a ``load_base_model``-compatible callable (tests pass a tiny model); a loader passed in
            gets serve's settings as written, without a hardware plan.
        placement: maps the model settings to ``load_base_model`` keyword arguments that replace
            device/dtype (a distributed rank's placement, ``pipelines.train.distributed.load_kwargs``).
    """
    cfg, plan = settings_for(purpose, cfg, hardware_plan=loader is None)
    m = cfg.model
    where = {"device": m.device, "dtype": m.dtype}
    if placement is not None:
        where = placement(m)
    extra = {"for_training": True} if purpose == "train" else {}
    model, tokenizer = (loader or load_base_model)(
        m.base_model, pathlib.Path(cfg.paths.state_dir) / "cache", quantization=m.quantization,
        revision=m.revision or None, trust_remote_code=m.trust_remote_code, **where, **extra)
    return BaseModel(model, tokenizer, cfg, plan)


def _load_failure_message(spec: str, source: pathlib.Path | str, quantization: str, device: str, exc: Exception) -> str:
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(source, str):
        return (
            f"base_model {spec!r}: loading hub id failed ({what}); the Hugging Face hub is unreachable from here, "
            "or the id/revision is wrong or gated. Download it where the hub is reachable "
            f"(`huggingface-cli download {spec} --local-dir DIR`) and set base_model to DIR"
        )
    if quantization != "none":
        return (
            f"base_model {spec!r}: loading with {quantization} bitsandbytes quantization on {device} failed ({what}); "
            "check that this bitsandbytes build supports the device, or set quantization 'none'"
        )
    if "safetensors" in what:
        return (f"base_model {spec!r}: {str(source)!r} has no safetensors weights ({what}); lorad never loads "
                "pickled weights (pytorch_model.bin): convert them once where you trust the file, e.g. "
                "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`")
    return f"base_model {spec!r}: loading {str(source)!r} failed ({what}); check the directory holds a complete causal LM checkpoint"


def _ensure_pad_token(spec: str, model: Any, tokenizer: Any) -> None:
    # Adding a new pad token would resize the embeddings and change the base model, so reuse
    # an existing special token: padded positions are masked out of attention and labels anyway.
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                f"base_model {spec!r}: tokenizer has no pad, eos or unk token to pad batches with; "
                "add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------
# LoRA targets
# --------------------------------------------------------------------------------------------


def _linear_classes() -> tuple[type, ...]:
    import torch

    classes: list[type] = [torch.nn.Linear]  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers, which PEFT supports

        classes.append(Conv1D)
    except ImportError:
        pass
    return tuple(classes)


def _linear_modules(model: Any) -> list[tuple[str, Any]]:
    """(dotted name, module) of every linear layer, in model order."""
    classes = _linear_classes()
    return [(name, module) for name, module in model.named_modules() if name and isinstance(module, classes)]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def lora_target_modules(model: Any, mode: str = "all-linear") -> list[str]:
    """Resolve the leaf module names LoRA should wrap (PEFT's target_modules) for this model.

    Args:
        model: a transformers causal LM (plain or bitsandbytes-quantized).
        mode: "all-linear" (attention + MLP), "attention" (attention only), or a comma-separated
            list of leaf names such as "q_proj,v_proj".

    Returns:
        Names that exist as linear layers in the model, in table (or model) order.

    Raises:
        ModelLoadError: an explicit name is not a linear layer of the model, or nothing matched.
    """
    linear = _linear_modules(model)
    available = _unique([_leaf(name) for name, _ in linear])
    model_type = getattr(getattr(model, "config", None), "model_type", None)

    if mode not in TARGET_MODES:
        requested = _unique([part.strip() for part in str(mode).split(",") if part.strip()])
        if not requested:
            raise ModelLoadError(f"lora targets {mode!r}: empty; use 'all-linear', 'attention' or names from {sorted(available)}")
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise ModelLoadError(
                f"lora targets {unknown} are not linear layers of this {model_type or 'model'}; "
                f"available: {sorted(available)} (or use 'all-linear' / 'attention')"
            )
        return requested

    if model_type in _TARGET_TABLE:
        attention, mlp = _TARGET_TABLE[model_type]
        wanted = attention if mode == "attention" else attention + mlp
        targets = [name for name in wanted if name in available]
    else:
        targets = _scan_targets(model, linear, mode)
        logger.warning(
            "model_type %r is not in lorad's LoRA target table; %s targets found by scanning linear layers: %s",
            model_type,
            mode,
            targets,
        )
    if not targets:
        raise ModelLoadError(
            f"lora targets {mode!r}: no matching linear layers in this {model_type or 'model'}; "
            f"list them explicitly from {sorted(available)}"
        )
    return targets


def _scan_targets(model: Any, linear: list[tuple[str, Any]], mode: str) -> list[str]:
    """Targets for an architecture missing from the table: every linear leaf except heads and routers."""
    excluded = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    expert_counts = {
        getattr(config, attr, None) for attr in ("num_experts", "n_routed_experts", "num_local_experts")
    } - {None}
    for name, module in linear:
        out_features = getattr(module, "out_features", None)
        # A router is a linear map onto the experts; its name varies, its width does not.
        if module is output or _leaf(name) in _NEVER_SCANNED or out_features in expert_counts:
            excluded.add(_leaf(name))
    names = [name for name, _ in linear if _leaf(name) not in excluded]
    if mode == "attention":
        # Without a table, attention layers are recognised by their module path.
        names = [name for name in names if re.search(r"attn|attention", name)]
    names = [_leaf(name) for name in names]
    return _unique(names)


# Leaf names PEFT (>= 0.19 with transformers 5) treats as pre-v5 expert projections of a fused-MoE
# model: in a list target_modules it rewrites them onto the fused 3-D expert parameters and drops
# the dense-layer and shared-expert nn.Linear modules of the same name (peft issue #3711).
_PEFT_MOE_REMAPPED = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def _fused_expert_parameter_targets(model: Any, targets: list[str]) -> list[str]:
    """Parameter paths ("mlp.gate_proj.weight") for linear targets PEFT would re-point at fused experts."""
    fused = any(
        param.dim() == 3 and name in _PEFT_MOE_REMAPPED | {"gate_up_proj"}
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
    )
    if not fused:
        return []
    paths = []
    for name, _ in _linear_modules(model):
        leaf = _leaf(name)
        if leaf in targets and leaf in _PEFT_MOE_REMAPPED:
            parent = name.rsplit(".", 2)[-2] if "." in name else ""
            # parent.leaf.weight (e.g. shared_experts.down_proj.weight) names each kind of MLP once
            # and cannot match the fused experts' 3-D parameters, which have no ".weight".
            paths.append(f"{parent}.{leaf}.weight" if parent else f"{leaf}.weight")
    return _unique(paths)


def lora_config(model: Any, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, targets: str = "all-linear") -> Any:
    """Build a peft.LoraConfig (task CAUSAL_LM) whose targets fit this model.

    On a fused-MoE model (DeepSeek V2/V3 in transformers 5) the MLP projections of the dense
    layers and shared experts are targeted through ``target_parameters`` instead of
    ``target_modules``: PEFT would otherwise rewrite those names onto the fused routed experts
    and skip the dense and shared MLPs. PEFT's parameter LoRA does not support dropout, so
    dropout is then 0. Routed experts and the router are never targeted.

    Args:
        model: the base model LoRA will wrap.
        r: adapter rank.
        alpha: LoRA scaling numerator (update scaled by alpha / r).
        dropout: dropout on the adapter input.
        targets: a lora_target_modules mode.
    """
    from peft import LoraConfig

    names = lora_target_modules(model, targets)
    parameter_targets = _fused_expert_parameter_targets(model, names)
    extra: dict[str, Any] = {}
    if parameter_targets:
        moved = {path.rsplit(".", 2)[-2] for path in parameter_targets}
        names = [name for name in names if name not in moved]
        extra["target_parameters"] = parameter_targets
        if dropout:
            logger.warning(
                "lora dropout %s set to 0: this fused-MoE model's MLP projections %s are adapted through "
                "PEFT target_parameters, which do not support dropout",
                dropout,
                sorted(moved),
            )
            dropout = 0.0
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        bias="none",  # adapters stay pure low-rank deltas, so they swap on a shared base model
        task_type="CAUSAL_LM",
        **extra,
    )


def forward_keeping_logits(model: Any, keep: Any, **inputs: Any) -> tuple[Any, bool]:
    """``model(**inputs)`` with logits only where ``keep`` says (transformers' ``logits_to_keep``: an int keeps
    the last positions, a 1-D index tensor those positions). Returns (output, True), or (output with every
    position's logits, False) for a model whose forward does not take ``logits_to_keep``."""
    try:
        return model(**inputs, logits_to_keep=keep), True
    except TypeError:  # a model without logits_to_keep
        return model(**inputs), False
