"""Generated token ids to released text: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Incremental detokenization with stop strings: releases only text that can no longer change or be cut.

    Decodes a sliding window of tokens (so multi-byte characters split over tokens come out whole) and
    holds back any tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended: release whatever is held back."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = self.text[:end]
        elif final:
            end = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
