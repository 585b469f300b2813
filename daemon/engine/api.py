"""What callers of the engine touch: errors, sampling parameters, swap results and the generation handle."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

BASE_LABEL = "base"  # what clients send and see for the base model
CHAMPION_ALIASES = ("", "lorad", "champion")


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


class _Batch(threading.local):
    """Events emitted inside ``batched_events()`` (decode thread), delivered per event loop at its end."""

    items: list | None = None


_BATCH = _Batch()


class batched_events:
    """Deliver every event emitted inside to each asyncio loop with ONE ``call_soon_threadsafe``.

    A decode step emits a token for every running request; waking the server's event loop once per step
    instead of once per token keeps the loop free for HTTP work.
    """

    def __enter__(self) -> "batched_events":
        _BATCH.items = []
        return self

    def __exit__(self, *exc: Any) -> None:
        items, _BATCH.items = _BATCH.items or [], None
        by_loop: dict[Any, list] = {}
        for handle, event in items:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, pairs)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                for handle, _ in pairs:
                    handle._cancelled.set()


def _deliver(pairs: list) -> None:
    """On the handle's loop: append each event to its handle and wake each waiting consumer once."""
    woken = []
    for handle, event in pairs:
        handle._pending.append(event)
        waiter = handle._waiter
        if waiter is not None:
            handle._waiter = None
            woken.append(waiter)
    for waiter in woken:
        if not waiter.done():
            waiter.set_result(None)


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
        # With a loop: events wait in _pending (touched only on the loop) until the consumer takes them all.
        self._pending: list[tuple] = []
        self._waiter: asyncio.Future | None = None
        self._interrupted = False
        self._queue = queue.SimpleQueue() if loop is None else None
        self._cancelled = threading.Event()
        self._done = threading.Event()

    # -- called by the engine thread --------------------------------------------------------

    def _emit(self, event: tuple) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        if _BATCH.items is not None:
            _BATCH.items.append((self, event))
            return
        try:
            self._loop.call_soon_threadsafe(_deliver, [(self, event)])
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
    def interrupted(self) -> bool:
        """``interrupt()`` was called (the client hung up)."""
        return self._interrupted

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

    async def abatches(self):
        """Async iterator over lists of events (handles submitted with ``loop=``): everything that arrived
        since the last list, so a consumer that falls behind catches up in one go. Ends after the ``end``
        event, or early once ``interrupt()`` was called."""
        import asyncio

        while True:
            if not self._pending:
                if self._interrupted:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            batch, self._pending = self._pending, []
            yield batch
            if batch[-1][0] == "end":
                return

    async def aevents(self):
        """Async iterator over events (handles submitted with ``loop=``)."""
        async for batch in self.abatches():
            for event in batch:
                yield event

    def interrupt(self) -> None:
        """Cancel, and end ``abatches``/``aevents`` now instead of at the engine's next step (the client is
        gone). Call it on the handle's event loop."""
        self._cancelled.set()
        self._interrupted = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at
