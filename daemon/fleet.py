"""The control plane of a serving fleet: every promotion and rollback reaches every replica, or none.

A change of champion goes in two phases. First every replica in ``fleet.replicas`` is told to load the version
(``POST /v1/load_lora_adapter``, vLLM's runtime LoRA API; the replica fetches the files from this daemon's
``/fleet/adapters/<version>`` and checks their sha256, or reads them from shared storage). If any replica
cannot, nothing changes anywhere: the version is unloaded again where it did load, and the refusal is recorded
with each replica's reason (a ``fleet`` event, ``lorad status``, ``lorad_fleet_changes_total``). Only when all
have it loaded does the daemon move its own registry alias and engine, then tell every replica to serve it
(``POST /admin/champion``, a pointer flip: the version is already in memory). Versions are immutable names; a
replica keeps the old champion loaded until its requests drain, and the control plane unloads versions that
are neither champion nor previous champion afterwards.

A replica that was down, restarted, or missed the flip catches up in the reconcile loop: every
``fleet.reconcile_seconds`` each replica is asked what it serves (``GET /admin/champion``) and one that is not on
the registry's champion is told to load and serve it. The same pass feeds the per-replica gauges.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from daemon import registry
from daemon.config import Config, fleet_token

log = logging.getLogger("lorad.fleet")

BASE = "base"  # how replicas name the base model
MAX_ERROR_CHARS = 500  # of a replica's answer kept in an event


class FleetRefused(registry.AdapterError):
    """A replica could not load the version: the champion did not move anywhere; the message has each reason."""


class ReplicaError(RuntimeError):
    """One call to one replica failed; the message says what it answered (or that it did not)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the replica's HTTP status; None when it did not answer


@dataclass
class Replica:
    """What the control plane last heard from one replica."""

    url: str
    up: bool = False
    ready: bool = False
    last_contact: float | None = None
    champion: str | None = None  # label: a version or "base"
    previous: str | None = None
    loaded: list = field(default_factory=list)
    pinned: list = field(default_factory=list)
    error: str | None = None


