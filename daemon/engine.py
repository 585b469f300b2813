"""Inference engine: one base model, named PEFT adapters, per-request version pinning, hot-swap with drain.

A request is pinned to one version when it is submitted (the champion pointer at that instant, the
base model, or a named registry version) and keeps it for its whole life. One decode thread owns the
model: between decode steps it runs queued commands (adapter loads and unloads), admits waiting
requests (each prompt is prefilled alone), then advances every running request by one token
(continuous batching: requests join and leave between steps).

Batch invariance (``batch_invariant=True``, the default). The greedy output of a request is
bit-for-bit the output it would get alone, whatever else runs at the same time:
  * every decode step runs the model on exactly ``max_batch_size`` rows (idle rows are padding),
    because BLAS kernels (MKL, cuBLAS) pick their reduction order from the matrix shape, so the
    same row gives different low bits in a batch of 3 than in a batch of 8;
  * each row attends only to its own KV cache (a custom attention function, below): no padding
    mask ever changes the length of a softmax;
  * rows of different versions run in separate forwards, because PEFT's mixed-adapter path
    (``adapter_names``) runs each adapter's LoRA matmul on the sub-batch of its rows, whose size
    depends on the companions.
The price is decode compute for ``max_batch_size`` rows even when fewer run (on a memory-bound CPU a
lone request decodes ~2x slower). ``batch_invariant=False`` decodes only the running rows, all
versions mixed in one forward (PEFT ``adapter_names``): faster at low load and while an old
champion drains, but outputs then equal lone requests only up to float rounding (greedy ties).
Prompts are always prefilled alone, so the first token never depends on other requests.

Swap. ``swap(version)`` verifies and loads the version first (``preload``); only then it flips the
champion pointer under a lock (the measured ``swap`` time). Requests already pinned to the old version
finish on it (reference counts); the previous champion stays loaded for an instant rollback; older
versions are unloaded once no request holds them. A failed preload leaves the champion untouched.

Slots. PEFT adapters are named slots ("lorad-slot-000000", ...), and a version occupies one slot while loaded.
Unloading a version only frees its slot. Loading a version into a free slot whose LoRA tensors have
exactly the same names and shapes (same rank and targets, the usual case for successive lorad runs)
copies the weights in place with PEFT's hot-swap (``peft.utils.hotswap``), from the caller's thread,
while decoding goes on: no row uses a free slot, and the module tree does not change. Only a version
that fits no free slot makes a new one with ``load_adapter``, which changes the module tree and so
runs in the decode thread between steps (a pause of a fraction of a second per new slot).

torch, transformers and peft are imported inside functions: ``lorad --help`` stays instant.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("lorad.engine")

ATTN_IMPLEMENTATION = "lorad_engine"
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
BASE_LABEL = "base"  # what clients send and see for the base model
CHAMPION_ALIASES = ("", "lorad", "champion")
# Prompt tokens prefilled between two decode steps (at least one request always is): bounds the stall
# that joining requests cause to the running ones, without starving the queue.
PREFILL_TOKEN_BUDGET = 512
# How often an idle decode thread wakes up to expire requests that waited past their deadline.
IDLE_TICK_SECONDS = 0.05
_OLD = object()  # activate()'s default for `previous`: the champion being replaced


class EngineError(RuntimeError):
    """Base of the engine's errors; ``status`` is the HTTP code the server answers with."""

    status = 500
    code = "engine_error"


class QueueFull(EngineError):
    status, code = 429, "queue_full"


class UnknownModel(EngineError):
    status, code = 404, "model_not_found"


class AdapterUnavailable(EngineError):
    status, code = 503, "adapter_unavailable"


class EngineClosed(EngineError):
    status, code = 503, "engine_closed"


class InvalidRequest(EngineError):
    status, code = 400, "invalid_request"


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; validated here so every caller gets the same errors."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if problems:
            raise InvalidRequest("; ".join(problems))


@dataclass
class SwapResult:
    """What a swap did; times in seconds."""

    old: str | None
    new: str | None
    preload_seconds: float
    swap_seconds: float

    def as_dict(self) -> dict:
        return {"from": label(self.old), "to": label(self.new), "preload_seconds": self.preload_seconds,
                "swap_seconds": self.swap_seconds}


