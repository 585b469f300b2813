"""Generated token ids to released text: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any


class _StopMatcher:
    """Knuth-Morris-Pratt over one stop string, fed one character at a time.

    ``state`` is the length of the longest prefix of the stop string that the text seen so far ends with:
    exactly what must be held back. Each character costs amortized O(1), whatever the stop string's length,
    so matching is linear in the generated text.
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0
        self._fail = [0] * len(stop)  # _fail[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when the stop string ends here."""
        stop, k = self.stop, self.state
        while k and stop[k] != ch:
            k = self._fail[k - 1]
        if stop[k] == ch:
            k += 1
        if k == len(stop):
            self.state = self._fail[k - 1]
            return True
        self.state = k
        return False


def fast_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer whose ``decode(ids,
    skip_special_tokens=True, clean_up_tokenization_spaces=False)`` is exactly the backend's decode, or None.

    Calling the backend directly skips transformers' per-call argument conversion, which cost more than the
    decode itself for the two-token windows decoded per streamed chunk.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (isinstance(backend, Tokenizer) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode):
        return backend
    return None


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
        self._prefix_text: str | None = ""  # decode of ids[_prefix:_read], kept until the window moves
        self._backend = fast_backend(tokenizer)
        self._matchers = [_StopMatcher(s) for s in self.stops]
        self._scanned = 0  # characters of self.text the matchers have seen

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (may be empty)."""
        return self.push_many((token_id,))

    def push_many(self, token_ids: list[int] | tuple[int, ...]) -> str:
        """Add generated tokens (all that arrived since the last call); return the text they release.

        Costs two decodes of the short window, whatever the number of tokens (token by token only when the
        last one ends inside a multi-byte character, so that the complete ones before it are released).
        """
        if self.stopped:
            self.ids.extend(token_ids)
            return ""
        n = len(self.ids)
        self.ids.extend(token_ids)
        if self._advance() and len(token_ids) > 1:
            del self.ids[n:]
            for token_id in token_ids:
                self.ids.append(token_id)
                self._advance()
        return self._release(final=False)

    def _advance(self) -> bool:
        """Decode the tokens past the window into ``text``; True when they end inside a character (held)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        prefix = self._prefix_text
        full = self._decode(self.ids[self._prefix:])
        if full.endswith("\ufffd"):
            return True
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = None
        return False

    def flush(self) -> str:
        """The generation ended: release whatever is held back."""
        return self._release(final=True)

    def _first_stop(self) -> int | None:
        """Where the earliest stop string starts in the text not scanned yet, or None."""
        new, offset = self.text[self._scanned:], self._scanned
        self._scanned = len(self.text)
        first = None
        for m in self._matchers:
            for i, ch in enumerate(new):
                if m.feed(ch):
                    start = offset + i - len(m.stop) + 1
                    first = start if first is None else min(first, start)
                    break
        return first

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        hit = self._first_stop()
        if hit is not None:
            end = hit
            self.stopped = True
            self.text = self.text[:end]
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - max((m.state for m in self._matchers), default=0)
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
