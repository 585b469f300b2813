"""Versions: which adapter lives in which LoRA slot, the champion pointer, swaps, and the registry glue.

A request is pinned to one version when it is submitted (the champion pointer at that instant, the base
model, or a named registry version) and keeps it for its whole life (reference counts). ``swap(version)``
verifies and loads the version first (``preload``: read the PEFT safetensors, copy them into a free
table slot, from the caller's thread while decoding goes on); only then it flips the champion pointer
under a lock. The previous champion stays loaded for an instant rollback, and a version the control plane
pinned (``pin``: vLLM's load_lora_adapter on a fleet replica) until it is unpinned; other versions free their
slot once no request holds them. A failed preload leaves the champion untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.engine.api import (BASE_LABEL, CHAMPION_ALIASES, AdapterUnavailable, EngineError, SwapResult,
                               UnknownModel, label)

log = logging.getLogger("lorad.engine")

_OLD = object()  # activate()'s default for `previous`: the champion being replaced


@dataclass
class _Adapter:
    version: str
    path: str
    slot: int  # LoRA table index (1..adapter_slots; 0 is the base model)
    refs: int = 0  # requests pinned to this version and not finished
    loaded_at: float = 0.0


class VersionsMixin:
    """The Engine's version management (see the module docstring); state is created by Engine.__init__."""

    @property
    def champion(self) -> str | None:
        return self._champion

    @property
    def previous(self) -> str | None:
        return self._previous

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def resolve(self, model: str | None) -> str | None:
        """Map a request's ``model`` to a version: champion aliases, 'base', or a registered version.

        Raises:
            UnknownModel: not an alias and not a registered version.
        """
        name = (model or "").strip()
        if name in CHAMPION_ALIASES:
            return self._champion
        if name == BASE_LABEL:
            return None
        with self._lock:
            if name in self._adapters:
                return name
        if self.store is not None and self.store.query_one("SELECT 1 FROM adapters WHERE version = ?", (name,)):
            return name
        raise UnknownModel(f"model {name!r} does not exist; use 'lorad' (the champion), 'base', or an adapter "
                           f"version listed by GET /v1/models")

    def preload(self, version: str | None, *, stage: bool = False) -> float:
        """Verify ``version`` and load it into the model (no-op when loaded); return the seconds it took.

        Args:
            stage: also hold it loaded until ``unstage(version)`` (or ``activate``), so that it cannot be
                unloaded as unused between this call and the swap or request that needs it.
        Raises:
            UnknownModel: the version is not in the registry.
            AdapterUnavailable: verification or loading failed (nothing changed).
        """
        if version is None:
            return 0.0
        with self._lock:
            if version in self._adapters:
                if stage:
                    self._staged[version] += 1
                return 0.0
        with self._load_lock:
            return self._preload_locked(version, stage)

    def _preload_locked(self, version: str, stage: bool) -> float:
        from daemon import registry

        t0 = time.perf_counter()
        with self._lock:  # loaded by a concurrent preload while this one waited for the load lock
            if version in self._adapters:
                if stage:
                    self._staged[version] += 1
                return 0.0
        if self.store is None or self.adapters_dir is None:
            raise AdapterUnavailable(f"adapter {version!r} requested but this engine has no registry")
        if self.store.query_one("SELECT 1 FROM adapters WHERE version = ?", (version,)) is None:
            raise UnknownModel(f"adapter version {version!r} is not in the registry; GET /v1/models lists them")
        try:
            row = registry.verify_adapter(self.store, version, base_model=self.base_model)
        except registry.AdapterError as e:
            raise AdapterUnavailable(str(e)) from e
        path = Path(row["path"]).resolve()
        if path.parent != self.adapters_dir:
            raise AdapterUnavailable(f"adapter {version}: path {path} is outside the registry folder "
                                     f"{self.adapters_dir}; refusing to load it")
        if not (path / "adapter_model.safetensors").is_file():
            raise AdapterUnavailable(f"adapter {version}: {path}/adapter_model.safetensors is missing")
        slot = self._load_into_free_slot(version, path)
        with self._lock:
            self._adapters[version] = _Adapter(version, str(path), slot, loaded_at=time.time())
            if stage:
                self._staged[version] += 1
            self._lock.notify_all()
            self._gauges()
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.adapter_preload_seconds.observe(seconds)
        log.info("adapter preloaded", extra={"version": version, "slot": slot, "seconds": round(seconds, 3)})
        return seconds

    def _load_into_free_slot(self, version: str, path: Path) -> int:
        """Read the adapter, claim a free LoRA slot and copy it in (caller's thread; decoding goes on).

        No running row reads a free slot's columns (they are multiplied by 0), so the copy needs no pause.
        """
        from daemon.engine import lora

        try:
            weights = lora.read_adapter(path, self._wrapped, self.lora_max_rank)
        except lora.AdapterFormatError as e:
            raise AdapterUnavailable(f"adapter {version}: {e}") from e
        except Exception as e:
            raise AdapterUnavailable(f"adapter {version}: reading failed: {type(e).__name__}: {e}") from e
        with self._lock:
            self._collect_locked()  # versions nobody holds give their slot back first
            if not self._free_slots:
                held = ", ".join(sorted(self._adapters))
                raise AdapterUnavailable(f"adapter {version}: all {self.adapter_slots} adapter slots hold versions "
                                         f"in use ({held}); raise serve.adapter_slots or retry when they drain")
            slot = self._free_slots.pop(0)
        try:
            lora.write_slot(self._wrapped, slot - 1, weights, self.lora_max_rank)
        except Exception as e:
            with self._lock:
                self._free_slots.append(slot)
            raise AdapterUnavailable(f"adapter {version}: copying into slot {slot} failed: "
                                     f"{type(e).__name__}: {e}") from e
        finally:
            self._release_cpu_workers()  # the caller's thread is done with torch
        return slot

    def unstage(self, version: str | None) -> None:
        """Release a ``preload(stage=True)`` hold; the version is unloaded later if nothing else keeps it."""
        with self._lock:
            if version is not None and self._staged[version] > 0:
                self._staged[version] -= 1
                if not self._staged[version]:
                    del self._staged[version]
                self._lock.notify_all()

    def pin(self, version: str) -> float:
        """Load ``version`` and keep it loaded until ``unpin`` (vLLM's load_lora_adapter); returns the load seconds.

        Pinning twice is one pin. Raises what ``preload`` raises (nothing changed then).
        """
        with self._swap_lock:
            if version in self._pinned:
                return 0.0
            seconds = self.preload(version, stage=True)
            with self._lock:
                self._pinned.add(version)
            return seconds

    def unpin(self, version: str) -> bool:
        """Let ``version`` go (vLLM's unload_lora_adapter); False when it is neither pinned nor loaded.

        Its slot is freed only once no request holds it (it drains first), and never while it is the
        champion; a previous champion stops being kept for an instant rollback.
        """
        with self._swap_lock:
            with self._lock:
                if version not in self._pinned and version not in self._adapters:
                    return False
                was_pinned = version in self._pinned
                self._pinned.discard(version)
                if self._previous == version and self._champion != version:
                    self._previous = None
                self._lock.notify_all()
            if was_pinned:
                self.unstage(version)
            return True

    def pinned(self) -> list[str]:
        with self._lock:
            return sorted(self._pinned)

    def activate(self, version: str | None, *, previous: Any = _OLD) -> SwapResult:
        """Flip the champion pointer to an already loaded ``version``; new requests are pinned to it at once.

        Args:
            previous: the version to keep loaded for rollback; by default the champion being replaced.
        Raises:
            AdapterUnavailable: ``version`` is not loaded (call ``preload`` first).
        """
        with self._lock:
            t0 = time.perf_counter()
            if version is not None and version not in self._adapters:
                raise AdapterUnavailable(f"adapter {version} is not loaded; preload it first")
            old = self._champion
            self._champion = version
            if previous is _OLD:
                previous = old if old != version else self._previous
            self._previous = previous
            seconds = time.perf_counter() - t0
            self._ready.set()  # a champion (or the base) is loaded and pointed to: requests can be served
            if self._staged[version] > 0:  # the staging hold ends here: the champion is kept anyway
                self._staged[version] -= 1
                if not self._staged[version]:
                    del self._staged[version]
            self._lock.notify_all()  # the decode thread unloads what nothing holds any more
        if self.metrics is not None:
            self.metrics.serve_champion.info({"version": label(version)})
        if old != version:
            if self.metrics is not None:
                self.metrics.adapter_swap_seconds.observe(seconds)
                self.metrics.adapter_swaps.labels(result="ok").inc()
            log.info("champion swapped", extra={"from": label(old), "to": label(version),
                                                "swap_ms": round(seconds * 1000, 3)})
        return SwapResult(old, version, 0.0, seconds)

    def swap(self, version: str | None, *, previous: Any = _OLD) -> SwapResult:
        """Preload ``version`` and make it the champion; a failed preload leaves the champion untouched.

        Args:
            previous: the version to keep loaded for rollback (loaded now, best effort); by default the
                champion being replaced.
        """
        with self._swap_lock:
            try:
                preload_seconds = self.preload(version, stage=True)
            except EngineError:
                if self.metrics is not None:
                    self.metrics.adapter_swaps.labels(result="failed").inc()
                raise
            staged_previous = previous is not _OLD and previous is not None and previous != version
            if staged_previous:
                try:  # keeping the rollback target warm is best effort: the swap itself goes ahead
                    self.preload(previous, stage=True)
                except EngineError as e:
                    log.warning("previous champion could not be preloaded",
                                extra={"version": previous, "error": str(e)})
                    previous, staged_previous = None, False
            result = self.activate(version, previous=previous)
            if staged_previous:
                self.unstage(previous)
            result.preload_seconds = preload_seconds
            return result

    def reload(self) -> SwapResult:
        """Serve whatever the registry's champion alias says now (after `lorad promote` from another process)."""
        from daemon import registry

        if self.store is None:
            return SwapResult(self._champion, self._champion, 0.0, 0.0)
        return self.swap(registry.champion(self.store), previous=self.store.get_alias(registry.PREVIOUS))

    # -- requests -----------------------------------------------------------------------------




