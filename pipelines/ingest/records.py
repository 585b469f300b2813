"""The record normaliser: one parsed object (JSON object, CSV row, Parquet row) -> a ``Record``.

Record shapes (extra keys are ignored; an optional ``category`` string rides along):
  {input, output}                    the seed's format: user = input, assistant = output
  {instruction, input?, output}      Alpaca: user = instruction + "\\n\\n" + input
  {prompt, completion}
  {query, response, system?}         LawBench
  {messages: [{role, content}, ...]} chat: optional system first, then user/assistant
                                     alternating, the last one from the assistant
  {text}                             continued pre-training
``system`` is accepted beside every prompt/response shape. Empty optional fields count as
absent. Stored payloads are ``{"messages": [...]}`` (kind 'chat') or ``{"text": ...}``
(kind 'text').

Cleaning, in order, on every text field: control characters (except tab and newline), lone
surrogates, zero-width spaces and byte-order marks removed; Unicode NFC; ``\\r\\n``/``\\r`` ->
``\\n``; ``data.strip_patterns`` removed; trailing whitespace on each line removed, runs of
blank lines collapsed to one, the field stripped. Indentation inside lines is kept (code).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from daemon.config import DataConfig

SPLIT_SALT = "lorad-split-v1"  # changing it would move records between splits: never change it
SPLIT_BUCKETS = 10_000

KNOWN_FIELDS = ("messages", "text", "instruction", "input", "output", "prompt", "completion",
                "query", "response", "system", "category")
# Field sets a CSV header / Parquet schema must contain for at least one record shape.
SHAPE_COLUMNS = (("messages",), ("text",), ("instruction", "output"), ("prompt", "completion"),
                 ("query", "response"), ("input", "output"))
SHAPES_HELP = ("{input, output} | {instruction, input?, output} | {prompt, completion} | "
               "{query, response, system?} | {messages: [...]} | {text}")


class InvalidRecord(Exception):
    """One record is rejected; the message is the reason."""


@dataclass(frozen=True, slots=True)
class Record:
    """A validated, normalised record, ready to store."""

    kind: str            # 'chat' | 'text'
    payload: dict        # {"messages": [...]} or {"text": ...}
    payload_json: str    # canonical JSON of payload (what is stored and hashed)
    content_hash: str    # sha256 hex of payload_json
    category: str | None
    n_chars: int


@dataclass(frozen=True, slots=True)
class Parsed:
    """One record-bearing line/row/element: a ``record``, or the ``error`` that rejects it."""

    line: int
    record: Record | None
    error: str | None


def estimate_tokens(text: str) -> int:
    """Cheap token estimate used when no tokenizer is given.

    One token per character written with 3 bytes in UTF-8 (CJK, kana, hangul and most other
    dense scripts), plus one token per 4 of the remaining characters (Latin text, code,
    punctuation). A rough guide only: real tokenizers range from under 1 to about 2 tokens per
    Chinese character, so the daemon passes the model's own counter for exact limits.
    """
    n = len(text)  # _json_piece computes the same estimate from its own encoding: change both together
    if text.isascii():
        return (n + 3) // 4
    wide = (len(text.encode("utf-8")) - n) // 2
    return wide + (n - wide + 3) // 4


def stable_split(content_hash: str, holdout_fraction: float) -> str:
    """'holdout' iff int(sha256(content_hash + SPLIT_SALT)) mod 10_000 < fraction * 10_000."""
    digest = hashlib.sha256((content_hash + SPLIT_SALT).encode("ascii")).digest()
    bucket = int.from_bytes(digest, "big") % SPLIT_BUCKETS
    return "holdout" if bucket < round(holdout_fraction * SPLIT_BUCKETS) else "train"


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # canonical payload JSON
# The string escaper that _ENCODE itself uses (ensure_ascii=False), so payloads assembled from escaped
# fields are byte-identical to _ENCODE(payload), ~4x cheaper (tests/test_ingest_canonical.py checks it).
_JSON_STR = json.encoder.encode_basestring


def _json_piece(text: str) -> tuple[str, bytes, int]:
    """(text as a canonical JSON string literal, that literal in UTF-8, ``estimate_tokens(text)``).

    One UTF-8 encoding serves both the payload hash and the estimate: JSON escapes are ASCII,
    so the literal's UTF-8 bytes minus its characters are exactly the text's extra UTF-8 bytes.
    """
    literal = _JSON_STR(text)
    utf8 = literal.encode("utf-8")
    wide = (len(utf8) - len(literal)) // 2
    return literal, utf8, wide + (len(text) - wide + 3) // 4


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ufffe\uffff\ud800-\udfff]")
_BLANK_LINES = re.compile(r"\n{3,}")


class Cleaner:
    """Applies the cleaning steps listed in the module docstring to one text field."""

    def __init__(self, strip_patterns: Iterable[str] = ()):
        patterns = list(strip_patterns)
        self._strip = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._cache: dict[str, str] = {}  # system prompts repeat on every record of a task

    def cached(self, s: str) -> str:
        """Like calling the cleaner, memoised for strings that repeat (bounded memory)."""
        out = self._cache.get(s)
        if out is None:
            if len(self._cache) >= 1024:
                self._cache.clear()
            out = self._cache[s] = self(s)
        return out

    def __call__(self, s: str) -> str:
        # Printable text has none of _CONTROL's characters and no \r or \n (tests check the claim):
        # most fields skip those steps, and isprintable() is 3x faster than the regex that finds none.
        printable = s.isprintable()
        if not printable:
            s = _CONTROL.sub("", s)
        if not s.isascii():
            s = unicodedata.normalize("NFC", s)
        if not printable and "\r" in s:
            s = s.replace("\r\n", "\n").replace("\r", "\n")
        if self._strip is not None:
            s = self._strip.sub("", s)
        if not printable and "\n" in s:
            lines = s.split("\n")  # 4x faster than a regex for trailing spaces on CJK text
            if any(line[-1:].isspace() for line in lines):
                s = "\n".join(line.rstrip() for line in lines)
            if "\n\n\n" in s:
                s = _BLANK_LINES.sub("\n\n", s)
        return s.strip()


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number" if isinstance(value, (int, float)) else
                                    type(value).__name__)


class Normaliser:
    """Turns one parsed object (a JSON object, CSV row or Parquet row) into a ``Record``."""

    def __init__(self, cfg: DataConfig, count_tokens: Callable[[str], int] | None = None):
        self.cfg = cfg
        self.clean = Cleaner(cfg.strip_patterns)
        self.count_tokens = count_tokens or estimate_tokens
        # System prompts repeat on every record of a task: raw value -> (cleaned, its JSON message with the
        # trailing comma as text and as UTF-8, its token count). Counts are cached only for the built-in
        # estimate (a pure function); a caller's counter is asked for every record.
        self._systems: dict[str, tuple[str, str, bytes, int | None]] = {}
        self._pure_counter = self.count_tokens is estimate_tokens

    def __call__(self, obj: Any) -> Record:
        """Raises ``InvalidRecord`` with the reason when the object is not a usable record."""
        if not isinstance(obj, dict):
            raise InvalidRecord(f"expected a JSON object (a record), got {_type_name(obj)}")
        if "messages" in obj:
            return self._chat(self._messages(obj["messages"]), obj)
        if "instruction" in obj:
            instruction = self._field(obj, "instruction", required=True)
            extra = self._field(obj, "input")
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            return self._pair(obj, prompt, self._field(obj, "output", required=True))
        for p_key, r_key in (("prompt", "completion"), ("query", "response"), ("input", "output")):
            if p_key in obj or r_key in obj:
                prompt = self._field(obj, p_key, required=True)
                return self._pair(obj, prompt, self._field(obj, r_key, required=True))
        if "text" in obj:
            return self._text(obj)
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise InvalidRecord(f"unrecognised record shape (keys: {keys}); expected {SHAPES_HELP}")

    # -- fields ---------------------------------------------------------------------------

    def _field(self, obj: dict, key: str, *, required: bool = False) -> str:
        value = obj.get(key)
        if value is None or (value == "" and not required):
            if required:
                raise InvalidRecord(f"missing field '{key}'" if key not in obj else f"field '{key}' is null")
            return ""
        if not isinstance(value, str):
            raise InvalidRecord(f"field '{key}' must be a string, got {_type_name(value)}")
        cleaned = self.clean.cached(value) if key == "system" else self.clean(value)
        if required and not cleaned:
            raise InvalidRecord(f"field '{key}' is empty" + (" after cleaning" if value.strip() else ""))
        return cleaned

    def _category(self, obj: dict) -> str | None:
        value = obj.get("category")
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidRecord(f"field 'category' must be a string, got {_type_name(value)}")
        return self.clean(value) or None

    def _messages(self, value: Any) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise InvalidRecord("field 'messages' must be a non-empty array of {role, content} objects, got "
                           + ("an empty array" if value == [] else _type_name(value)))
        out = []
        for i, m in enumerate(value, 1):
            if not isinstance(m, dict):
                raise InvalidRecord(f"message {i} must be an object with role and content, got {_type_name(m)}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise InvalidRecord(f"message {i} has role {role!r}; allowed: system, user, assistant")
            if not isinstance(content, str):
                raise InvalidRecord(f"message {i} ({role}) content must be a string, got {_type_name(content)}")
            cleaned = self.clean(content)
            if not cleaned:
                raise InvalidRecord(f"message {i} ({role}) is empty" + (" after cleaning" if content.strip() else ""))
            out.append({"role": role, "content": cleaned})
        turns = out[1:] if out[0]["role"] == "system" else out
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                pos = i + 1 + (len(out) - len(turns))
                raise InvalidRecord(f"message {pos} is from {m['role']}, expected {expected}: after an optional "
                               f"system message, user and assistant must alternate, starting with user")
        if not turns or turns[-1]["role"] != "assistant":
            raise InvalidRecord("the last message must be from the assistant (it is what the model learns to say)")
        return out

    # -- shapes ---------------------------------------------------------------------------

    def _system(self, obj: dict) -> tuple[str, str, bytes, int | None]:
        """(cleaned system prompt, its JSON message + ',' or '' as text and as UTF-8, its token count
        or None when a caller's counter must be asked)."""
        value = obj.get("system")
        if not isinstance(value, str):
            self._field(obj, "system")  # None is no system prompt; other types raise its reason
            return "", "", b"", 0 if self._pure_counter else None
        hit = self._systems.get(value)
        if hit is None:
            cleaned = self._field(obj, "system")
            piece = f'{{"role":"system","content":{_JSON_STR(cleaned)}}},' if cleaned else ""
            tokens = (self.count_tokens(cleaned) if cleaned else 0) if self._pure_counter else None
            if len(self._systems) >= 1024:  # bounded memory
                self._systems.clear()
            hit = self._systems[value] = (cleaned, piece, piece.encode("utf-8"), tokens)
        return hit

    def _pair(self, obj: dict, prompt: str, response: str) -> Record:
        """A system? + user + assistant record; the same checks, in the same order, as ``_chat``."""
        system, system_json, system_utf8, system_tokens = self._system(obj)
        cfg = self.cfg
        if len(response) < cfg.min_response_chars:
            raise InvalidRecord(f"response has {len(response)} characters, fewer than "
                           f"data.min_response_chars={cfg.min_response_chars}")
        user_json, user_utf8, user_tokens = _json_piece(prompt)
        assistant_json, assistant_utf8, assistant_tokens = _json_piece(response)
        if system_tokens is None:  # a caller's counter: asked exactly as _chat asks it
            count = self.count_tokens
            user_tokens = (count(system) if system else 0) + count(prompt)
        else:
            user_tokens += system_tokens
        if user_tokens > cfg.max_prompt_tokens:
            raise InvalidRecord(f"prompt is {user_tokens} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens}")
        if system_tokens is None:
            assistant_tokens = self.count_tokens(response)
        if assistant_tokens > cfg.max_response_tokens:
            raise InvalidRecord(f"response is {assistant_tokens} tokens, over "
                           f"data.max_response_tokens={cfg.max_response_tokens}")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        # The same JSON twice, as text (stored) and as UTF-8 (hashed), from pieces encoded once each.
        payload_json = (f'{{"messages":[{system_json}{{"role":"user","content":{user_json}}},'
                        f'{{"role":"assistant","content":{assistant_json}}}]}}')
        payload_utf8 = b"".join((b'{"messages":[', system_utf8, b'{"role":"user","content":', user_utf8,
                                 b'},{"role":"assistant","content":', assistant_utf8, b"}]}"))
        return self._record("chat", {"messages": messages}, payload_json,
                            len(system) + len(prompt) + len(response), obj, payload_utf8)

    def _chat(self, messages: list[dict], obj: dict) -> Record:
        cfg = self.cfg
        response = messages[-1]["content"]
        if len(response) < cfg.min_response_chars:
            raise InvalidRecord(f"response has {len(response)} characters, fewer than "
                           f"data.min_response_chars={cfg.min_response_chars}")
        prompt_tokens = sum(self.count_tokens(m["content"]) for m in messages[:-1])
        if prompt_tokens > cfg.max_prompt_tokens:
            raise InvalidRecord(f"prompt is {prompt_tokens} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens}")
        response_tokens = self.count_tokens(response)
        if response_tokens > cfg.max_response_tokens:
            raise InvalidRecord(f"response is {response_tokens} tokens, over "
                           f"data.max_response_tokens={cfg.max_response_tokens}")
        # Roles are validated to be system/user/assistant, which need no escaping.
        payload_json = '{"messages":[' + ",".join(
            f'{{"role":"{m["role"]}","content":{_JSON_STR(m["content"])}}}' for m in messages) + "]}"
        return self._record("chat", {"messages": messages}, payload_json,
                            sum(len(m["content"]) for m in messages), obj)

    def _text(self, obj: dict) -> Record:
        text = self._field(obj, "text", required=True)
        limit = self.cfg.max_prompt_tokens + self.cfg.max_response_tokens
        n = self.count_tokens(text)
        if n > limit:
            raise InvalidRecord(f"text is {n} tokens, over data.max_prompt_tokens + data.max_response_tokens = {limit}")
        return self._record("text", {"text": text}, f'{{"text":{_JSON_STR(text)}}}', len(text), obj)

    def _record(self, kind: str, payload: dict, payload_json: str, n_chars: int, obj: dict,
                payload_utf8: bytes | None = None) -> Record:
        """``payload_json`` must equal ``_ENCODE(payload)`` (and ``payload_utf8`` its UTF-8, when given):
        it is what is stored and hashed."""
        category = self._category(obj)
        if payload_utf8 is None:
            payload_utf8 = payload_json.encode("utf-8")
        content_hash = hashlib.sha256(payload_utf8).hexdigest()
        return Record(kind, payload, payload_json, content_hash, category, n_chars)



def normalize_record(obj: Any, cfg: DataConfig | None = None, *,
                     count_tokens: Callable[[str], int] | None = None) -> Record:
    """Validate and clean one record object (any accepted shape) into a ``Record``.

    For one-off calls; a loop over many records should build one ``Normaliser`` and call it
    (it caches cleaned system prompts).

    Raises:
        InvalidRecord: the object is not a usable record; the message says why.
    """
    return Normaliser(cfg or DataConfig(), count_tokens)(obj)
