"""Serving lorad's adapters from a vLLM cluster: the file-format check and the runtime-load request.

An adapter lorad promotes (``adapters/<version>/``) is a plain PEFT LoRA folder:
``adapter_config.json`` + ``adapter_model.safetensors`` (+ lorad's ``lineage.json``, which other
loaders ignore). vLLM loads such a folder at runtime through its OpenAI server's
``POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}`` (server started with
``--enable-lora --max-lora-rank R`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and serves it as
``"model": lora_name``. Because lorad's versions are immutable, the version is the name: a name is
loaded once and never re-pointed, and the champion is whichever version the gateway routes to.

``check_adapter`` states what vLLM's LoRA loader requires of the folder (its PEFT config helper and
its tensor-name parser), without importing vLLM or torch: required config keys, no
``modules_to_save``, no DoRA, no LoRA bias, rank within the server's ``--max-lora-rank``, tensor
names ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name inside),
matching shapes, and target modules vLLM has LoRA kernels for in Llama/Qwen2/Mistral-shaped
models (DeepSeek-LLM, DeepSeek-Coder, the R1 distills).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Linear layers vLLM applies LoRA to in Llama-family decoders; q/k/v and gate/up are fused there
# (qkv_proj, gate_up_proj) but adapters name the unfused layers, as PEFT writes them.
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head"})
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the --max-lora-rank values vLLM accepts
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape"} read from a safetensors file's JSON header (no tensor data read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def parse_lora_name(name: str) -> tuple[str, str] | None:
    """(module path, "A" | "B") for a vLLM-loadable LoRA tensor name, None for any other name."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["base_model", "model"]:
        return None
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[2:-2]), parts[-2][-1]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[2:-1]), parts[-1][-1]
    return None


def check_adapter(adapter_dir: str | Path, *, max_lora_rank: int | None = None) -> list[str]:
    """Every reason vLLM's runtime loader would refuse this adapter folder (empty list: it loads).

    Args:
        adapter_dir: a PEFT LoRA folder (a lorad ``adapters/<version>/``).
        max_lora_rank: the server's ``--max-lora-rank``; None checks only that some allowed value fits.
    """
    folder = Path(adapter_dir)
    problems: list[str] = []
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        return [f"{CONFIG}: unreadable ({e})"]
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        problems.append(f"{CONFIG}: missing required key(s) {missing}")
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"{CONFIG}: peft_type is {cfg.get('peft_type')!r}; vLLM loads LORA adapters only")
    if cfg.get("modules_to_save"):
        problems.append(f"{CONFIG}: modules_to_save {cfg['modules_to_save']} is set; vLLM needs it empty")
    if cfg.get("use_dora"):
        problems.append(f"{CONFIG}: use_dora is true; vLLM does not load DoRA adapters")
    if cfg.get("bias", "none") != "none":
        problems.append(f"{CONFIG}: bias is {cfg['bias']!r}; vLLM loads LoRA bias only with --enable-lora-bias, "
                        f"lorad trains bias 'none'")
    if cfg.get("target_parameters"):
        problems.append(f"{CONFIG}: target_parameters {cfg['target_parameters'][:2]}... (parameter LoRA on fused MoE "
                        f"experts) has no vLLM loader; serve this adapter with lorad's own engine")
    r = cfg.get("r")
    if isinstance(r, int):
        ceiling = max_lora_rank if max_lora_rank is not None else VLLM_RANKS[-1]
        if r > ceiling:
            problems.append(f"{CONFIG}: r = {r} exceeds --max-lora-rank {ceiling}; start vLLM with "
                            f"--max-lora-rank {next((v for v in VLLM_RANKS if v >= r), r)} or train a smaller rank")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):   # a regular expression: vLLM matches module names against it, fine
        targets = []
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_LORA_MODULES)
    if unsupported:
        problems.append(f"{CONFIG}: target_modules {unsupported} have no LoRA layer in vLLM; keep to "
                        f"{sorted(VLLM_LORA_MODULES - {'qkv_proj', 'gate_up_proj'})}")

    weights = folder / WEIGHTS
    if not weights.is_file():
        return problems + [f"{WEIGHTS} is missing (vLLM reads safetensors, or a .bin it would unpickle)"]
    try:
        header = safetensors_header(weights)
    except (OSError, ValueError, struct.error) as e:
        return problems + [f"{WEIGHTS}: unreadable header ({e})"]
    pairs: dict[str, dict[str, list]] = {}
    for name, info in header.items():
        parsed = parse_lora_name(name)
        if parsed is None:
            problems.append(f"{WEIGHTS}: tensor {name!r} is not base_model.model.<module>.lora_A/lora_B.weight "
                            f"(an adapter name such as '.default.' inside the key breaks vLLM's parser)")
            continue
        module, ab = parsed
        if module.rsplit(".", 1)[-1] not in VLLM_LORA_MODULES:
            problems.append(f"{WEIGHTS}: tensor {name!r} adapts {module.rsplit('.', 1)[-1]!r}, which vLLM cannot adapt")
        pairs.setdefault(module, {})[ab] = info.get("shape", [])
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{WEIGHTS}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
            continue
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (isinstance(r, int) and a[0] != r):
            problems.append(f"{WEIGHTS}: {module} shapes lora_A {a}, lora_B {b} do not form a rank-{r} pair")
    if not pairs:
        problems.append(f"{WEIGHTS}: no LoRA tensors")
    return problems


def load_request(version: str, adapter_dir: str | Path) -> dict:
    """The JSON body of vLLM's ``POST /v1/load_lora_adapter`` for an immutable lorad version.

    The path must be readable by the vLLM server (shared storage or a copy at the same path).
    """
    return {"lora_name": version, "lora_path": str(Path(adapter_dir).resolve())}


def unload_request(version: str) -> dict:
    """The JSON body of vLLM's ``POST /v1/unload_lora_adapter`` (after the old version has drained)."""
    return {"lora_name": version}
