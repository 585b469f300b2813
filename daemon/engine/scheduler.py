"""The Engine: submission, the decode thread and its lifecycle (continuous batching: batching.py).

One decode thread owns the model. Between steps it runs queued commands (``call``), expires cancelled
and timed-out requests (freeing their cache slot), admits waiting requests into free slots (their
prompts prefilled together, left-padded, up to batching.PREFILL_TOKEN_BUDGET tokens a forward), then advances
every running request by one token in ONE forward whatever versions they are pinned to.

The host runs one step behind the device. Each step's inputs stay on the device (the step writes its
chosen tokens back as the next inputs; admission and compaction update them there too), so step N+1 is
launched before the host reads step N's tokens, and the device computes while the host delivers tokens,
checks stops and admits requests. A row that ends at step N (end-of-sequence, a cancel) was already in
step N+1: that one token is computed and dropped. Rows that reach their token or context limit leave the
batch before the launch that would exceed it. Commands run only once every launched step is read back.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from daemon.engine.api import (BASE_LABEL, CHAMPION_ALIASES, AdapterUnavailable, EngineClosed, EngineError,
                               GenerationHandle, InvalidRequest, QueueFull, SamplingParams, label)
from daemon.engine.batching import BatchingMixin, Launch, RequestRow
from daemon.engine.model_prep import eos_ids, float32_head, weights_dtype
from daemon.engine.versions import VersionsMixin

log = logging.getLogger("lorad.engine")

# How often an idle decode thread wakes up to expire requests that waited past their deadline.
IDLE_TICK_SECONDS = 0.05
# Prompt length of the CPU warm-up's prefills (the shapes of a typical chat prompt).
CPU_WARM_UP_TOKENS = 128


class Engine(BatchingMixin, VersionsMixin):
    """The serving engine. All arguments are plain values so tests can build one.

    Args:
        model: a loaded causal LM (eval mode). The engine owns it from now on: it wraps its Linears for per-row
            LoRA and switches its attention implementation. Other code must not run it concurrently; use ``call``.
        tokenizer: its tokenizer (end-of-sequence ids come from it and the generation config).
        store: the state store (for the registry), or None for a base-only engine.
        state_dir: the state folder; adapters are loaded only from ``<state_dir>/adapters``.
        base_model: the configured base model spec; adapters trained on another base are refused.
        max_batch_size: requests decoded together (the KV cache's slots, fewer if memory runs short).
        max_queue: requests waiting for a slot beyond this are refused with QueueFull.
        request_timeout: seconds from submission after which a request is cut off (finish reason ``timeout``).
        batch_invariant: decode at one fixed shape and prefill prompts alone, so a greedy output is bit-for-bit
            the same whatever else runs (slower at low load); off, outputs equal up to float rounding.
        metrics: a LoradMetrics (or None).
        clock: monotonic clock (tests pass a fake one).
        live: a ``daemon.watch.LiveStats`` fed with every finished request (version, finish reason, TTFT), or None.
        max_context: positions per request (prompt + new tokens); None = the model's limit.
        kv_cache_fraction: share of free GPU memory the KV cache may take.
        kv_cache_tokens: CPU KV cache budget in positions, all slots together.
        adapter_slots: adapter versions loaded at once (champion, previous, pinned and staged ones).
        lora_max_rank: the largest adapter rank a slot holds.
        cuda_graphs: capture decode steps as CUDA graphs on a GPU.
        compile: torch.compile the decoder layers on a GPU (fewer, fused kernels per captured step).
        decode_kernel: decode attention through the Triton kernel on a GPU (``kernels.py``).
        lora_kernel: the LoRA B products through the Triton kernel on a GPU (``kernels.lora_b_add``).
        kv_cache_dtype: "auto" (the model's dtype), "bfloat16" or "float8_e4m3" (``cache.KV_CACHE_DTYPES``).
        prefill_dtype: "bfloat16" to prefill prompts under bf16 autocast (float32 weights on a CPU with bf16 units: the
            prompt's matmuls run on the bf16 units; decode steps stay float32), or None for the weights' dtype.
    """

    def __init__(self, model: Any, tokenizer: Any, *, store: Any = None, state_dir: str | os.PathLike | None = None,
                 base_model: str | None = None, max_batch_size: int = 32, max_queue: int = 256,
                 request_timeout: float = 120.0, batch_invariant: bool = False, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, live: Any = None, max_context: int | None = None,
                 kv_cache_fraction: float = 0.3, kv_cache_tokens: int = 65536, adapter_slots: int = 4,
                 lora_max_rank: int = 16, cuda_graphs: bool = True, compile: bool = True,
                 decode_kernel: bool = True, lora_kernel: bool = True, kv_cache_dtype: str = "auto",
                 prefill_dtype: str | None = None):
        if prefill_dtype not in (None, "bfloat16"):
            raise ValueError(f"prefill_dtype must be None or 'bfloat16', got {prefill_dtype!r}")
        if max_batch_size < 1 or max_queue < 1 or request_timeout <= 0 or adapter_slots < 1 or lora_max_rank < 1:
            raise ValueError(f"max_batch_size, max_queue, adapter_slots and lora_max_rank must be >= 1 and "
                             f"request_timeout > 0, got {max_batch_size}, {max_queue}, {adapter_slots}, "
                             f"{lora_max_rank}, {request_timeout}")
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.adapters_dir = (Path(state_dir) / "adapters").resolve() if state_dir is not None else None
        self.base_model = base_model
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.batch_invariant = batch_invariant
        self.metrics = metrics
        self.clock = clock
        self.live = live
        self.adapter_slots, self.lora_max_rank = adapter_slots, lora_max_rank
        # ``listener(event, old, new)`` after promote_and_swap ("promoted") and rollback_and_swap ("rolled_back")
        self.champion_listeners: list[Callable[[str, str | None, str | None], None]] = []
        self.device = next(model.parameters()).device
        if prefill_dtype is not None and self.device.type != "cpu":
            raise ValueError(f"prefill_dtype is for float32 weights on a CPU; this model is on {self.device}")
        self.prefill_dtype = prefill_dtype
        self.warm_up_seconds: float | None = None
        model_context = int(getattr(model.config, "max_position_embeddings", None) or 1 << 20)
        self.max_context = min(model_context, max_context or model_context)
        self.eos_ids = eos_ids(model, tokenizer)
        self._build_model_side(max_batch_size, kv_cache_fraction, kv_cache_tokens, cuda_graphs, compile,
                               decode_kernel, lora_kernel, kv_cache_dtype)
        if prefill_dtype is not None:
            float32_head(model)
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        self._lock = threading.Condition()  # guards everything below; decode thread waits on it when idle
        self._swap_lock = threading.Lock()  # one swap at a time
        self._load_lock = threading.Lock()  # one adapter load at a time
        self._champion: str | None = None
        self._previous: str | None = None
        self._adapters: dict = {}
        self._staged: collections.Counter[str] = collections.Counter()  # preloaded for a swap or request to come
        self._pinned: set[str] = set()  # loaded by the control plane (load_lora_adapter) until it unloads them
        self._free_slots: list[int] = list(range(1, adapter_slots + 1))
        self._waiting: collections.deque[RequestRow] = collections.deque()
        self._running: list[RequestRow] = []  # index = KV cache slot
        self._inflight: collections.deque[Launch] = collections.deque()  # launched, not read back (oldest first)
        self._readback = 0  # next pinned read-back buffer (GPU)
        self._last_step_read = 0.0  # perf_counter when the last decode step was read back
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closing = False  # stop() or a failed decode thread: refuse new requests
        self.failure: str | None = None  # why the decode thread stopped on its own, if it did
        self._stop_thread = False  # stop(): the decode thread ends after the drain
        self._warm = False
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._share_cpu = False   # share_cpu(): decode on one CPU thread while another process computes
        self._cpu_threads: int | None = None   # the decode thread's torch threads as set by the engine (CPU)
        self._all_cpu_threads: int | None = None   # torch's thread count when the decode thread first ran

    def _build_model_side(self, max_batch_size: int, kv_cache_fraction: float, kv_cache_tokens: int,
                          cuda_graphs: bool, compile: bool, decode_kernel: bool, lora_kernel: bool,
                          kv_cache_dtype: str) -> None:
        """Attention routing, per-row LoRA layers, the KV cache sized from the device, and the stepper."""
        import torch

        from daemon.engine import cache as cache_mod
        from daemon.engine import lora, step

        model = self.model
        if getattr(model.config, "attn_logit_softcapping", None):
            raise EngineError(f"{type(model).__name__} uses attention logit soft-capping, which the engine's "
                              "attention does not implement")
        step.register_attention()
        model.set_attn_implementation(step.ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != step.ATTN_IMPLEMENTATION:
            raise EngineError(f"{type(model).__name__} does not route attention through transformers' "
                              "AttentionInterface, so the engine cannot keep its KV cache")
        model.eval()
        layers = step.probe_layers(model, self.device)
        self._wrapped = lora.wrap_linears(model, slots=self.adapter_slots, r_max=self.lora_max_rank,
                                          kernel=lora_kernel)
        try:
            dtype = cache_mod.cache_dtype(kv_cache_dtype, weights_dtype(model))
        except ValueError as e:
            raise EngineError(str(e)) from None
        element = torch.empty((), dtype=dtype).element_size()
        per_token = sum(s.kv_heads * (s.k_dim + s.v_dim) for s in layers.values()) * element
        free = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
        try:
            slots = cache_mod.plan_slots(bytes_per_token=per_token, context=self.max_context,
                                         max_batch_size=max_batch_size, device_type=self.device.type,
                                         free_bytes=free, kv_cache_fraction=kv_cache_fraction,
                                         kv_cache_tokens=kv_cache_tokens)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if slots < max_batch_size:
            log.warning("KV cache holds fewer requests than serve.max_batch_size",
                        extra={"slots": slots, "max_batch_size": max_batch_size, "context": self.max_context})
        self.max_batch_size = slots
        self.cache = cache_mod.KVCache(layers, slots=slots, context=self.max_context, dtype=dtype,
                                       device=self.device)
        self.stepper = step.Stepper(model, self.cache, lora_slots=self.adapter_slots, r_max=self.lora_max_rank,
                                    use_graphs=cuda_graphs, compile=compile, decode_kernel=decode_kernel,
                                    on_capture=self._captured)
        self._compilations = step.compilations()
        # Read-back buffers for the launches in flight (at most a decode, a prefill and the next decode).
        self._readback_buffers = ([torch.empty(2, slots, dtype=torch.long, pin_memory=True) for _ in range(4)]
                                  if self.device.type == "cuda" else [])
        if self.metrics is not None:
            self.metrics.serve_kv_cache_capacity.set(self.cache.capacity_tokens)
        log.info("KV cache allocated", extra={"slots": slots, "context": self.max_context,
                                              "gib": round(self.cache.nbytes / 2**30, 3)})

    def _captured(self, seconds: float) -> None:
        from daemon.engine import step

        if self.metrics is not None:
            self.metrics.serve_graph_captures.inc()
            now = step.compilations()
            self.metrics.serve_compilations.inc(max(0, now - self._compilations))
            self._compilations = now

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the decode thread (idempotent). On a CPU the caller's OpenMP workers (the model was loaded in
        this thread, typically) are let go: the decode thread computes from now on (``_release_cpu_workers``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorad-engine", daemon=True)
            self._thread.start()
            self._release_cpu_workers()
        return self

    def share_cpu(self, sharing: bool) -> None:
        """On a CPU, decode on one thread while another process computes on the same cores (a lorad job), on all
        of them otherwise; takes effect at the decode thread's next step. No-op on a GPU.

        The decode thread's OpenMP workers wait for each other at the end of every op, spinning first. With a
        job on the cores (even at a lower priority) a worker woken onto the core where its peer spins waits for
        that spin to end: on 2 cores a 135M decode fell from ~24 to ~1 token/s while a busy loop ran at nice 10.
        One thread has no peer to wait for: ~20 tokens/s, contended or not.
        """
        self._share_cpu = bool(sharing)
        with self._lock:
            self._lock.notify_all()

    def _apply_cpu_threads(self) -> None:
        """In the decode thread: the torch thread count ``share_cpu`` asks for (CPU only)."""
        if self.device.type != "cpu":
            return
        import torch

        if self._cpu_threads is None:
            self._cpu_threads = self._all_cpu_threads = torch.get_num_threads()
        want = 1 if self._share_cpu else self._all_cpu_threads
        if want != self._cpu_threads:
            torch.set_num_threads(want)
            self._cpu_threads = want
            log.info("engine CPU threads", extra={"threads": want, "sharing": self._share_cpu})

    def _release_cpu_workers(self) -> None:
        """On a CPU, let the calling thread's OpenMP workers go (``pipelines.hardware.release_openmp_workers``).

        GNU OpenMP keeps a worker pool per thread that ever computed; with more workers than cores it stops
        spinning between parallel regions and the decode thread's small ops each pay a wake-up (on 2 cores a 135M
        decode step took ~13 % longer, a 64-token prefill ~25 %). So every thread lets its workers go when it is
        done with torch for a while: the caller after loading the model or an adapter, the decode thread when
        it goes idle. The next parallel region starts them again (~0.1 ms)."""
        if self.device.type == "cpu":
            from pipelines.hardware import release_openmp_workers

            release_openmp_workers()

    def warm_up(self) -> int:
        """Run the first forwards now, before the engine reports ready, so no request pays for them.

        GPU: capture the decode step's CUDA graphs (and first-chunk prefills). CPU: one prefill and decode steps at
        the smallest and largest batch, base and adapter path, in the decode thread (its OpenMP and MKL thread pools,
        oneDNN's primitives and the allocator's first growth happen here instead of in the first request).

        Returns:
            graphs captured (GPU) or forwards run (CPU).
        """
        self.start()
        if self._warm:
            return 0
        t0 = time.perf_counter()
        if self.device.type != "cuda":
            n = self.call(self._warm_up_cpu)
        elif self.batch_invariant:
            n = self.call(lambda: self.stepper.warm_up(self.cache.context, [self.cache.slots]))
        else:
            n = self.call(lambda: self.stepper.warm_up(min(self.cache.context, 1024)))
        self._warm = True
        self.warm_up_seconds = time.perf_counter() - t0
        log.info("engine warmed up", extra={"seconds": round(self.warm_up_seconds, 3), "device": self.device.type,
                                            "count": n})
        return n

    def _warm_up_cpu(self) -> int:
        """Prefill one prompt and decode one step at the smallest and the largest batch (base rows, then adapter
        rows); the cache positions it wrote are zeroed again. Skipped while requests run: their rows hold the slots."""
        from daemon.engine.cache import stored

        if self._running:
            return 0
        width = min(CPU_WARM_UP_TOKENS, self.cache.context - 1)
        forwards = 0
        for lora_index in (0, 1):  # 0 = base; slot 1's tables are the per-row LoRA path a champion takes
            with self._prefill_precision():
                self.stepper.prefill([([0] * width, 0, lora_index)], 0)
            forwards += 1
            for batch in sorted({1, self.cache.slots}):
                self.stepper.decode([0] * batch, [width] * batch, [lora_index] * batch)
                forwards += 1
        for store in (self.cache.keys, self.cache.values):
            for t in store.values():
                stored(t[:, :, :width + 1]).zero_()
        return forwards

    def _prefill_precision(self) -> Any:
        """bf16 autocast around a prefill when ``prefill_dtype`` asks for it, else nothing."""
        import contextlib

        if self.prefill_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device.type, dtype=getattr(torch, self.prefill_dtype))

    def load_champion(self, *, warm_up: bool = True) -> str | None:
        """Warm up, load the registry's champion (and previous champion, best effort) and mark the engine ready.

        Args:
            warm_up: run ``warm_up`` first (benchmarks turn it off to measure what it saves).
        Raises:
            AdapterUnavailable: the champion cannot be verified or loaded; the engine stays not ready.
        """
        from daemon import registry

        if warm_up:
            self.warm_up()
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
                if not self._waiting and not self._running:
                    break
            time.sleep(0.02)
        with self._lock:
            for seq in list(self._waiting) + self._running:
                seq.handle.cancel()
            self._stop_thread = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._ready.clear()

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], *, model: str | None = None, params: SamplingParams | None = None,
               loop: Any = None, load: bool = True) -> GenerationHandle | None:
        """Pin a request to a version and queue it; blocks only to load a pinned version on demand.

        With ``load=False`` it never blocks: None when the version would have to be loaded first (an event
        loop calls it so, and again with ``load=True`` from a thread when it gets None).

        Raises:
            InvalidRequest: empty prompt, or a prompt that leaves no room in the per-request context.
            UnknownModel / AdapterUnavailable: the model name cannot be served.
            QueueFull: ``max_queue`` requests are already waiting.
            EngineClosed: the engine is shutting down.
        """
        params = params or SamplingParams()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_context} "
                                 f"tokens (the model's, or serve.max_prompt_tokens + serve.max_new_tokens)")
        name = (model or "").strip()
        with self._lock:  # resolving the champion and pinning it are one step: a swap cannot slip in between
            version = self._champion if name in CHAMPION_ALIASES else None if name == BASE_LABEL else name
            if version is None or version in self._adapters:
                return self._enqueue(prompt_ids, version, params, loop)
        if not load:
            return None
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
            raise EngineClosed(self.failure or "the server is shutting down; retry on another instance")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting (serve.max_queue); retry later")
        lora_index = 0
        if version is not None:
            adapter = self._adapters[version]
            adapter.refs += 1
            lora_index = adapter.slot
        handle = GenerationHandle(list(prompt_ids), version, params, loop=loop, clock=self.clock)
        generator = None
        if params.temperature > 0:
            generator = random.Random(params.seed if params.seed is not None else self._rng.getrandbits(64))
        self._waiting.append(RequestRow(handle, deadline=handle.submitted_at + self.request_timeout,
                                       lora_index=lora_index, generator=generator))
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
        """Plain values for status pages: versions, reference counts, queue, cache."""
        with self._lock:
            return {"ready": self.ready, "champion": label(self._champion),
                    "previous": label(self._previous) if self._previous else None,
                    "loaded": {v: {"refs": a.refs, "slot": a.slot} for v, a in sorted(self._adapters.items())},
                    "pinned": sorted(self._pinned),
                    "waiting": len(self._waiting), "running": len(self._running),
                    "max_batch_size": self.max_batch_size, "batch_invariant": self.batch_invariant,
                    "kv_cache": {"slots": self.cache.slots, "context": self.cache.context,
                                 "used_tokens": sum(s.length for s in self._running)},
                    "graph_captures": self.stepper.captures, "compiled_layers": self.stepper.compiled,
                    "compilations": self.compilations(), "adapter_slots": self.adapter_slots,
                    "prefill_dtype": self.prefill_dtype, "warm_up_seconds": self.warm_up_seconds}

    def compilations(self) -> int:
        """torch.compile graphs built so far (process-wide dynamo count; flat across swaps)."""
        from daemon.engine import step

        return step.compilations()

    # -- decode thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a fault outside one request's step (a CUDA error): fail, not hang
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """The decode thread cannot go on: end every request and command with the reason, refuse new ones.

        Per-request failures are handled where they happen (prefill, decode step, non-finite logits); what reaches
        here broke the loop itself, typically a device fault that leaves the CUDA context unusable. Requests must
        not wait forever on a thread that is gone, and readiness turns false so a supervisor restarts the process.
        """
        reason = f"the engine stopped: {type(error).__name__}: {error}"[:500]
        log.error("engine failed", exc_info=error, extra={"error": reason})
        self.failure = reason
        self._ready.clear()
        if self.metrics is not None:
            self.metrics.model_ready.set(0)
        with self._lock:
            self._closing = True
            seqs = list(self._waiting) + self._running + self._retired_rows()
            commands = list(self._commands)
            self._commands.clear()
        for seq in seqs:
            try:
                self._finish(seq, "error", reason)
            except Exception:  # noqa: BLE001 - the bookkeeping may touch the broken device: tell the client anyway
                seq.handle._finish("error", reason)
        for _fn, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosed(reason))

    def _loop(self) -> None:
        busy = False  # this thread computed since it last let its CPU workers go
        # On a GPU keep the newest launch in flight: the device computes it while the host reads the ones before.
        # A CPU computes a launch when it is made: read each at once (the first token too, not after the next step)
        overlap = self.device.type == "cuda"
        while True:
            with self._lock:
                if self._stop_thread:
                    break
                if not (self._waiting or self._running or self._commands or self._inflight):
                    if busy:
                        self._release_cpu_workers()
                        busy = False
                    self._lock.wait(IDLE_TICK_SECONDS)
                commands = list(self._commands)
                self._commands.clear()
                busy = busy or bool(commands or self._waiting or self._running)
            self._apply_cpu_threads()
            if commands:
                self._drain()  # commands see a quiet device: every launched step read back
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, who decides
                        future.set_exception(e)
            self._expire()
            self._retire()
            self._admit()
            if not overlap:
                # deliver the new rows' first tokens now (on 2 cores a lone 64-token request's first token waited
                # ~90 ms of prefill and then ~38 ms of the 135M's next step)
                self._drain()
                self._retire()
            launched = self._decode_step()
            while len(self._inflight) > (1 if launched and overlap else 0):
                self._process(self._inflight.popleft())
            self._collect()
        self._drain()
        for seq in list(self._waiting) + list(self._running) + self._retired_rows():
            self._finish(seq, "cancelled")
        with self._lock:
            for fn, future in self._commands:
                future.set_exception(EngineClosed("the engine has stopped"))
            self._commands.clear()

    def _drain(self) -> None:
        while self._inflight:
            self._process(self._inflight.popleft())

    def _release(self, seq: RequestRow, *, clear: bool = False) -> None:
        """Free a running row's slot (decode thread only): the last running row moves into it, on the device too."""
        with self._lock:
            slot = seq.slot
            if clear:
                self.cache.clear(slot)
            last = self._running.pop()
            if last is not seq:
                self.cache.move(last.slot, slot, last.length)
                self.stepper.move_row(last.slot, slot)
                last.slot = slot
                self._running[slot] = last
            seq.slot = None
            self._gauges()

    def _finish(self, seq: RequestRow, reason: str, error: str | None = None, *, clear: bool = False) -> None:
        """End a request: free its slot if it holds one, release its version, tell the client."""
        if seq.handle.done:
            return
        if seq.slot is not None and seq.slot < len(self._running) and self._running[seq.slot] is seq:
            self._release(seq, clear=clear)
        with self._lock:
            if seq in self._waiting:
                self._waiting.remove(seq)
            version = seq.handle.version
            if version is not None and version in self._adapters:
                self._adapters[version].refs -= 1
            self._gauges()
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

    def _collect(self) -> None:
        with self._lock:
            self._collect_locked()

    def _collect_locked(self) -> None:
        """Free the slots of versions that are neither champion nor previous and that no request holds."""
        keep = {self._champion, self._previous, *self._staged}
        idle = [v for v, a in self._adapters.items() if v not in keep and a.refs == 0]
        for version in idle:
            self._free_slots.append(self._adapters.pop(version).slot)
            log.info("adapter unloaded", extra={"version": version})
        if idle:
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.serve_queue_depth.set(len(self._waiting))
            self.metrics.serve_active.set(len(self._running))
            self.metrics.serve_batch_occupancy.set(len(self._running) / self.max_batch_size)
            self.metrics.adapters_loaded.set(len(self._adapters))