class Fleet:
    """Drives the replicas of ``cfg.fleet.replicas`` (see the module docstring).

    Args:
        cfg: the daemon's config (fleet section, admin token, base model).
        store: the daemon's state store (registry, events).
        metrics: LoradMetrics or None.
        clock: wall clock for last-contact times and events.
    """

    def __init__(self, cfg: Config, store: Any, *, metrics: Any = None, clock: Callable[[], float] = time.time):
        import httpx

        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.replicas = [Replica(url) for url in cfg.fleet.replicas]
        self._lock = threading.RLock()  # one change or reconcile pass at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(self.replicas))),
                                        thread_name_prefix="lorad-fleet")
        self._after = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorad-fleet-after")
        self._http = httpx.Client(timeout=cfg.fleet.request_timeout_seconds, follow_redirects=False,
                                  headers={"Authorization": f"Bearer {fleet_token(cfg)}"})
        self._last_catch_up_error: dict[str, str] = {}
        self._stale_pending = False  # a change's clean-up (unloading what is no longer needed) is still to run

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Fleet":
        """Start the reconcile loop (its first pass runs at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorad-fleet", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.cfg.fleet.request_timeout_seconds + 5)
        self._after.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.reconcile()
            except Exception:  # the loop must survive anything one pass meets
                log.exception("fleet reconcile pass failed")
            self._stopping.wait(self.cfg.fleet.reconcile_seconds)

    # -- changes --------------------------------------------------------------------------------

    def promote(self, version: str, apply: Callable[[], dict]) -> dict:
        """Load ``version`` on every replica; if all did, ``apply()`` (the daemon's own promotion) and flip them.

        Raises:
            FleetRefused: a replica could not load it; nothing changed (the reasons are in the message and event).
        """
        return self._change("promote", lambda: version, apply)

    def rollback(self, apply: Callable[[], dict]) -> dict:
        """Roll the whole fleet back to the registry's previous champion, the same two phases as ``promote``."""
        return self._change("rollback", lambda: self.store.get_alias(registry.PREVIOUS), apply)

    def _change(self, action: str, which: Callable[[], str | None], apply: Callable[[], dict]) -> dict:
        with self._lock:
            if self._stale_pending:  # the last change's clean-up has not run yet: free those slots first
                self._unload_stale()
                self._stale_pending = False
            t0 = time.perf_counter()
            version = which()
            failed = self._each(lambda r: self._load(r, version)) if version is not None else {}
            if failed:
                keep = {registry.champion(self.store), self.store.get_alias(registry.PREVIOUS)}
                if version not in keep:  # loaded on some replicas: let it go there again
                    self._each(lambda r: self._unload(r, version),
                               [r for r in self.replicas if r.url not in failed])
                reason = (f"{action} of {version} held back: {len(failed)} of {len(self.replicas)} replicas could not "
                          f"load it: " + "; ".join(f"{url}: {err}" for url, err in failed.items()))
                self._record(action, version, False, reason, {"failed": failed})
                raise FleetRefused(reason)
            loaded = time.perf_counter()
            result = apply()
            applied = time.perf_counter()
            target = result.get("to")
            target = None if target in (None, BASE) else target
            unsynced = self._each(lambda r: self._follow(r, target, f"{action} by the control plane"))
            seconds = round(time.perf_counter() - t0, 3)
            phases = {"load_s": round(loaded - t0, 3), "apply_s": round(applied - loaded, 3),
                      "flip_s": round(time.perf_counter() - applied, 3)}
            # Freeing the versions no longer needed waits for nothing the caller needs: it runs after the
            # answer, still under the lock, so the next change starts from a clean fleet.
            self._stale_pending = True
            self._after.submit(self._clean_up)
            if unsynced:  # the daemon moved; the reconcile loop brings these replicas along when they answer
                reason = (f"{action} to {target or BASE}: {len(unsynced)} replicas did not take the new champion yet "
                          f"(catching up): " + "; ".join(f"{u}: {e}" for u, e in unsynced.items()))
            else:
                reason = f"{action} to {target or BASE} on all {len(self.replicas)} replicas in {seconds} s"
            self._record(action, target, not unsynced, reason, {"unsynced": unsynced, "seconds": seconds, **phases})
            return {**result, "fleet": {"replicas": len(self.replicas), "unsynced": unsynced, "seconds": seconds,
                                        **phases}}

    def _clean_up(self) -> None:
        with self._lock:
            if not self._stale_pending:
                return
            self._stale_pending = False
            try:
                self._unload_stale()
            except Exception:
                log.exception("fleet clean-up failed")

    def reconcile(self) -> None:
        """Ask every replica what it serves; bring each one that is not on the champion to it (and free its stale
        versions)."""
        with self._lock:
            desired = registry.champion(self.store)
            self._each(self._check)
            behind = [r for r in self.replicas if r.up and r.champion is not None and r.champion != (desired or BASE)]
            for r in behind:
                try:
                    if desired is not None:
                        self._load(r, desired)
                    self._follow(r, desired, "catching up with the control plane")
                except ReplicaError as e:
                    r.error = str(e)
                    if self._last_catch_up_error.get(r.url) != r.error:  # one event per new reason, not per pass
                        self._last_catch_up_error[r.url] = r.error
                        self._record("catch_up", desired, False, f"{r.url} cannot catch up to {desired or BASE}: {e}",
                                     {"replica": r.url})
                    continue
                self._last_catch_up_error.pop(r.url, None)
                self._record("catch_up", desired, True, f"{r.url} caught up to {desired or BASE} (it served "
                                                        f"{r.champion})", {"replica": r.url})
                self._check(r)
            self._unload_stale(behind)

    def _unload_stale(self, replicas: list[Replica] | None = None) -> None:
        """Unload what is neither the registry's champion nor previous champion (it drains first on the replica).

        Run after a change of champion (and on a replica that just caught up), not on every pass: a version an
        operator loads by hand on one replica stays until the next change.
        """
        keep = {registry.champion(self.store), self.store.get_alias(registry.PREVIOUS)}
        for r in self.replicas if replicas is None else replicas:
            stale = [v for v in r.loaded if v not in keep and v != r.champion] if r.up else []
            for version in stale:
                try:
                    self._unload(r, version)
                except ReplicaError as e:
                    log.warning("unloading a stale version failed", extra={"replica": r.url, "version": version,
                                                                         "error": str(e)})

    # -- one replica ----------------------------------------------------------------------------

    def lora_path(self, version: str) -> str:
        """Where a replica finds ``version``: this daemon's adapter URL, or the registry folder (shared storage)."""
        if self.cfg.fleet.adapter_url:
            return f"{self.cfg.fleet.adapter_url}/fleet/adapters/{version}"
        return registry.get_adapter(self.store, version)["path"]

    def _load(self, r: Replica, version: str) -> None:
        self._post(r, "/v1/load_lora_adapter", {"lora_name": version, "lora_path": self.lora_path(version)})

    def _unload(self, r: Replica, version: str) -> None:
        try:
            self._post(r, "/v1/unload_lora_adapter", {"lora_name": version})
        except ReplicaError as e:
            if e.status != 404:  # 404: gone already, which is what unloading wanted
                raise

    def _follow(self, r: Replica, version: str | None, reason: str) -> None:
        doc = json.loads(self._post(r, "/admin/champion", {"version": version or BASE, "reason": reason}))
        self._update(r, doc.get("state") or {"champion": version or BASE})

    def _post(self, r: Replica, path: str, body: dict) -> str:
        import httpx

        try:
            resp = self._http.post(r.url + path, json=body)
        except httpx.HTTPError as e:
            r.up = False
            self._gauges(r)  # /metrics says what /status says, not only after the next poll
            raise ReplicaError(f"unreachable: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]) from None
        r.up, r.last_contact = True, self.clock()
        if resp.status_code != 200:
            raise ReplicaError(f"HTTP {resp.status_code}: {_message(resp)}"[:MAX_ERROR_CHARS], resp.status_code)
        return resp.text

    def _check(self, r: Replica) -> None:
        """Refresh what ``r`` serves and holds (GET /admin/champion) and its gauges."""
        import httpx

        try:
            resp = self._http.get(r.url + "/admin/champion", timeout=min(5.0, self.cfg.fleet.request_timeout_seconds))
            doc = resp.json() if resp.status_code == 200 else None
            r.up, r.last_contact = True, self.clock()
            if doc is None:  # up, but no engine yet (the model is loading): nothing to catch up with so far
                r.ready, r.champion = False, None
                r.error = f"HTTP {resp.status_code}: {_message(resp)}"[:MAX_ERROR_CHARS]
            else:
                self._update(r, doc)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            r.up, r.ready, r.error = False, False, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
        self._gauges(r)

    def _update(self, r: Replica, doc: dict) -> None:
        """Take a replica's own account of itself (GET /admin/champion, or the answer of POST /admin/champion)."""
        r.champion = doc["champion"]
        if "loaded" in doc:
            r.ready, r.previous = bool(doc["ready"]), doc.get("previous")
            r.loaded, r.pinned, r.error = list(doc["loaded"]), list(doc["pinned"]), None
        self._gauges(r)

    def _each(self, fn: Callable[[Replica], Any], replicas: list[Replica] | None = None) -> dict[str, str]:
        """Run ``fn`` on the replicas in parallel; return ``{url: error}`` of those where it raised ReplicaError."""
        targets = self.replicas if replicas is None else replicas
        futures = {r.url: self._pool.submit(fn, r) for r in targets}
        failed = {}
        for url, future in futures.items():
            try:
                future.result()
            except ReplicaError as e:
                failed[url] = str(e)
        return failed

    # -- views ----------------------------------------------------------------------------------

    def _record(self, action: str, version: str | None, ok: bool, reason: str, data: dict) -> None:
        (log.info if ok else log.warning)("fleet change", extra={"action": action, "version": version, "ok": ok,
                                                                 "reason": reason})
        self.store.add_event("fleet", subject=version or BASE, ok=ok, reason=reason, data={"action": action, **data})
        if self.metrics is not None:
            self.metrics.fleet_changes.labels(action, "ok" if ok else "refused").inc()

    def _gauges(self, r: Replica) -> None:
        m = self.metrics
        if m is None:
            return
        m.fleet_replica_up.labels(r.url).set(1 if r.up else 0)
        if r.last_contact is not None:
            m.fleet_replica_last_contact.labels(r.url).set(r.last_contact)
        m.fleet_replica_loaded.labels(r.url).set(len(r.loaded) if r.up else 0)
        m.fleet_replica_in_sync.labels(r.url).set(int(r.up and r.champion == (registry.champion(self.store) or BASE)))
        for labels in list(m.fleet_replica_champion._metrics):  # exactly one version series per replica
            if labels[0] == r.url and labels[1] != r.champion:
                m.fleet_replica_champion.remove(*labels)
        if r.champion is not None:
            m.fleet_replica_champion.labels(r.url, r.champion).set(1)

    def snapshot(self) -> list[dict]:
        """Each replica as plain values (for `lorad status` and GET /status)."""
        return [asdict(r) for r in self.replicas]


def _message(resp: Any) -> str:
    """A replica's error message: OpenAI's error body, vLLM's flat one, or the start of the text."""
    try:
        doc = resp.json()
    except ValueError:
        return resp.text[:MAX_ERROR_CHARS]
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if doc.get("message"):
            return str(doc["message"])
    return str(doc)[:MAX_ERROR_CHARS]