def label(version: str | None) -> str:
    """The name clients see for a version: the version itself, or 'base'."""
    return version if version is not None else BASE_LABEL


class GenerationHandle:
    """One request's view of its generation: tokens arrive as events, from any thread or an asyncio loop.

    Events are ``("token", token_id)`` and finally ``("end", finish_reason)``; finish reasons are
    ``stop`` (end-of-sequence token), ``length``, ``timeout``, ``cancelled`` and ``error``.
    """

    def __init__(self, prompt_ids: list[int], version: str | None, params: SamplingParams, loop: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        import asyncio
        import queue

        self.id = uuid.uuid4().hex[:16]
        self.prompt_ids = prompt_ids
        self.version = version
        self.label = label(version)
        self.params = params
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = clock()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._clock = clock
        self._loop = loop
        self._aqueue = asyncio.Queue() if loop is not None else None
        self._queue = queue.SimpleQueue() if loop is None else None
        self._cancelled = threading.Event()
        self._done = threading.Event()

    # -- called by the engine thread --------------------------------------------------------

    def _emit(self, event: tuple) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self._cancelled.set()

    def _token(self, token_id: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = self._clock()
        self.tokens.append(token_id)
        self._emit(("token", token_id))

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error, self.finished_at = reason, error, self._clock()
        self._done.set()
        self._emit(("end", reason))

    # -- called by the client ------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (client gone, stop string matched); the engine frees the slot at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def events(self) -> Iterator[tuple]:
        """Blocking iterator over events (handles submitted without a loop)."""
        while True:
            event = self._queue.get()
            yield event
            if event[0] == "end":
                return

    async def aevents(self):
        """Async iterator over events (handles submitted with ``loop=``)."""
        while True:
            event = await self._aqueue.get()
            yield event
            if event[0] == "end":
                return

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


@dataclass
class _Adapter:
    version: str
    path: str
    slot: str  # the PEFT adapter name holding its weights
    refs: int = 0  # requests pinned to this version and not finished
    loaded_at: float = 0.0


# A few free slots are kept for in-place loads; beyond this many, free slots are deleted at the next load.
SPARE_SLOTS = 2


@dataclass
class _Sequence:
    """Decode-thread state of one request: its own KV cache, one [kv_heads, capacity, head_dim] pair per layer."""

    handle: GenerationHandle
    deadline: float
    capacity: int
    generator: Any = None
    length: int = 0  # tokens whose keys and values are cached
    kv: dict = field(default_factory=dict)
    next_token: int | None = None


class _Plan(threading.local):
    """What the attention function needs during one forward of the engine (thread-local: only the decode thread)."""

    rows: list | None = None  # one _Sequence (or None for a padding row) per batch row


_PLAN = _Plan()


def _engine_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
    """Attention over each row's own KV cache (engine forwards), or plain SDPA (any other caller).

    query [B, Hq, T, D], key/value [B, Hkv, T, D] for the T new tokens of each row. During an engine
    forward the new keys and values are appended to each row's cache and each row attends to its own
    cache only, so no row's softmax ever sees padding.
    """
    import torch
    import torch.nn.functional as F

    rows = _PLAN.rows
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    batch, q_heads, t, _ = query.shape
    kv_heads, v_dim = key.shape[1], value.shape[-1]
    window = kwargs.get("sliding_window")
    out = query.new_zeros(batch, t, q_heads, v_dim)
    for b, seq in enumerate(rows):
        if seq is None:
            continue
        if layer not in seq.kv:
            seq.kv[layer] = (key.new_empty(kv_heads, seq.capacity, key.shape[-1]),
                             value.new_empty(kv_heads, seq.capacity, v_dim))
        k_buf, v_buf = seq.kv[layer]
        start, end = seq.length, seq.length + t
        k_buf[:, start:end] = key[b]
        v_buf[:, start:end] = value[b]
        first = 0 if window is None else max(0, end - t + 1 - window)  # sliding-window models see only recent keys
        keys, values = k_buf[None, :, first:end], v_buf[None, :, first:end]
        mask, causal = None, False
        if t > 1:
            q_pos = torch.arange(start, end, device=query.device)[:, None]
            k_pos = torch.arange(first, end, device=query.device)[None, :]
            if start == 0 and window is None:
                causal = True  # a plain prompt prefill: SDPA's own causal path
            else:
                mask = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window is not None else True)
        o = F.scaled_dot_product_attention(query[b:b + 1], keys, values, attn_mask=mask, is_causal=causal,
                                           scale=scaling, enable_gqa=q_heads != kv_heads)
        out[b] = o[0].transpose(0, 1)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _engine_attention)
    # Callers other than the engine get SDPA with the masks SDPA would get.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class Engine:
    """The serving engine; see the module docstring. All arguments are plain values so tests can build one.

    Args:
        model: a loaded causal LM (eval mode). The engine owns it from now on: it injects PEFT layers into it
            and switches its attention implementation. Other code must not run it concurrently; use ``call``.
        tokenizer: its tokenizer (end-of-sequence ids come from it and the generation config).
        store: the state store (for the registry), or None for a base-only engine.
        state_dir: the state folder; adapters are loaded only from ``<state_dir>/adapters``.
        base_model: the configured base model spec; adapters trained on another base are refused.
        max_batch_size: requests decoded together; every decode step runs exactly this many rows.
        max_queue: requests waiting for a slot beyond this are refused with QueueFull.
        request_timeout: seconds from submission after which a request is cut off (finish reason ``timeout``).
        batch_invariant: fixed-shape decode, one forward per version (see the module docstring).
        metrics: a LoradMetrics (or None).
        clock: monotonic clock (tests pass a fake one).
        live: a ``daemon.watch.LiveStats`` fed with every finished request (version, finish reason, TTFT), or None.
    """

    def __init__(self, model: Any, tokenizer: Any, *, store: Any = None, state_dir: str | os.PathLike | None = None,
                 base_model: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
                 request_timeout: float = 120.0, batch_invariant: bool = True, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, live: Any = None):
        import torch

        if max_batch_size < 1 or max_queue < 1 or request_timeout <= 0:
            raise ValueError(f"max_batch_size and max_queue must be >= 1 and request_timeout > 0, got "
                             f"{max_batch_size}, {max_queue}, {request_timeout}")
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.adapters_dir = (Path(state_dir) / "adapters").resolve() if state_dir is not None else None
        self.base_model = base_model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.batch_invariant = batch_invariant
        self.metrics = metrics
        self.clock = clock
        self.live = live
        # ``listener(event, old, new)`` after promote_and_swap ("promoted") and rollback_and_swap ("rolled_back")
        self.champion_listeners: list[Callable[[str, str | None, str | None], None]] = []
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if getattr(model.config, "attn_logit_softcapping", None):
            raise EngineError(f"{type(model).__name__} uses attention logit soft-capping, which the engine's "
                              "attention does not implement")
        _register_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise EngineError(f"{type(model).__name__} does not route attention through transformers' "
                              "AttentionInterface, so the engine cannot give each request its own KV cache")
        model.eval()
        self.peft = None  # the PeftModel, created when the first adapter is loaded
        self._torch = torch
        self._lock = threading.Condition()  # guards everything below; decode thread waits on it when idle
        self._swap_lock = threading.Lock()  # one swap at a time
        self._champion: str | None = None
        self._previous: str | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._staged: collections.Counter[str] = collections.Counter()  # preloaded for a swap or request to come
        self._free_slots: list[str] = []  # PEFT adapters holding no version, reusable by in-place loads
        self._slot_shapes: dict[str, dict[str, tuple]] = {}  # slot -> {state-dict key: shape} of its LoRA tensors
        self._slot_numbers = itertools.count()
        self._load_lock = threading.Lock()  # one load at a time: loads read or change the module tree
        self._active_slot: str | None = None  # PEFT's active adapter as last set by the decode thread
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closing = False  # stop(): refuse new requests
        self._stop_thread = False  # stop(): the decode thread ends after the drain
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the decode thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorad-engine", daemon=True)
            self._thread.start()
        return self

    def load_champion(self) -> str | None:
        """Load the registry's champion (and previous champion, best effort) and mark the engine ready.

        Raises:
            AdapterUnavailable: the champion cannot be verified or loaded; the engine stays not ready.
        """
        from daemon import registry

        self.start()
        champion = registry.champion(self.store) if self.store is not None else None
        previous = self.store.get_alias(registry.PREVIOUS) if self.store is not None else None
        self.swap(champion, previous=previous)
        self._ready.set()
        if self.metrics is not None:
            self.metrics.model_ready.set(1)
        log.info("engine ready", extra={"champion": label(champion)})
        return champion

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to ``timeout`` seconds, cut off the rest."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._waiting and not self._active:
                    break
            time.sleep(0.02)
        with self._lock:
            for seq in list(self._waiting) + self._active:
                seq.handle.cancel()
            self._stop_thread = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._ready.clear()

    # -- versions -----------------------------------------------------------------------------

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
        try:
            slot, how = self._hotswap_into_free_slot(path), "in place"
            if slot is None:
                slot, how = self.call(lambda: self._new_slot(path), timeout=600), "new slot"
        except EngineError:
            raise
        except Exception as e:
            raise AdapterUnavailable(f"adapter {version}: loading failed: {type(e).__name__}: {e}") from e
        with self._lock:
            self._adapters[version] = _Adapter(version, str(path), slot, loaded_at=time.time())
            if stage:
                self._staged[version] += 1
            self._lock.notify_all()
            self._gauges()
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.adapter_preload_seconds.observe(seconds)
        log.info("adapter preloaded", extra={"version": version, "slot": slot, "how": how,
                                             "seconds": round(seconds, 3)})
        return seconds

    def _hotswap_into_free_slot(self, path: Path) -> str | None:
        """Copy the adapter at ``path`` into a free slot with identical tensor names and shapes; None if none fits.

        Runs in the caller's thread while decoding goes on: no running row uses a free slot.
        """
        import torch
        from peft import LoraConfig
        from peft.utils import load_peft_weights
        from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

        with self._lock:
            free = list(self._free_slots)
        if not free or self.peft is None:
            return None
        config = LoraConfig.from_pretrained(str(path))
        weights = load_peft_weights(str(path), device=str(self.device))
        for slot in free:
            state = _insert_adapter_name_into_state_dict(weights, adapter_name=slot, parameter_prefix="lora_")
            if {k: tuple(v.shape) for k, v in state.items()} != self._slot_shapes.get(slot):
                continue  # another rank or other targets: PEFT would zero-pad, which changes the numerics
            try:
                check_hotswap_configs_compatible(self.peft.peft_config[slot], config)
            except ValueError:
                continue
            with self._lock:
                if slot not in self._free_slots:
                    continue
                self._free_slots.remove(slot)  # claimed: nobody else may load into or delete it now
            try:
                with torch.no_grad():
                    hotswap_adapter_from_state_dict(self.peft, state, adapter_name=slot, config=config,
                                                    parameter_prefix="lora_")
            except Exception:
                with self._lock:
                    self._free_slots.append(slot)
                raise
            return slot
        return None

    def _new_slot(self, path: Path) -> str:
        """Decode thread only: load the adapter at ``path`` as a new PEFT adapter; delete surplus free slots."""
        with self._lock:
            surplus = self._free_slots[:-SPARE_SLOTS] if len(self._free_slots) > SPARE_SLOTS else []
            for slot in surplus:
                self._free_slots.remove(slot)
        for slot in surplus:
            self.peft.delete_adapter(slot)
            self._slot_shapes.pop(slot, None)
        # Equal-length names: PEFT's hot-swap finds a slot's tensors by substring, so no name may contain another.
        slot = f"lorad-slot-{next(self._slot_numbers):06d}"
        self._active_slot = None  # loading and deleting adapters move PEFT's active adapter
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=slot, is_trainable=False,
                                                      low_cpu_mem_usage=True)
            else:
                self.peft.load_adapter(str(path), adapter_name=slot, is_trainable=False, low_cpu_mem_usage=True)
            self.peft.eval()
        except Exception:
            if self.peft is not None and slot in getattr(self.peft, "peft_config", {}):
                try:  # a half-injected adapter must not linger
                    self.peft.delete_adapter(slot)
                except Exception:
                    pass
            raise
        marker = f".{slot}."
        self._slot_shapes[slot] = {k: tuple(v.shape) for k, v in self.peft.state_dict().items() if marker in k}
        return slot

    def unstage(self, version: str | None) -> None:
        """Release a ``preload(stage=True)`` hold; the version is unloaded later if nothing else keeps it."""
        with self._lock:
            if version is not None and self._staged[version] > 0:
                self._staged[version] -= 1
                if not self._staged[version]:
                    del self._staged[version]
                self._lock.notify_all()

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

    def submit(self, prompt_ids: list[int], *, model: str | None = None, params: SamplingParams | None = None,
               loop: Any = None) -> GenerationHandle:
        """Pin a request to a version and queue it; blocks only to load a pinned version on demand.

        Raises:
            InvalidRequest: empty prompt, or prompt + max_tokens beyond the model's context.
            UnknownModel / AdapterUnavailable: the model name cannot be served.
            QueueFull: ``max_queue`` requests are already waiting.
            EngineClosed: the engine is shutting down.
        """
        params = params or SamplingParams()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                 f"{self.max_context} tokens")
        name = (model or "").strip()
        with self._lock:  # resolving the champion and pinning it are one step: a swap cannot slip in between
            version = self._champion if name in CHAMPION_ALIASES else None if name == BASE_LABEL else name
            if version is None or version in self._adapters:
                return self._enqueue(prompt_ids, version, params, loop)
        self.resolve(name)  # raises UnknownModel for names the registry does not know
        self.preload(version, stage=True)  # a named version not in memory: load it now, held until pinned
        try:
            with self._lock:
                if version not in self._adapters:
                    raise AdapterUnavailable(f"adapter {version} was unloaded while the request was queued; retry")
                return self._enqueue(prompt_ids, version, params, loop)
        finally:
            self.unstage(version)

    def _enqueue(self, prompt_ids: list[int], version: str | None, params: SamplingParams,
                 loop: Any) -> GenerationHandle:
        """Queue a request pinned to a loaded ``version``; caller holds the lock."""
        if self._closing:
            raise EngineClosed("the server is shutting down; retry on another instance")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting (serve.max_queue); retry later")
        if version is not None:
            self._adapters[version].refs += 1
        handle = GenerationHandle(list(prompt_ids), version, params, loop=loop, clock=self.clock)
        capacity = min(len(prompt_ids) + params.max_tokens, self.max_context)
        self._waiting.append(_Sequence(handle, deadline=handle.submitted_at + self.request_timeout,
                                       capacity=capacity))
        self._gauges()
        self._lock.notify_all()
        return handle

    def generate(self, prompt_ids: list[int], *, model: str | None = None, timeout: float | None = None,
                 **params: Any) -> GenerationHandle:
        """Submit and wait: the finished handle (``.tokens``, ``.finish_reason``, ``.label``)."""
        handle = self.submit(prompt_ids, model=model, params=SamplingParams(**params))
        handle.wait(timeout)
        return handle

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` in the decode thread between steps (exclusive use of the model) and return its result."""
        if threading.get_ident() == self._thread_id or self._thread is None:
            return fn()
        future: Future = Future()
        with self._lock:
            if not self._thread.is_alive():
                raise EngineClosed("the engine has stopped")
            self._commands.append((fn, future))
            self._lock.notify_all()
        return future.result(timeout)

    def snapshot(self) -> dict:
        """Plain values for status pages: versions, reference counts, queue."""
        with self._lock:
            return {"ready": self.ready, "champion": label(self._champion),
                    "previous": label(self._previous) if self._previous else None,
                    "loaded": {v: {"refs": a.refs} for v, a in sorted(self._adapters.items())},
                    "waiting": len(self._waiting), "running": len(self._active),
                    "max_batch_size": self.max_batch_size, "batch_invariant": self.batch_invariant}

    # -- decode thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            with self._lock:
                if self._stop_thread:
                    break
                if not (self._waiting or self._active or self._commands):
                    self._lock.wait(IDLE_TICK_SECONDS)
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, who decides
                        future.set_exception(e)
            try:
                self._expire()
                self._admit()
                self._decode_step()
                self._collect()
            except Exception as e:  # a broken step fails its requests, never the server
                log.exception("decode step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
        for seq in list(self._waiting) + self._active:
            self._finish(seq, "cancelled")
        with self._lock:
            for fn, future in self._commands:
                future.set_exception(EngineClosed("the engine has stopped"))
            self._commands.clear()

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            waiting = list(self._waiting)
        for seq in waiting + list(self._active):
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            elif now >= seq.deadline:
                self._finish(seq, "timeout")

    def _admit(self) -> None:
        budget = PREFILL_TOKEN_BUDGET
        while len(self._active) < self.max_batch_size:
            with self._lock:
                if not self._waiting or self._commands:  # a pending adapter load goes first
                    return
                size = len(self._waiting[0].handle.prompt_ids)
                if budget < PREFILL_TOKEN_BUDGET and size > budget:
                    return  # the running requests get their next token first
                seq = self._waiting.popleft()
                self._active.append(seq)
                self._gauges()
            budget -= size
            try:
                self._prefill(seq)
            except Exception as e:  # this request fails; the others and the server go on
                log.exception("prefill failed")
                self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _prefill(self, seq: _Sequence) -> None:
        torch = self._torch
        handle = seq.handle
        if handle.params.temperature > 0:
            seed = handle.params.seed if handle.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            seq.generator = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.tensor([handle.prompt_ids], device=self.device)
        positions = torch.arange(len(handle.prompt_ids), device=self.device)[None]
        logits = self._forward([seq], ids, positions, [handle.version])
        seq.length = len(handle.prompt_ids)
        if self.metrics is not None:
            self.metrics.serve_prompt_tokens.inc(seq.length)
        self._accept(seq, self._sample(logits[0], seq))
        if self.metrics is not None and handle.first_token_at is not None:
            self.metrics.serve_ttft_seconds.observe(handle.first_token_at - handle.submitted_at)

    def _decode_step(self) -> None:
        torch = self._torch
        running = [s for s in self._active if not s.handle.done]
        if not running:
            return
        t0 = time.perf_counter()
        if self.batch_invariant:
            by_version: dict[str | None, list[_Sequence]] = {}
            for seq in running:
                by_version.setdefault(seq.handle.version, []).append(seq)
            groups = list(by_version.values())
        else:
            groups = [running]
        n = self.max_batch_size
        for group in groups:
            for i in range(0, len(group), n):
                rows: list[_Sequence | None] = group[i:i + n]
                if self.batch_invariant:
                    rows += [None] * (n - len(rows))  # fixed shape: see "Batch invariance" above
                ids = torch.tensor([[s.next_token if s else self.pad_id] for s in rows], device=self.device)
                positions = torch.tensor([[s.length if s else 0] for s in rows], device=self.device)
                # Padding rows take the group's version: PEFT sizes each adapter's LoRA matmul by its rows.
                fill = group[0].handle.version
                try:
                    logits = self._forward(rows, ids, positions, [s.handle.version if s else fill for s in rows])
                except Exception as e:  # these requests fail; the others and the server go on
                    log.exception("decode step failed")
                    for seq in rows:
                        if seq is not None:
                            self._finish(seq, "error", f"{type(e).__name__}: {e}")
                    continue
                for b, seq in enumerate(rows):
                    if seq is not None:
                        seq.length += 1
                        self._accept(seq, self._sample(logits[b], seq))
        if self.metrics is not None:
            self.metrics.serve_decode_step_seconds.observe(time.perf_counter() - t0)
            self.metrics.serve_batch_rows.observe(len(running))

    def _forward(self, rows: list, ids: Any, positions: Any, versions: list[str | None]) -> Any:
        """One model forward over ``rows``; returns the last position's logits per row as float32 on the CPU."""
        torch = self._torch
        _PLAN.rows = rows
        try:
            with torch.inference_mode():
                if self.peft is None:
                    out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
                else:
                    names = [BASE if v is None else self._adapters[v].slot for v in versions]
                    if len(set(names)) == 1 and names[0] != BASE:
                        # One adapter for every row: PEFT's plain path, cheaper than adapter_names (which
                        # registers a hook on every LoRA layer per forward); switch only when it changes.
                        if self._active_slot != names[0]:
                            self.peft.base_model.set_adapter(names[0])
                            self._active_slot = names[0]
                        out = self.peft(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
                    else:
                        out = self.peft(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1,
                                        adapter_names=names)
        finally:
            _PLAN.rows = None
        return out.logits[:, -1, :].float().cpu()

    def _sample(self, logits: Any, seq: _Sequence) -> int:
        torch = self._torch
        p = seq.handle.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _accept(self, seq: _Sequence, token: int) -> None:
        handle = seq.handle
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return
        handle._token(token)
        seq.next_token = token
        if self.metrics is not None:
            self.metrics.serve_generated_tokens.inc()
        if len(handle.tokens) >= handle.params.max_tokens or \
                len(handle.prompt_ids) + len(handle.tokens) >= self.max_context:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        with self._lock:
            if seq in self._active:
                self._active.remove(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)
            else:
                return
            version = seq.handle.version
            if version is not None and version in self._adapters:
                self._adapters[version].refs -= 1
            self._gauges()
        seq.kv.clear()
        seq.handle._finish(reason, error)
        if self.metrics is not None:
            self.metrics.serve_finished.labels(reason=reason).inc()
        if self.live is not None:
            self.live.record(seq.handle.label, reason, seq.handle.ttft_seconds)

    def _champion_changed(self, event: str, old: str | None, new: str | None) -> None:
        for listener in self.champion_listeners:
            try:
                listener(event, old, new)
            except Exception:  # a listener (the rollback watch) must never undo a finished swap
                log.exception("champion listener failed", extra={"event": event})

    def _fail_all(self, error: str) -> None:
        for seq in list(self._active):
            self._finish(seq, "error", error)

    def _collect(self) -> None:
        """Unload versions that are neither champion nor previous champion and that no request holds."""
        with self._lock:
            keep = {self._champion, self._previous, *self._staged}
            idle = [v for v, a in self._adapters.items() if v not in keep and a.refs == 0]
            for version in idle:
                self._free_slots.append(self._adapters.pop(version).slot)  # reused (or deleted) by a later load
            if idle:
                self._gauges()
        for version in idle:
            log.info("adapter unloaded", extra={"version": version})

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.serve_queue_depth.set(len(self._waiting))
            self.metrics.serve_active.set(len(self._active))
            self.metrics.adapters_loaded.set(len(self._adapters))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# -- registry + engine, together ---------------------------------------------------------------------


def promote_and_swap(engine: Engine, store: Any, version: str, *, reason: str, actor: str = "daemon",
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


def rollback_and_swap(engine: Engine, store: Any, *, reason: str, actor: str = "daemon") -> dict:
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


def build_engine(daemon: Any) -> Engine:
    """Build the engine for a running Daemon (model and tokenizer loaded), load the champion, attach it.

    Raises:
        AdapterUnavailable: the champion cannot be loaded. ``daemon.engine`` is set but not ready: inference
            answers 503 until ``/admin/reload`` (or a promotion) succeeds.
    """
    s = daemon.cfg.serve
    engine = Engine(daemon.model, daemon.tokenizer, store=daemon.store, state_dir=daemon.state_dir,
                    base_model=daemon.cfg.model.base_model, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                    request_timeout=s.request_timeout_seconds, metrics=daemon.metrics,
                    live=getattr(daemon, "live", None))
    listener = getattr(daemon, "_champion_changed", None)
    if listener is not None:
        engine.champion_listeners.append(listener)
    daemon.engine = engine.start()
    engine.load_champion()
    return engine
