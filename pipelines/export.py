"""Exports of an adapter version: a merged full model, a bitsandbytes 4-bit model, an ONNX graph.

Every export starts from the same place: the base model in 16 (or 32) bits with the version's LoRA
weights merged into it (``W + B @ A * alpha / r``), so the result needs neither PEFT nor lorad:

  merged  safetensors + config + tokenizer in ``dtype`` (float16 by default); loads with plain
          ``AutoModelForCausalLM.from_pretrained(DIR)``.
  bnb4    the merged weights quantized by bitsandbytes to NF4 with double quantization (the QLoRA
          format) and serialized by transformers; loads with plain ``from_pretrained(DIR)`` where
          bitsandbytes is installed. Embeddings, the LM head and norms stay in ``dtype``.
  onnx    the merged model in float32 exported with ``torch.onnx.export`` (the dynamo exporter):
          ``model.onnx`` + ``model.onnx.data`` (external weights, so models over 2 GiB work), inputs
          ``input_ids`` and ``attention_mask`` [batch, sequence] (int64), output ``logits``
          [batch, sequence, vocab]. The graph carries no KV cache: each decoding step re-reads the
          whole sequence. ``OnnxCausalLM`` runs it with onnxruntime (greedy decoding, losses).

GPTQ and GGUF are not offered: see the README's "Exports" section for why.

Each export is written to a temporary folder next to the target and renamed into place, so a
crash leaves no half export; ``lorad-export.json`` in it records the source version, the adapter's
sha256, the settings, the sizes and the time taken. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.data import IGNORE_INDEX
from pipelines.files import atomic_dir

FORMATS = ("merged", "bnb4", "onnx")
MERGED_DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "lorad-export.json"
ONNX_FILE = "model.onnx"


class ExportError(RuntimeError):
    """An export cannot be made; the message says why and what to do."""


@dataclass
class ExportResult:
    """What an export wrote (also saved as ``lorad-export.json`` inside the export folder)."""

    format: str
    path: str
    version: str | None
    base_model: str
    dtype: str
    bytes_total: int                 # every file in the folder
    bytes_weights: int               # *.safetensors / *.onnx / *.onnx.data only
    seconds: float
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers


def folder_bytes(path: Path) -> tuple[int, int]:
    """(all files, weight files) sizes in bytes of an export folder."""
    total = weights = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            n = p.stat().st_size
            total += n
            if p.name.endswith((".safetensors", ".onnx", ".onnx.data")):
                weights += n
    return total, weights


def _atomic_folder(final: Path, write: Callable[[Path], dict], *, force: bool) -> dict:
    """Run ``write(tmp)`` in a fresh temp folder beside ``final`` and rename it into place."""
    final = Path(final)
    if final.exists() and not force:
        raise ExportError(f"export folder {final} already exists; remove it, choose another --out, or pass --force")
    return atomic_dir(final, write)


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in MERGED_DTYPES:
        raise ExportError(f"export dtype must be one of {list(MERGED_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def merged_model(base_source: Path | str, adapter_dir: Path | None, *, dtype: str = "float16",
                 trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load the base model on CPU in ``dtype``, merge the LoRA adapter into it; return (model, tokenizer).

    ``adapter_dir`` None returns the base model itself (useful as a reference). The returned model is
    a plain transformers model: no PEFT wrapper, no quantization config, eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_source), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(base_source), dtype=torch_dtype, device_map={"": "cpu"},
                                                     trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ExportError(f"loading the base model {str(base_source)!r} for export failed "
                          f"({type(exc).__name__}: {exc}); run `lorad model prepare` first") from exc
    if getattr(model.config, "quantization_config", None) is not None:
        raise ExportError(f"base model {str(base_source)!r} is stored quantized; exports merge LoRA weights into a "
                          f"16/32-bit base, so point model.base_model at an unquantized checkpoint")
    if adapter_dir is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        # safe_merge: refuse (instead of writing) weights that turn NaN/inf after the merge.
        model = peft_model.merge_and_unload(safe_merge=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _save_hf(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


# ----------------------------------------------------------------------------- the three formats


def _export_merged(model: Any, tokenizer: Any, out: Path, dtype: str) -> dict:
    _save_hf(model, tokenizer, out)
    return {"loader": "transformers.AutoModelForCausalLM.from_pretrained(DIR)", "merged_dtype": dtype}


def _export_bnb4(model: Any, tokenizer: Any, out: Path, dtype: str, device: str) -> dict:
    """Quantize the merged model to NF4 by reloading it through bitsandbytes, then serialize it."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes
    except Exception as exc:  # ImportError or a broken native library
        raise ExportError(f"format 'bnb4' needs bitsandbytes, which failed to import ({exc}); "
                          "install it with `pip install 'bitsandbytes>=0.49'`") from exc
    # On CPU bitsandbytes computes in float32 (fp16 matmuls are slow or missing there); the compute dtype
    # is only a loading default, a GPU user can pass another BitsAndBytesConfig when loading.
    compute = "float32" if device == "cpu" else ("bfloat16" if dtype == "float32" else dtype)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, compute),
                             bnb_4bit_quant_storage=torch.uint8)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".bnb4-src-") as src:
        # bitsandbytes quantizes while loading, so the merged weights go through disk once.
        _save_hf(model, tokenizer, Path(src))
        try:
            quantized = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb,
                                                             dtype=getattr(torch, dtype), device_map={"": device})
        except Exception as exc:
            raise ExportError(f"bitsandbytes {bitsandbytes.__version__} could not quantize the merged model on "
                              f"{device} ({type(exc).__name__}: {exc}); use a CUDA machine or format 'merged'") from exc
        quantized.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    n4 = sum(1 for m in quantized.modules() if type(m).__name__ == "Linear4bit")
    return {"loader": "transformers.AutoModelForCausalLM.from_pretrained(DIR) (needs bitsandbytes)",
            "quantization": "nf4, double quantization", "bnb_4bit_compute_dtype": compute,
            "bitsandbytes_version": bitsandbytes.__version__, "linear4bit_layers": n4,
            "kept_in_dtype": "embeddings, lm_head, norms", "quantized_on": device}


