"""Adapter registry: immutable versions with lineage, the ``champion`` alias, promotion and rollback.

An adapter version is a folder ``adapters/<version>/`` holding a standard PEFT adapter
(``adapter_model.safetensors`` + ``adapter_config.json``) and ``lineage.json`` (base model and
its hash, parent version, data snapshot, training config, metrics, per-file sha256). It becomes
visible only when complete: files are written to a temporary folder, hashed, fsynced and then
renamed into place, and the database row is inserted in one transaction after the rename. A
folder without a row (crash between the two) is swept by ``reconcile``.

Aliases: ``champion`` (what serves; NULL = the base model) and ``previous_champion`` (what
``rollback`` returns to, kept loaded by the engine for an instant flip).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.files import TMP_PREFIX, atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    from daemon.store import Store

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LINEAGE = "lineage.json"
CHAMPION, PREVIOUS = "champion", "previous_champion"
_VERSION_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class AdapterError(RuntimeError):
    """An adapter cannot be registered, verified or promoted; the message says why."""


class VersionConflict(AdapterError):
    """A version name already registered with other content: versions are immutable names."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def adapters_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "adapters"


def validate_version_name(version: str) -> str:
    """Version names become folder names: refuse anything that could escape ``adapters/``."""
    if not version or len(version) > 64 or not set(version) <= _VERSION_CHARS or version.startswith("-"):
        raise AdapterError(f"invalid adapter version {version!r}: use lowercase letters, digits and '-' "
                           f"(at most 64 characters)")
    return version


def register_adapter(store: Store, state_dir: Path, src_dir: Path, *, base_model: str,
                     base_hash: str | None = None, parent: str | None = None, snapshot_id: str | None = None,
                     run_id: str | None = None, metrics: dict | None = None, train_config: dict | None = None,
                     clock=time.time) -> str:
    """Copy a finished PEFT adapter folder into the registry as a new immutable version.

    Returns:
        The new version name, ``v0001-<sha8>`` style (sequence number + weights hash prefix).
    Raises:
        AdapterError: files missing, a pickle (.bin) adapter, or the parent is unknown.
    """
    src_dir = Path(src_dir)
    for name in ADAPTER_FILES:
        if not (src_dir / name).is_file():
            raise AdapterError(f"{src_dir} is not a complete PEFT adapter: {name} is missing "
                               f"(only safetensors adapters are accepted)")
    if parent is not None and store.query_one("SELECT 1 FROM adapters WHERE version = ?", (parent,)) is None:
        raise AdapterError(f"parent adapter {parent!r} is not in the registry")
    try:
        json.loads((src_dir / "adapter_config.json").read_text())
    except ValueError as e:
        raise AdapterError(f"{src_dir / 'adapter_config.json'} is not valid JSON: {e}") from e

    root = adapters_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    hashes = {name: sha256_file(src_dir / name) for name in ADAPTER_FILES}
    seq = store.query_one("SELECT COUNT(*) FROM adapters")[0] + 1
    version = validate_version_name(f"v{seq:04d}-{hashes['adapter_model.safetensors'][:8]}")
    lineage = {
        "version": version, "base_model": base_model, "base_hash": base_hash, "parent": parent,
        "snapshot_id": snapshot_id, "run_id": run_id, "metrics": metrics or {}, "train_config": train_config or {},
        "files": hashes, "created_at": clock(),
    }
    def write(tmp: Path) -> None:
        for name in ADAPTER_FILES:
            shutil.copyfile(src_dir / name, tmp / name)
            if sha256_file(tmp / name) != hashes[name]:
                raise AdapterError(f"copy of {name} does not match its source hash (disk error?)")
        (tmp / LINEAGE).write_text(json.dumps(lineage, indent=2, ensure_ascii=False))

    # A folder already at this name is a leftover of a crash between rename and insert: replaced.
    final = root / version
    atomic_dir(final, write)
    with store.transaction() as tx:
        tx.execute("INSERT INTO adapters (version, path, sha256, base_model, base_hash, parent, snapshot_id, run_id, "
                   "metrics, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (version, str(final), hashes["adapter_model.safetensors"], base_model, base_hash, parent,
                    snapshot_id, run_id, json.dumps(metrics or {}), lineage["created_at"]))
        store.add_event("register", subject=version, ok=True, reason=f"new adapter from run {run_id}",
                        data={"parent": parent, "snapshot_id": snapshot_id}, db=tx)
    return version


