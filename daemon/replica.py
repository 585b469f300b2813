"""The replica side of a serving fleet: vLLM's runtime LoRA API on every `lorad serve`.

``load(daemon, name, lora_path)`` finds the adapter's files (a folder under ``fleet.local_adapter_roots``,
or ``<fleet.control_plane>/fleet/adapters/<name>`` fetched over HTTP), checks every file against the sha256
the daemon's registry recorded, imports it into this replica's own registry under the same immutable name,
and pins it in the engine: it is loaded into a free LoRA slot while the current champion keeps serving.
``unload`` lets it go; its slot is freed once the requests pinned to it have drained. Which loaded version
serves ``model="lorad"`` is set separately (``engine.follow_champion``), only after every replica has loaded
it. Everything the sender controls is bounded: the name (the registry's version names), the path (under a
configured root or the control plane's URL), the bytes read, and the time a load may take.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from daemon import registry
from daemon.config import fleet_token

MAX_PATH_CHARS = 4096
MAX_MANIFEST_BYTES = 1 << 20  # the manifest carries lineage.json: a few KiB in practice


class LoadRefused(Exception):
    """A load or unload the replica refuses; ``status`` and ``code`` are what the HTTP answer carries."""

    def __init__(self, status: int, message: str, code: str = "invalid_lora_request"):
        super().__init__(message)
        self.status, self.code = status, code


_load_lock = threading.Lock()  # one load at a time per process: two loads of one name must not race


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise LoadRefused(400, "lora_name is required: the adapter version, e.g. 'v0003-abcd1234'")
    try:
        return registry.validate_version_name(name)
    except registry.AdapterError as e:
        raise LoadRefused(400, str(e)) from None


def load(daemon: Any, name: Any, lora_path: Any) -> str:
    """Import (when new) and pin one version; returns vLLM's success message.

    Raises:
        LoadRefused: with the HTTP status: 400 bad name/path, sha256 mismatch or immutable-name conflict,
            404 nothing there, 413 too large, 429 another load is running, 503 engine not ready, 504 too slow.
    """
    from daemon.engine import EngineError

    name = check_name(name)
    if not isinstance(lora_path, str) or not lora_path or len(lora_path) > MAX_PATH_CHARS:
        raise LoadRefused(400, f"lora_path is required: a folder or the control plane's adapter URL (at most "
                               f"{MAX_PATH_CHARS} characters)")
    engine = getattr(daemon, "engine", None)
    if engine is None or daemon.store is None:
        raise LoadRefused(503, "the model is still loading; retry when GET /readyz answers 200", "model_not_ready")
    cfg = daemon.cfg.fleet
    if not _load_lock.acquire(timeout=cfg.download_timeout_seconds):
        raise LoadRefused(429, "another adapter load is still running; retry", "load_busy")
    try:
        deadline = time.monotonic() + cfg.download_timeout_seconds
        if lora_path.startswith(("http://", "https://")):
            _import_from_url(daemon, name, lora_path, deadline)
        else:
            _import_from_folder(daemon, name, lora_path)
        if name in engine.pinned():
            return f"Success: LoRA adapter '{name}' is already loaded."
        try:
            engine.pin(name)
        except EngineError as e:
            raise LoadRefused(e.status if e.status != 503 else 409, str(e), e.code) from None
    finally:
        _load_lock.release()
    return f"Success: LoRA adapter '{name}' added successfully."


def unload(daemon: Any, name: Any) -> str:
    """Unpin one version; it leaves memory once its requests drain. The champion cannot be unloaded."""
    name = check_name(name)
    engine = getattr(daemon, "engine", None)
    if engine is None:
        raise LoadRefused(503, "the model is still loading; retry when GET /readyz answers 200", "model_not_ready")
    if engine.champion == name:
        raise LoadRefused(400, f"LoRA adapter '{name}' is the champion; the control plane moves the champion to "
                               f"another version before unloading it", "adapter_is_champion")
    if not engine.unpin(name):
        raise LoadRefused(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    return f"Success: LoRA adapter '{name}' removed successfully."


# -- sources ---------------------------------------------------------------------------------------


def _import(daemon: Any, name: str, src: Path, files: dict, lineage: dict) -> None:
    base = daemon.cfg.model.base_model
    if lineage.get("base_model") != base:
        raise LoadRefused(400, f"adapter {name} was trained on base model {lineage.get('base_model')!r}, but this "
                               f"replica serves {base!r}")
    try:
        registry.import_adapter(daemon.store, daemon.state_dir, name, src, files, lineage=lineage)
    except registry.AdapterError as e:
        raise LoadRefused(400, str(e), "version_conflict" if isinstance(e, registry.VersionConflict)
                          else "adapter_refused") from None


def _known(daemon: Any, name: str, files: dict) -> bool:
    """True when ``name`` is registered here with these weights (no need to read the files again)."""
    row = daemon.store.query_one("SELECT sha256 FROM adapters WHERE version = ?", (name,))
    if row is None:
        return False
    if row["sha256"] != files.get("adapter_model.safetensors"):
        raise LoadRefused(400, f"adapter {name} is already registered here with other weights (sha256 "
                               f"{row['sha256'][:12]}…); versions are immutable names", "version_conflict")
    return True


def _import_from_folder(daemon: Any, name: str, lora_path: str) -> None:
    roots = [Path(r).resolve() for r in daemon.cfg.fleet.local_adapter_roots]
    if not roots:
        raise LoadRefused(400, "local lora_path folders are refused here: set fleet.local_adapter_roots to the "
                               "shared adapters folder, or let the control plane send its adapter URL")
    path = Path(lora_path)
    if not path.is_absolute():
        raise LoadRefused(400, f"lora_path {lora_path!r} must be an absolute folder")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise LoadRefused(404, f"No adapter found for {lora_path}", "NotFoundError") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise LoadRefused(400, f"lora_path {lora_path!r} is outside fleet.local_adapter_roots")
    lineage_file = real / registry.LINEAGE
    for f in (registry.LINEAGE, *registry.ADAPTER_FILES):  # plain files only: no link out of the root, no FIFO
        try:
            regular = stat.S_ISREG(os.lstat(real / f).st_mode)
        except OSError:
            regular = False
        if not regular:
            raise LoadRefused(404 if not (real / f).exists() else 400,
                              f"No adapter found for {lora_path}: {f} is missing or not a regular file (links are "
                              f"not followed)", "NotFoundError" if not (real / f).exists() else "adapter_refused")
    try:
        if lineage_file.stat().st_size > MAX_MANIFEST_BYTES:
            raise LoadRefused(413, f"{lineage_file} is larger than {MAX_MANIFEST_BYTES} bytes")
        lineage = json.loads(lineage_file.read_text(encoding="utf-8"))
        sizes = sum((real / f).stat().st_size for f in registry.ADAPTER_FILES)
    except (OSError, ValueError) as e:
        raise LoadRefused(404, f"No adapter found for {lora_path}: a registered version folder holds "
                               f"{', '.join(registry.ADAPTER_FILES)} and {registry.LINEAGE} ({e})",
                          "NotFoundError") from None
    if not isinstance(lineage, dict) or not isinstance(lineage.get("files"), dict):
        raise LoadRefused(400, f"{lineage_file} does not list the files' sha256")
    if sizes > daemon.cfg.fleet.max_adapter_bytes:
        raise LoadRefused(413, f"adapter {name} has {sizes} bytes; fleet.max_adapter_bytes is "
                               f"{daemon.cfg.fleet.max_adapter_bytes}", "adapter_too_large")
    files = {f: lineage["files"].get(f) for f in registry.ADAPTER_FILES}
    if not _known(daemon, name, files):
        _import(daemon, name, real, files, lineage)


def adapter_url(control_plane: str, name: str) -> str:
    return f"{control_plane}/fleet/adapters/{name}"


def _import_from_url(daemon: Any, name: str, url: str, deadline: float) -> None:
    import httpx

    cfg = daemon.cfg.fleet
    if not cfg.control_plane:
        raise LoadRefused(400, "lora_path URLs are refused here: set fleet.control_plane to the daemon's URL")
    if url != adapter_url(cfg.control_plane, name):
        raise LoadRefused(400, f"lora_path {url!r} must be {adapter_url(cfg.control_plane, name)!r}: this replica "
                               f"fetches adapters only from its control plane (fleet.control_plane)")
    headers = {"Authorization": f"Bearer {fleet_token(daemon.cfg)}"}
    timeout = httpx.Timeout(min(30.0, cfg.download_timeout_seconds))
    try:
        with httpx.Client(timeout=timeout, headers=headers, follow_redirects=False) as http:
            _fetch(daemon, http, name, url, deadline)
    except httpx.HTTPError as e:
        raise LoadRefused(502, f"fetching {url} failed: {type(e).__name__}: {e}", "control_plane_unreachable") from None


def _fetch(daemon: Any, http: Any, name: str, url: str, deadline: float) -> None:
    cfg = daemon.cfg.fleet
    raw = _get(http, url, MAX_MANIFEST_BYTES, deadline)
    try:
        doc = json.loads(raw)
        files = {f: doc["files"][f] for f in registry.ADAPTER_FILES}
        lineage = doc["lineage"]
        if doc["version"] != name or not isinstance(lineage, dict):
            raise TypeError("wrong version or lineage")
    except (ValueError, KeyError, TypeError):
        raise LoadRefused(502, f"the control plane's manifest of {name} is malformed", "bad_manifest") from None
    if _known(daemon, name, files):
        return
    from pipelines.files import TMP_PREFIX

    root = registry.adapters_dir(daemon.state_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}.fetch-", dir=root))  # swept at startup after a crash
    try:
        budget = cfg.max_adapter_bytes
        for f in registry.ADAPTER_FILES:
            budget -= _download(http, f"{url}/{f}", tmp / f, budget, deadline, files[f], name)
        _import(daemon, name, tmp, files, lineage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _get(http: Any, url: str, limit: int, deadline: float) -> bytes:
    out = bytearray()
    with _stream(http, url) as r:
        for chunk in r.iter_bytes():
            out += chunk
            if len(out) > limit:
                raise LoadRefused(413, f"{url} answered more than {limit} bytes", "adapter_too_large")
            _check_deadline(deadline, url)
    return bytes(out)


def _download(http: Any, url: str, dest: Path, budget: int, deadline: float, expected: str, name: str) -> int:
    """Stream ``url`` into ``dest`` within ``budget`` bytes and the deadline; check its sha256; return its size."""
    import hashlib

    h, size = hashlib.sha256(), 0
    with _stream(http, url) as r, open(dest, "wb") as out:
        declared = r.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > budget:
            raise LoadRefused(413, f"adapter {name} is larger than fleet.max_adapter_bytes", "adapter_too_large")
        for chunk in r.iter_bytes():
            size += len(chunk)
            if size > budget:
                raise LoadRefused(413, f"adapter {name} is larger than fleet.max_adapter_bytes", "adapter_too_large")
            _check_deadline(deadline, url)
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != expected:
        raise LoadRefused(400, f"adapter {name}: {dest.name} arrived with sha256 {h.hexdigest()[:12]}…, but the "
                               f"registry recorded {str(expected)[:12]}… (corrupted in storage or in transit); "
                               f"nothing was loaded", "sha256_mismatch")
    return size


class _stream:
    """``http.stream('GET', url)`` with the control plane's refusals turned into LoadRefused."""

    def __init__(self, http: Any, url: str):
        self.http, self.url, self._cm = http, url, None

    def __enter__(self) -> Any:
        import httpx

        try:
            self._cm = self.http.stream("GET", self.url)
            r = self._cm.__enter__()
        except httpx.HTTPError as e:
            raise LoadRefused(502, f"cannot reach the control plane at {self.url}: {type(e).__name__}: {e}",
                              "control_plane_unreachable") from None
        if r.status_code != 200:
            self._cm.__exit__(None, None, None)
            status = 404 if r.status_code == 404 else 502
            raise LoadRefused(status, f"the control plane answered {r.status_code} for {self.url}",
                              "NotFoundError" if status == 404 else "control_plane_refused")
        return r

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def _check_deadline(deadline: float, url: str) -> None:
    if time.monotonic() > deadline:
        raise LoadRefused(504, f"fetching {url} took longer than fleet.download_timeout_seconds", "load_timeout")