class _LogitsOnly:
    """Factory for the module the ONNX exporter traces: (input_ids, attention_mask) -> logits."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return LogitsOnly(model)


def _export_onnx(model: Any, tokenizer: Any, out: Path, max_seq_len: int) -> dict:
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"format 'onnx' needs the packages onnx and onnxscript ({exc}); "
                          "install them with `pip install onnx onnxscript onnxruntime`") from exc
    model = model.float()   # onnxruntime's CPU kernels are fastest and complete in float32
    wrapper = _LogitsOnly.wrap(model).eval()
    probe = tokenizer(["Hello", "What does a contract need to be valid?"], return_tensors="pt", padding=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=2, max=max(4, max_seq_len))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.onnx.export(wrapper, (probe["input_ids"], probe["attention_mask"]), dynamo=True,
                                        input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                        # onnxruntime applies its own graph optimizations when it loads the
                                        # model; the exporter's optimizer pass adds minutes on a 2-core CPU.
                                        dynamic_shapes=shapes, optimize=False, verbose=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for this {model.config.model_type} model "
                              f"({type(exc).__name__}: {str(exc)[:500]}); use format 'merged'") from exc
        program.save(str(out / ONNX_FILE), external_data=True)
        reference = wrapper(probe["input_ids"], probe["attention_mask"]).float().numpy()
    model.config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # Parity on the probe: what the exported graph computes against PyTorch, recorded with the export.
    runner = OnnxCausalLM(out)
    got = runner.logits(probe["input_ids"].numpy(), probe["attention_mask"].numpy())
    mask = probe["attention_mask"].numpy().astype(bool)
    diff = float(abs(got - reference)[mask].max())
    return {"runtime": "onnxruntime", "opset": _opset(out / ONNX_FILE), "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"], "kv_cache": False, "weights_dtype": "float32",
            "parity_max_abs_logit_diff": diff, "max_sequence": max(4, max_seq_len)}


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


# ----------------------------------------------------------------------------- entry points


def export_model(base_source: Path | str, adapter_dir: Path | None, out: Path, fmt: str, *,
                 version: str | None = None, base_model: str = "", adapter_sha256: str | None = None,
                 dtype: str = "float16", device: str = "cpu", max_seq_len: int = 4096,
                 trust_remote_code: bool = False, force: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> ExportResult:
    """Merge ``adapter_dir`` into the base model and write it to ``out`` in format ``fmt``.

    Args:
        base_source: the resolved base model (local directory or hub id), as resolve_base_model returns.
        adapter_dir: a PEFT adapter folder; None exports the base model alone.
        fmt: "merged", "bnb4" or "onnx".
        dtype: weights dtype of "merged" and of the unquantized parts of "bnb4" (ONNX is always float32).
        device: where bitsandbytes quantizes ("cpu" or "cuda").
        max_seq_len: longest sequence the ONNX graph accepts.
        force: replace an existing export folder.

    Raises:
        ExportError: unknown format, missing libraries, a failed load, quantization or export.
    """
    if fmt not in FORMATS:
        raise ExportError(f"export format must be one of {list(FORMATS)}, got {fmt!r}")
    _torch_dtype(dtype)
    out = Path(out)
    started = clock()

    def write(tmp: Path) -> dict:
        model, tokenizer = merged_model(base_source, adapter_dir, dtype="float32" if fmt == "onnx" else dtype,
                                        trust_remote_code=trust_remote_code)
        if fmt == "merged":
            details = _export_merged(model, tokenizer, tmp, dtype)
        elif fmt == "bnb4":
            details = _export_bnb4(model, tokenizer, tmp, dtype, device)
        else:
            details = _export_onnx(model, tokenizer, tmp, max_seq_len)
        total, weights = folder_bytes(tmp)
        result = ExportResult(format=fmt, path=str(out), version=version, base_model=base_model or str(base_source),
                              dtype="float32" if fmt == "onnx" else dtype, bytes_total=total, bytes_weights=weights,
                              seconds=round(clock() - started, 2),
                              files=sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [MANIFEST],
                              details=details)
        manifest = {**result.to_dict(), "adapter_sha256": adapter_sha256, "created_at": time.time(),
                    "versions": _library_versions()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return result.to_dict()

    return ExportResult(**_atomic_folder(out, write, force=force))


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lorad", "torch", "transformers", "peft", "bitsandbytes", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- running an ONNX export


class OnnxCausalLM:
    """An ONNX export run with onnxruntime: logits, greedy decoding and per-example losses."""

    def __init__(self, folder: Path | str, *, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        path = self.folder / ONNX_FILE
        if not path.is_file():
            raise ExportError(f"{self.folder} holds no {ONNX_FILE}; export one with `lorad export VERSION --format onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """[batch, sequence, vocab] float32 logits of int64 [batch, sequence] inputs (numpy)."""
        import numpy as np

        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(["logits"], feed)[0]

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (the whole sequence is re-run each step: no KV cache)."""
        import numpy as np

        ids = list(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            x = np.asarray([ids], dtype=np.int64)
            nxt = int(self.logits(x, np.ones_like(x))[0, -1].argmax())
            new.append(nxt)
            ids.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
        return new

    def example_losses(self, examples: list[dict], *, batch_size: int = 8, pad_id: int = 0) -> list[float]:
        """Mean next-token loss over each example's labelled tokens (as pipelines.evaluate.example_losses)."""
        import math

        import numpy as np

        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        losses = [math.nan] * len(examples)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(examples[i]["input_ids"]) for i in idx)
            ids = np.full((len(idx), width), pad_id, dtype=np.int64)
            labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                n = len(examples[i]["input_ids"])
                ids[j, :n], labels[j, :n], mask[j, :n] = examples[i]["input_ids"], examples[i]["labels"], 1
            logits = self.logits(ids, mask)[:, :-1].astype(np.float64)
            target = labels[:, 1:]
            top = logits.max(-1, keepdims=True)
            lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
            picked = np.take_along_axis(logits, np.where(target == IGNORE_INDEX, 0, target)[..., None], -1)[..., 0]
            tok = np.where(target == IGNORE_INDEX, 0.0, lse - picked)
            counts = (target != IGNORE_INDEX).sum(1)
            for j, i in enumerate(idx):
                losses[i] = float(tok[j].sum() / counts[j]) if counts[j] > 0 else math.nan
        return losses
