"""Continuous batching, the host side of each step: admission, prefill, decode launches and read-back.

``BatchingMixin`` is the part of ``Engine`` (scheduler.py) that the decode thread runs between commands: it
expires and retires rows, admits waiting requests into free cache slots (their prompts prefilled together,
left-padded, up to PREFILL_TOKEN_BUDGET tokens a forward), launches one decode step of every running row,
and reads launched steps back one step behind the device (see scheduler.py's module docstring). The state it
works on (the queue, the running rows, the launches in flight, the lock) belongs to the Engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from daemon.engine.api import GenerationHandle, batched_events

log = logging.getLogger("lorad.engine")

# Prompt tokens (padded) prefilled in one forward; a longer prompt is prefilled alone, in chunks of this size.
PREFILL_TOKEN_BUDGET = 2048


@dataclass
class RequestRow:
    """Decode-thread state of one request."""

    handle: GenerationHandle
    deadline: float
    lora_index: int  # LoRA table slot of its version (0 = base)
    generator: Any = None  # random.Random of a sampling request (seeded when the request has a seed)
    slot: int | None = None  # its KV cache slot while running
    length: int = 0  # positions cached once every launched step has run
    pending: int = 0  # launched steps whose token the host has not read yet
    retired: bool = False  # left the batch at its limit; ends when its last launched token is read


@dataclass
class Launch:
    """A forward launched on the device whose chosen tokens the host has not read yet."""

    kind: str  # "prefill" or "decode"
    rows: list[RequestRow]
    host: Any  # [2, >= len(rows)] tokens and finite flags: a pinned buffer (GPU) or lists (CPU)
    event: Any  # CUDA event recorded after the copy into ``host``; None on a CPU
    started: float


class BatchingMixin:
    """Admission, prefill, decode launches and read-back for ``Engine`` (decode thread only)."""

    def _retired_rows(self) -> list[RequestRow]:
        return [seq for launch in self._inflight for seq in launch.rows if seq.retired and not seq.handle.done]

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            waiting = list(self._waiting)
        for seq in waiting + list(self._running):
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            elif now >= seq.deadline:
                self._finish(seq, "timeout")

    def _retire(self) -> None:
        """Rows whose launched tokens reach ``max_tokens``, or whose next position is past the context, leave
        the batch now; each ends when its last launched token is read (or now, if none is in flight)."""
        done = [seq for seq in self._running
                if len(seq.handle.tokens) + seq.pending >= seq.handle.params.max_tokens
                or seq.length + 1 >= self.max_context]
        for seq in done:
            self._release(seq)
            seq.retired = True
            if seq.pending == 0:
                self._finish(seq, "length")

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them (several prompts per forward)."""
        admitted: list[RequestRow] = []
        with self._lock:
            budget = PREFILL_TOKEN_BUDGET
            longest = 0
            while self._waiting and len(self._running) < self.max_batch_size and not self._commands:
                size = len(self._waiting[0].handle.prompt_ids)
                width = max(longest, size)
                if admitted and (width * (len(admitted) + 1) > budget or self.batch_invariant):
                    break
                seq = self._waiting.popleft()
                seq.slot = len(self._running)
                self._running.append(seq)
                admitted.append(seq)
                longest = width
            if admitted:
                self._gauges()
        if admitted:
            self._prefill(admitted)

    def _prefill(self, seqs: list[RequestRow]) -> None:
        """Prefill ``seqs`` (contiguous new slots), chunked when one prompt alone exceeds the budget; their first
        tokens become their next inputs on the device and are read back with the next step."""
        from daemon.engine import step

        start = seqs[0].slot
        t0 = time.perf_counter()
        try:
            while True:
                chunks = []
                for seq in seqs:
                    prompt = seq.handle.prompt_ids
                    piece, first = prompt[seq.length:seq.length + PREFILL_TOKEN_BUDGET], seq.length
                    if not piece:  # done in an earlier chunk: its last token again, same position, same result
                        piece, first = prompt[-1:], len(prompt) - 1
                    chunks.append((piece, first, seq.lora_index))
                with self._prefill_precision():
                    logits, greedy, finite = self.stepper.prefill(chunks, start)
                for seq, (piece, first, _) in zip(seqs, chunks):
                    seq.length = first + len(piece)
                if all(seq.length == len(seq.handle.prompt_ids) for seq in seqs):
                    break
            tokens = step.sample(logits, greedy, *self._sampling(seqs))
            self.stepper.admit_rows(start, tokens, [s.length for s in seqs], [s.lora_index for s in seqs])
            launch = self._read_back("prefill", seqs, tokens, finite, t0)
        except Exception as e:  # these requests fail; the others and the server go on
            log.exception("prefill failed")
            for seq in seqs:
                self._finish(seq, "error", f"prefill failed: {type(e).__name__}: {e}", clear=True)
            return
        for seq in seqs:
            seq.pending += 1
        self._inflight.append(launch)
        if self.metrics is not None:
            self.metrics.serve_prompt_tokens.inc(sum(s.length for s in seqs))
            self.metrics.serve_prefill_seconds.observe(time.perf_counter() - t0)

    def _decode_step(self) -> bool:
        """Launch one decode step of every running row (row i is cache slot i); False if there is none."""
        from daemon.engine import step

        rows = list(self._running)
        if not rows:
            return False
        t0 = time.perf_counter()
        shape = {"batch": self.cache.slots, "context": self.cache.context} if self.batch_invariant else {}
        try:
            logits, greedy, finite = self.stepper.launch_decode(len(rows), max(s.length for s in rows) + 1,
                                                                **shape)
            tokens = step.sample(logits, greedy, *self._sampling(rows))
            self.stepper.advance(tokens, len(rows))
            launch = self._read_back("decode", rows, tokens, finite, t0)
        except Exception as e:  # the forward itself broke: its rows fail, the server goes on
            log.exception("decode step failed")
            for seq in rows:
                self._finish(seq, "error", f"decode step failed: {type(e).__name__}: {e}", clear=True)
            return False
        for seq in rows:
            seq.length += 1
            seq.pending += 1
        self._inflight.append(launch)
        if self.metrics is not None:
            self.metrics.serve_batch_rows.observe(len(rows))
            self.metrics.serve_kv_cache_used.set(sum(s.length for s in self._running))
        return True

    @staticmethod
    def _sampling(seqs: list[RequestRow]) -> tuple[list[float], list[float], list[float]]:
        """Temperatures, top-p values and one uniform number per row (from the row's own generator)."""
        params = [s.handle.params for s in seqs]
        uniform = [s.generator.random() if s.generator is not None else 0.0 for s in seqs]
        return [p.temperature for p in params], [p.top_p for p in params], uniform

    def _read_back(self, kind: str, rows: list[RequestRow], tokens: Any, finite: Any, started: float) -> Launch:
        """Start copying the launch's tokens and finite flags to the host (asynchronously on a GPU)."""
        import torch

        both = torch.stack([tokens, finite.to(tokens.dtype)])
        if not self._readback_buffers:
            return Launch(kind, rows, both.tolist(), None, started)
        buffer = self._readback_buffers[self._readback % len(self._readback_buffers)][:, :len(rows)]
        self._readback += 1
        buffer.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Launch(kind, rows, buffer, event, started)

    def _process(self, launch: Launch) -> None:
        """Read a launch's tokens back: deliver them, end rows at a stop, a limit or non-finite logits."""
        if launch.event is not None:
            launch.event.synchronize()
            tokens, finite = launch.host.tolist()
        else:
            tokens, finite = launch.host
        with batched_events():
            for seq, token, ok in zip(launch.rows, tokens, finite):
                seq.pending -= 1
                if seq.handle.done:  # ended (cancel, stop) while this step was in flight: its token is dropped
                    continue
                if not ok:
                    self._finish(seq, "error", "the model produced non-finite logits for this request "
                                               "(NaN or infinity); other requests are unaffected", clear=True)
                else:
                    self._accept(seq, int(token))
        if self.metrics is None:
            return
        if launch.kind == "decode":
            # The step's period: from its launch, or from the previous step's read-back when the device was
            # still busy with that one (steps overlap).
            now = time.perf_counter()
            self.metrics.serve_decode_step_seconds.observe(now - max(launch.started, self._last_step_read))
            self._last_step_read = now
        else:
            for seq in launch.rows:
                if seq.handle.first_token_at is not None and len(seq.handle.tokens) == 1:
                    self.metrics.serve_ttft_seconds.observe(seq.handle.first_token_at - seq.handle.submitted_at)

    def _accept(self, seq: RequestRow, token: int) -> None:
        handle = seq.handle
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return
        handle._token(token)
        if self.metrics is not None:
            self.metrics.serve_generated_tokens.inc()
        if len(handle.tokens) >= handle.params.max_tokens or (seq.retired and seq.pending == 0):
            self._finish(seq, "length")