def manifest(store: Store, version: str) -> dict:
    """What a replica needs to fetch and check a version: its files with their registered sha256, and lineage.

    Raises:
        AdapterError: unknown version, or lineage.json unreadable.
    """
    row = get_adapter(store, validate_version_name(version))
    try:
        lineage = json.loads((Path(row["path"]) / LINEAGE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {version}: lineage.json unreadable: {e}") from e
    files = {name: lineage.get("files", {}).get(name) for name in ADAPTER_FILES}
    if files["adapter_model.safetensors"] != row["sha256"]:
        raise AdapterError(f"adapter {version}: lineage and database disagree on the weights hash")
    return {"version": version, "base_model": row["base_model"], "files": files, "lineage": lineage}


def import_adapter(store: Store, state_dir: Path, version: str, src_dir: Path, files: dict[str, str], *,
                   lineage: dict, clock=time.time) -> bool:
    """Register ``src_dir``'s adapter under the name another registry gave it (a replica following its daemon).

    Every file must hash to ``files[name]`` (the sha256 the daemon's registry recorded) before anything is
    visible; the copy is written and checked again inside the atomic folder. Names are immutable: the same
    name with the same weights is a no-op, with other weights a ``VersionConflict``.

    Returns:
        True when the version was added, False when it was already registered with these files.
    Raises:
        AdapterError: a file missing or not matching its sha256, a bad name, or lineage without a base model.
        VersionConflict: the name is registered with other content.
    """
    validate_version_name(version)
    known = store.query_one("SELECT sha256, path FROM adapters WHERE version = ?", (version,))
    if known is not None:
        if known["sha256"] != files.get("adapter_model.safetensors"):
            raise VersionConflict(f"adapter {version} is already registered with weights sha256 "
                                  f"{known['sha256'][:12]}…, not {str(files.get('adapter_model.safetensors'))[:12]}…; "
                                  f"versions are immutable: give new weights a new name")
        verify_adapter(store, version)  # same name, same weights: still complete and unmodified here?
        return False
    if not isinstance(lineage.get("base_model"), str) or not lineage["base_model"]:
        raise AdapterError(f"adapter {version}: its lineage names no base model")
    for name in ADAPTER_FILES:
        expected = files.get(name)
        if not isinstance(expected, str) or len(expected) != 64:
            raise AdapterError(f"adapter {version}: no sha256 given for {name}")
        if not (Path(src_dir) / name).is_file():
            raise AdapterError(f"adapter {version}: {name} is missing")
        actual = sha256_file(Path(src_dir) / name)
        if actual != expected:
            raise AdapterError(f"adapter {version}: {name} sha256 {actual[:12]}… does not match the registered "
                               f"{expected[:12]}… (corrupted or modified in transit); nothing was loaded")
    root = adapters_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    copied = {**lineage, "version": version, "files": {name: files[name] for name in ADAPTER_FILES},
              "imported_at": clock()}

    def write(tmp: Path) -> None:
        for name in ADAPTER_FILES:
            shutil.copyfile(Path(src_dir) / name, tmp / name)
            if sha256_file(tmp / name) != files[name]:
                raise AdapterError(f"copy of {name} does not match its sha256 (disk error?)")
        (tmp / LINEAGE).write_text(json.dumps(copied, indent=2, ensure_ascii=False))

    final = root / version
    atomic_dir(final, write)
    def text(key: str) -> str | None:  # the lineage came from another machine: only plain values reach a column
        value = lineage.get(key)
        return value[:256] if isinstance(value, str) else None

    parent = text("parent")
    if parent is not None and store.query_one("SELECT 1 FROM adapters WHERE version = ?", (parent,)) is None:
        parent = None  # the lineage file keeps it; the column only links versions this registry holds
    metrics = lineage.get("metrics") if isinstance(lineage.get("metrics"), dict) else {}
    created = lineage.get("created_at")
    created = float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else clock()
    with store.transaction() as tx:
        tx.execute("INSERT INTO adapters (version, path, sha256, base_model, base_hash, parent, snapshot_id, run_id, "
                   "metrics, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (version, str(final), files["adapter_model.safetensors"], lineage["base_model"],
                    text("base_hash"), parent, text("snapshot_id"), text("run_id"),
                    json.dumps(metrics, default=str), created))
        store.add_event("register", subject=version, ok=True, reason="imported from the control plane",
                        data={"parent": lineage.get("parent")}, db=tx)
    return True


def set_champion(store: Store, version: str | None, *, reason: str, actor: str = "fleet",
                 base_model: str | None = None) -> dict:
    """Point the champion at exactly ``version`` (None = the base model), as the control plane says.

    Unlike ``promote`` it is idempotent (already the champion: nothing changes) and accepts the base model,
    so a replica can follow a promotion or a rollback alike. The old champion becomes ``previous_champion``.
    """
    if version is not None:
        verify_adapter(store, version, base_model=base_model)
    with store.transaction() as tx:
        old = tx.execute("SELECT version FROM aliases WHERE name = ?", (CHAMPION,)).fetchone()
        old_version = old["version"] if old else None
        if old is not None and old_version == version:
            return {"from": old_version, "to": version, "changed": False}
        store.set_alias(PREVIOUS, old_version, reason=f"replaced by {version or 'base'}", actor=actor, db=tx)
        store.set_alias(CHAMPION, version, reason=reason, actor=actor, db=tx)
        store.add_event("promote", subject=version, ok=True, reason=reason, actor=actor,
                        data={"from": old_version, "to": version}, db=tx)
    return {"from": old_version, "to": version, "changed": True}


def reconcile(store: Store, state_dir: Path) -> list[str]:
    """Remove adapter folders that never got a database row (crash mid-registration); return them."""
    root = adapters_dir(state_dir)
    if not root.is_dir():
        return []
    known = {r["version"] for r in store.query("SELECT version FROM adapters")}
    removed = []
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) or (p.is_dir() and p.name not in known):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def get_adapter(store: Store, version: str) -> dict:
    row = store.query_one("SELECT * FROM adapters WHERE version = ?", (version,))
    if row is None:
        raise AdapterError(f"unknown adapter version {version!r}; `lorad adapters` lists them")
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"] or "{}")
    d["eval_report"] = json.loads(d["eval_report"]) if d["eval_report"] else None
    return d