def promote_and_swap(engine: Any, store: Any, version: str, *, reason: str, actor: str = "daemon",
                     base_model: str | None = None, eval_report: dict | None = None) -> dict:
    """Promote ``version`` in the registry and serve it: preload first, so a bad adapter changes nothing.

    Returns:
        ``{"from", "to", "preload_seconds", "swap_seconds"}``.
    Raises:
        UnknownModel / AdapterUnavailable: the version cannot be loaded (registry and engine unchanged).
        registry.AdapterError: the registry refused the promotion (engine unchanged).
    """
    from daemon import registry

    with engine._swap_lock:
        preload = engine.preload(version, stage=True)
        try:
            registry.promote(store, version, reason=reason, actor=actor, base_model=base_model,
                             eval_report=eval_report)
        except Exception:
            engine.unstage(version)
            raise
        result = engine.activate(version)
    result.preload_seconds = preload
    engine._champion_changed("promoted", result.old, result.new)
    return result.as_dict()


def rollback_and_swap(engine: Any, store: Any, *, reason: str, actor: str = "daemon") -> dict:
    """Roll the registry's champion back to the previous champion and serve it (instant when it is loaded)."""
    from daemon import registry

    with engine._swap_lock:
        target = store.get_alias(registry.PREVIOUS)
        preload = engine.preload(target, stage=True)
        try:
            moved = registry.rollback(store, reason=reason, actor=actor)
        except Exception:
            engine.unstage(target)
            raise
        if moved["to"] != target:  # the alias moved in between: serve what the registry says
            engine.unstage(target)
            preload += engine.preload(moved["to"], stage=True)
        older = store.get_alias(registry.PREVIOUS)
        result = engine.activate(moved["to"], previous=older)
    if older is not None:
        try:
            engine.preload(older)  # keeps the next rollback instant too (activate made it the kept previous)
        except EngineError as e:
            log.warning("older champion could not be preloaded", extra={"version": older, "error": str(e)})
    result.preload_seconds = preload
    engine._champion_changed("rolled_back", result.old, result.new)
    return result.as_dict()


def follow_champion(engine: Any, store: Any, version: str | None, *, reason: str, actor: str = "fleet",
                    base_model: str | None = None) -> dict:
    """Serve exactly ``version`` (None = the base model), as the control plane says: a replica's promotion and
    rollback alike. Preloaded first, so a version that fails to load changes nothing; idempotent.

    The rollback watch is not told: the control plane watches and decides for the whole fleet.
    """
    from daemon import registry

    with engine._swap_lock:
        preload = engine.preload(version, stage=True)
        try:
            moved = registry.set_champion(store, version, reason=reason, actor=actor, base_model=base_model)
        except Exception:
            engine.unstage(version)
            raise
        if not moved["changed"] and engine.champion == version:
            engine.unstage(version)
            return {"from": label(version), "to": label(version), "changed": False, "preload_seconds": preload,
                    "swap_seconds": 0.0}
        result = engine.activate(version)
    result.preload_seconds = preload
    return {**result.as_dict(), "changed": True}