def verify_adapter(store: Store, version: str, *, base_model: str | None = None) -> dict:
    """Check that a version is complete, unmodified and made for this base model; return its row.

    Raises:
        AdapterError: naming the first problem (missing file, hash mismatch, wrong base, pickle files).
    """
    row = get_adapter(store, validate_version_name(version))
    path = Path(row["path"])
    if not path.is_dir():
        raise AdapterError(f"adapter {version}: folder {path} is missing")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth"))
    if pickles:
        raise AdapterError(f"adapter {version}: refusing pickle files {pickles}; only safetensors are loaded")
    try:
        lineage = json.loads((path / LINEAGE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {version}: lineage.json unreadable: {e}") from e
    for name in ADAPTER_FILES:
        f = path / name
        if not f.is_file():
            raise AdapterError(f"adapter {version}: {name} is missing")
        actual = sha256_file(f)
        if actual != lineage.get("files", {}).get(name):
            raise AdapterError(f"adapter {version}: {name} sha256 {actual[:12]}… does not match the registered "
                               f"{str(lineage.get('files', {}).get(name))[:12]}… (file corrupted or modified)")
    if lineage["files"]["adapter_model.safetensors"] != row["sha256"]:
        raise AdapterError(f"adapter {version}: lineage and database disagree on the weights hash")
    if base_model is not None and row["base_model"] != base_model:
        raise AdapterError(f"adapter {version} was trained on base model {row['base_model']!r}, "
                           f"but this lorad serves {base_model!r}")
    return row


def champion(store: Store) -> str | None:
    return store.get_alias(CHAMPION)


def promote(store: Store, version: str, *, reason: str, actor: str = "daemon", base_model: str | None = None,
            eval_report: dict | None = None) -> dict:
    """Verify ``version`` and make it the champion; the old champion becomes ``previous_champion``.

    Returns:
        ``{"from": old, "to": version}``.
    """
    verify_adapter(store, version, base_model=base_model)
    with store.transaction() as tx:
        old = tx.execute("SELECT version FROM aliases WHERE name = ?", (CHAMPION,)).fetchone()
        old_version = old["version"] if old else None
        if old_version == version:
            raise AdapterError(f"adapter {version} is already the champion")
        if eval_report is not None:
            tx.execute("UPDATE adapters SET eval_report = ? WHERE version = ?", (json.dumps(eval_report), version))
        store.set_alias(PREVIOUS, old_version, reason=f"replaced by {version}", actor=actor, db=tx)
        store.set_alias(CHAMPION, version, reason=reason, actor=actor, db=tx)
        store.add_event("promote", subject=version, ok=True, reason=reason, actor=actor,
                        data={"from": old_version, "to": version}, db=tx)
    return {"from": old_version, "to": version}


def rollback(store: Store, *, reason: str, actor: str = "daemon") -> dict:
    """Point the champion back at the previous champion (which the engine keeps loaded).

    Raises:
        AdapterError: when there is nothing to roll back to.
    """
    with store.transaction() as tx:
        cur = tx.execute("SELECT version FROM aliases WHERE name = ?", (CHAMPION,)).fetchone()
        prev = tx.execute("SELECT version FROM aliases WHERE name = ?", (PREVIOUS,)).fetchone()
        if cur is None or prev is None:
            raise AdapterError("nothing to roll back to: no promotion has happened yet")
        current, target = cur["version"], prev["version"]
        # The new "previous" is whatever the target itself replaced, so repeated rollbacks walk back in time.
        before = tx.execute("SELECT data FROM events WHERE kind = 'promote' AND subject IS ? ORDER BY id DESC LIMIT 1",
                            (target,)).fetchone() if target is not None else None
        older = json.loads(before["data"]).get("from") if before else None
        store.set_alias(CHAMPION, target, reason=f"rollback: {reason}", actor=actor, db=tx)
        store.set_alias(PREVIOUS, older, reason=f"rollback from {current}", actor=actor, db=tx)
        store.add_event("rollback", subject=current, ok=True, reason=reason, actor=actor,
                        data={"from": current, "to": target}, db=tx)
    return {"from": current, "to": target}


def list_adapters(store: Store) -> list[dict[str, Any]]:
    """Every version with lineage, newest first, flagging champion and previous champion."""
    champ, prev = store.get_alias(CHAMPION), store.get_alias(PREVIOUS)
    out = []
    for row in store.query("SELECT * FROM adapters ORDER BY created_at DESC, version DESC"):
        d = dict(row)
        d["metrics"] = json.loads(d["metrics"] or "{}")
        d["eval_report"] = json.loads(d["eval_report"]) if d["eval_report"] else None
        d["champion"] = d["version"] == champ
        d["previous_champion"] = d["version"] == prev
        out.append(d)
    return out
