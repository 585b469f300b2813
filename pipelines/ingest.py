"""Files -> validated, cleaned, deduplicated records, with a reason for every line not kept.

Formats (chosen by extension, then by sniffing the first bytes):
  ``.jsonl`` / ``.ndjson``  one JSON object per line, read line by line;
  ``.json``                 a JSON array (streamed element by element), or JSON Lines, or
                            concatenated objects when it starts with ``{``;
  ``.csv`` / ``.tsv``       a header row naming the fields, then one record per row;
  ``.parquet``              read by batches of rows with pyarrow.
Files must be UTF-8 (a byte-order mark is allowed); UTF-16/32 and binary files are rejected
whole with a reason.

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

Outcomes: every record-bearing line/row/element is exactly one of accepted, duplicate or
rejected, so ``records_total == accepted + duplicates + rejected``. Blank lines are not
records. Exact duplicates are found by the sha256 of the normalised payload against everything
ever stored (``records.content_hash UNIQUE``) and within the file. Near-duplicates (against
stored records and the file itself; ``data.near_dup_threshold``, 1.0 = off) are shortlisted by
MinHash signatures of 5-character shingles with LSH banding and decided by the exact shingle
Jaccard similarity; only records with the same system prompt are compared (see
``near_dup_key``). A file that cannot be read at all (nothing in it decodes or parses) gets
one whole-file rejection (``file_error``, reported as line 0) and zero counts.

Streaming: memory does not grow with the file. Lines longer than ``max_line_bytes`` are
rejected without being loaded whole; JSON arrays are decoded element by element (an element
over ``max_line_bytes`` is rejected, and a broken array stops at the break); Parquet is read a
batch of rows at a time. Exact dedup asks the database per batch, so it holds no per-file set;
SQLite's page cache is raised to a fixed cap (``INGEST_CACHE_KIB``) while a file is ingested.
The near-duplicate index does grow with the number of stored records (about 1.8 KB each), and
is rebuilt lazily from stored payloads once per ``Store`` instance, then kept up to date.

Atomicity: one file = one ``store.transaction()``: its ``files`` row, records, rejects and the
``ingest`` event commit together, so after ``kill -9`` a file is ingested once or not at all.
``dry_run`` runs the same code inside a transaction that is rolled back.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import os
import re
import sys
import unicodedata
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from daemon.config import DataConfig

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    import sqlite3

    import numpy as np

    from daemon.config import Config
    from daemon.store import Store

SPLIT_SALT = "lorad-split-v1"  # changing it would move records between splits: never change it
SPLIT_BUCKETS = 10_000
DEFAULT_MAX_LINE_BYTES = 1 << 20
BATCH_SIZE = 512               # records per executemany / dedup query
MAX_RESULT_REJECTS = 10_000    # IngestResult.rejects keeps this many; the report and the DB keep all
READ_CHUNK = 1 << 16           # bytes read at a time by the streaming JSON decoder
READ_BUFFER = 1 << 20          # file read buffer: halves the per-line cost of readline against the 8 KiB default
INGEST_CACHE_KIB = 16 << 10    # SQLite page cache while a file is ingested (see _page_cache)
SNIFF_BYTES = 1 << 16          # bytes looked at to recognise the encoding and format

KNOWN_FIELDS = ("messages", "text", "instruction", "input", "output", "prompt", "completion",
                "query", "response", "system", "category")
# Field sets a CSV header / Parquet schema must contain for at least one record shape.
SHAPE_COLUMNS = (("messages",), ("text",), ("instruction", "output"), ("prompt", "completion"),
                 ("query", "response"), ("input", "output"))
SHAPES_HELP = ("{input, output} | {instruction, input?, output} | {prompt, completion} | "
               "{query, response, system?} | {messages: [...]} | {text}")


# ----------------------------------------------------------------------------- results


@dataclass
class IngestResult:
    """What happened to one file; ``rejects`` lists every duplicate and rejected line."""

    file: str
    records_total: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects: list[dict] = field(default_factory=list)  # {"file", "line", "outcome", "reason"}
    file_error: str | None = None                      # whole-file rejection reason
    file_id: int | None = None                         # files.id (None for dry runs and unreadable paths)
    rejects_truncated: bool = False                    # more than MAX_RESULT_REJECTS: see the report / DB

    def to_dict(self) -> dict:
        return asdict(self)

    def counts(self) -> dict:
        return {"records_total": self.records_total, "accepted": self.accepted,
                "duplicates": self.duplicates, "rejected": self.rejected}


class FileRejected(Exception):
    """The whole file cannot be read as records; ``reason`` says why and what to do."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Invalid(Exception):
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


# ----------------------------------------------------------------------------- small pure helpers


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
        # estimate (a pure function); a caller's counter is called exactly as before.
        self._systems: dict[str, tuple[str, str, bytes, int | None]] = {}
        self._pure_counter = self.count_tokens is estimate_tokens

    def __call__(self, obj: Any) -> Record:
        """Raises ``_Invalid`` with the reason when the object is not a usable record."""
        if not isinstance(obj, dict):
            raise _Invalid(f"expected a JSON object (a record), got {_type_name(obj)}")
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
        raise _Invalid(f"unrecognised record shape (keys: {keys}); expected {SHAPES_HELP}")

    # -- fields ---------------------------------------------------------------------------

    def _field(self, obj: dict, key: str, *, required: bool = False) -> str:
        value = obj.get(key)
        if value is None or (value == "" and not required):
            if required:
                raise _Invalid(f"missing field '{key}'" if key not in obj else f"field '{key}' is null")
            return ""
        if not isinstance(value, str):
            raise _Invalid(f"field '{key}' must be a string, got {_type_name(value)}")
        cleaned = self.clean.cached(value) if key == "system" else self.clean(value)
        if required and not cleaned:
            raise _Invalid(f"field '{key}' is empty" + (" after cleaning" if value.strip() else ""))
        return cleaned

    def _category(self, obj: dict) -> str | None:
        value = obj.get("category")
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Invalid(f"field 'category' must be a string, got {_type_name(value)}")
        return self.clean(value) or None

    def _messages(self, value: Any) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise _Invalid("field 'messages' must be a non-empty array of {role, content} objects, got "
                           + ("an empty array" if value == [] else _type_name(value)))
        out = []
        for i, m in enumerate(value, 1):
            if not isinstance(m, dict):
                raise _Invalid(f"message {i} must be an object with role and content, got {_type_name(m)}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise _Invalid(f"message {i} has role {role!r}; allowed: system, user, assistant")
            if not isinstance(content, str):
                raise _Invalid(f"message {i} ({role}) content must be a string, got {_type_name(content)}")
            cleaned = self.clean(content)
            if not cleaned:
                raise _Invalid(f"message {i} ({role}) is empty" + (" after cleaning" if content.strip() else ""))
            out.append({"role": role, "content": cleaned})
        turns = out[1:] if out[0]["role"] == "system" else out
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                pos = i + 1 + (len(out) - len(turns))
                raise _Invalid(f"message {pos} is from {m['role']}, expected {expected}: after an optional "
                               f"system message, user and assistant must alternate, starting with user")
        if not turns or turns[-1]["role"] != "assistant":
            raise _Invalid("the last message must be from the assistant (it is what the model learns to say)")
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
            raise _Invalid(f"response has {len(response)} characters, fewer than "
                           f"data.min_response_chars={cfg.min_response_chars}")
        user_json, user_utf8, user_tokens = _json_piece(prompt)
        assistant_json, assistant_utf8, assistant_tokens = _json_piece(response)
        if system_tokens is None:  # a caller's counter: asked exactly as _chat asks it
            count = self.count_tokens
            user_tokens = (count(system) if system else 0) + count(prompt)
        else:
            user_tokens += system_tokens
        if user_tokens > cfg.max_prompt_tokens:
            raise _Invalid(f"prompt is {user_tokens} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens}")
        if system_tokens is None:
            assistant_tokens = self.count_tokens(response)
        if assistant_tokens > cfg.max_response_tokens:
            raise _Invalid(f"response is {assistant_tokens} tokens, over "
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
            raise _Invalid(f"response has {len(response)} characters, fewer than "
                           f"data.min_response_chars={cfg.min_response_chars}")
        prompt_tokens = sum(self.count_tokens(m["content"]) for m in messages[:-1])
        if prompt_tokens > cfg.max_prompt_tokens:
            raise _Invalid(f"prompt is {prompt_tokens} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens}")
        response_tokens = self.count_tokens(response)
        if response_tokens > cfg.max_response_tokens:
            raise _Invalid(f"response is {response_tokens} tokens, over "
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
            raise _Invalid(f"text is {n} tokens, over data.max_prompt_tokens + data.max_response_tokens = {limit}")
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


# ----------------------------------------------------------------------------- parsing


def _skip_rest_of_line(f, size: int) -> int:
    """Consume the rest of an over-long line in bounded reads; return its full size in bytes."""
    while True:
        chunk = f.readline(READ_CHUNK)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return size


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})"


class _Reader:
    """Opens a file, recognises its encoding and format, and yields ``(line, object, error)``.

    Raises ``FileRejected`` at construction when the file cannot be read as records.
    ``parsed`` / ``bad`` let the caller tell "some lines are broken" from "nothing in this
    file can be read" (binary, another encoding, not JSON at all).
    """

    def __init__(self, path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.path = path
        self.cap = max_line_bytes
        self.parsed = 0        # lines/rows/elements that parsed (whatever their shape)
        self.bad = 0           # ones that did not decode or parse (a truncated last line excluded)
        self.first_bad: str | None = None
        self.first_bad_is_utf8 = False
        self._rows_total = 0   # parquet: for progress
        self._rows_done = 0
        self._f = None
        self._csv_limit: int | None = None
        try:
            self.size = path.stat().st_size
            self._f = open(path, "rb", buffering=READ_BUFFER)
            head = self._f.read(SNIFF_BYTES)
            self._f.seek(0)
        except OSError as e:
            self.close()
            raise FileRejected(f"cannot read the file: {e.strerror or e}") from None
        try:
            self.format = self._detect(head)
            self._prepare()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def _bad(self, line: int, reason: str, *, utf8: bool = False) -> str:
        """Count an undecodable/unparsable line and return its reason."""
        self.bad += 1
        if self.first_bad is None:
            self.first_bad, self.first_bad_is_utf8 = f"line {line}: {reason}", utf8
        return reason

    def whole_file_error(self) -> str | None:
        """Why nothing in the file could be read, when that is so."""
        if self.parsed or not self.bad:
            return None
        if self.first_bad_is_utf8:
            return (f"the file is not valid UTF-8: no record could be decoded ({self.first_bad}); it is binary or "
                    f"in another encoding: re-save it as UTF-8")
        what = "not JSON: no record could be parsed" if self.format.startswith("json") else \
            "no record could be parsed"
        return f"{what} ({self.first_bad})"

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._csv_limit is not None:
            csv.field_size_limit(self._csv_limit)
            self._csv_limit = None

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def progress(self) -> int:
        """Bytes (or the byte-equivalent share of rows) read so far, for the progress bar."""
        if self.format == "parquet":
            return int(self.size * self._rows_done / max(1, self._rows_total))
        try:
            return self._f.tell() if self._f is not None else self.size
        except (OSError, ValueError):
            return 0

    # -- recognising the file -------------------------------------------------------------

    def _detect(self, head: bytes) -> str:
        ext = self.path.suffix.lower()
        if head.startswith(b"PAR1") or ext in (".parquet", ".pq"):
            return "parquet"
        if not head.strip():
            raise FileRejected("the file is empty: no records")
        for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                          (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
            if head.startswith(bom):
                raise FileRejected(f"the file is {name} (byte-order mark {bom.hex(' ').upper()}); lorad reads "
                                   f"UTF-8 only: re-save it as UTF-8")
        if b"\x00" in head:
            raise FileRejected("the file contains NUL bytes: it is binary, or UTF-16/32 without a byte-order "
                               "mark; lorad reads UTF-8 text (JSONL, JSON, CSV, TSV) and Parquet")
        # Invalid UTF-8 is judged line by line (and the whole file if no line decodes).
        first = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")[:1]
        if ext in (".jsonl", ".ndjson"):
            return "jsonl"
        if ext in (".csv", ".tsv", ".tab"):
            return "tsv" if ext != ".csv" else "csv"
        if ext == ".json" or first in ("[", "{"):
            if first == "[":
                return "json_array"
            if first == "{":
                return "jsonl" if self._first_line_is_json() else "json_stream"
            raise FileRejected(f"not JSON: a .json file must start with '[' or '{{', found {first!r}")
        raise FileRejected(f"unsupported file type {ext or '(no extension)'!r}: use .jsonl, .json, .csv, .tsv "
                           f"or .parquet (content starting with {first!r} is not recognised)")

    def _first_line_is_json(self) -> bool:
        line = self._f.readline(self.cap + 1)
        self._f.seek(0)
        try:
            return isinstance(json.loads(line.decode("utf-8-sig")), dict)
        except (ValueError, RecursionError):
            return False

    def _prepare(self) -> None:
        if self.format in ("csv", "tsv"):
            self._csv_prepare()
        elif self.format == "parquet":
            self._parquet_prepare()

    def __iter__(self) -> Iterator[tuple[int, Any, str | None]]:
        return {"jsonl": self._iter_jsonl, "json_array": self._iter_json_values,
                "json_stream": self._iter_json_values, "csv": self._iter_csv, "tsv": self._iter_csv,
                "parquet": self._iter_parquet}[self.format]()

    # -- JSON Lines -----------------------------------------------------------------------

    def _iter_jsonl(self) -> Iterator[tuple[int, Any, str | None]]:
        f, cap, loads = self._f, self.cap, json.loads
        lineno = 0
        while True:
            raw = f.readline(cap + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                size = _skip_rest_of_line(f, len(raw))
                yield lineno, None, f"line is {size} bytes, over the {cap}-byte limit (max_line_bytes)"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, self._bad(lineno, f"line is {_utf8_error(e)}", utf8=True)
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue  # blank lines are not records
            try:
                obj = loads(text)
            except ValueError as e:
                if not raw.endswith(b"\n"):
                    yield lineno, None, ("truncated last line: no newline at the end of the file and not valid "
                                         "JSON; the file may still have been being written")
                    continue
                reason = f"invalid JSON: {getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}"
                yield lineno, None, self._bad(lineno, reason)
                continue
            except RecursionError:
                self.parsed += 1
                yield lineno, None, "JSON nested too deeply"
                continue
            self.parsed += 1
            yield lineno, obj, None

    # -- JSON arrays and concatenated objects ---------------------------------------------

    def _iter_json_values(self) -> Iterator[tuple[int, Any, str | None]]:
        """Decode a JSON array (or a stream of top-level values) one element at a time."""
        f, cap = self._f, self.cap
        decode = json.JSONDecoder().raw_decode
        utf8 = codecs.getincrementaldecoder("utf-8")()
        is_array = self.format == "json_array"
        buf, pos, eof = "", 0, False

        def more(n: int = READ_CHUNK) -> bool:
            """Append up to n more bytes of text to buf; False once the file is exhausted."""
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(n)
            eof = not chunk
            buf = buf[pos:] + utf8.decode(chunk, final=eof)
            pos = 0
            return not eof

        def skip_ws() -> bool:
            """Move pos to the next non-space character; False at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf):
                    return True
                if not more():
                    return False

        index = 0
        try:
            if is_array:
                skip_ws()
                pos += 1  # the '[' found by _detect
                if skip_ws() and buf[pos] == "]":
                    return
            while True:
                if not skip_ws():
                    if is_array:
                        yield index + 1, None, ("truncated JSON array: the file ends before the closing ']' "
                                                "(it may still have been being written)")
                    return
                while True:  # decode one element, reading more until it is complete
                    try:
                        value, end = decode(buf, pos)
                    except ValueError as e:
                        if len(buf) - pos > cap:
                            yield index + 1, None, (f"element {index + 1} is over the {cap}-byte limit "
                                                    f"(max_line_bytes) or invalid; the rest of the file was not read")
                            return
                        if more(max(READ_CHUNK, len(buf) - pos)):
                            continue
                        msg = getattr(e, "msg", str(e))
                        cut = msg.startswith("Unterminated") or getattr(e, "pos", 0) >= len(buf) - 1
                        reason = f"invalid JSON in element {index + 1}: {msg}" + (
                            " (the file ends inside it: truncated, or still being written)" if cut else "")
                        yield index + 1, None, self._bad(index + 1, reason) + "; the rest of the file was not read"
                        return
                    except RecursionError:
                        yield index + 1, None, "JSON nested too deeply; the rest of the file was not read"
                        return
                    if end == len(buf) and more():  # a number or literal may go on in the next chunk
                        continue
                    break
                index += 1
                self.parsed += 1
                size, pos = end - pos, end
                if size > cap:
                    yield index, None, f"element is over the {cap}-byte limit (max_line_bytes)"
                else:
                    yield index, value, None
                if not is_array:
                    continue
                if not skip_ws():
                    yield index + 1, None, ("truncated JSON array: the file ends before the closing ']' "
                                            "(it may still have been being written)")
                    return
                if buf[pos] == "]":
                    return
                if buf[pos] != ",":
                    reason = f"invalid JSON array: expected ',' or ']' after element {index}, found {buf[pos]!r}"
                    yield index + 1, None, self._bad(index + 1, reason) + "; the rest of the file was not read"
                    return
                pos += 1
        except UnicodeDecodeError as e:
            reason = f"the file is {_utf8_error(e)} near element {index + 1}"
            yield index + 1, None, self._bad(index + 1, reason, utf8=True) + "; the rest of the file was not read"

    # -- CSV / TSV ------------------------------------------------------------------------

    def _csv_prepare(self) -> None:
        self._csv_limit = csv.field_size_limit(max(self.cap, 1024))
        self._phys = 0                          # physical lines read
        self._row_start: int | None = None      # first physical line of the row being read
        self._skipped: list[tuple[int, str, bool]] = []  # (line, reason, is_utf8) dropped before csv saw them
        self._csv = csv.reader(self._csv_lines(), delimiter="\t" if self.format == "tsv" else ",")
        try:
            header = next(r for r in self._csv if any(c.strip() for c in r))
        except StopIteration:
            raise FileRejected("the CSV file has no header row and no records") from None
        except csv.Error as e:
            raise FileRejected(f"the CSV header cannot be parsed: {e}") from None
        self._header = [h.strip().lower() for h in header]
        usable = set(self._header)
        if not any(all(c in usable for c in cols) for cols in SHAPE_COLUMNS):
            sep = "tab" if self.format == "tsv" else "comma"
            raise FileRejected(f"the {self.format.upper()} header has no usable columns (found: "
                               f"{', '.join(self._header)[:300]}); it needs the columns of one record shape: "
                               f"{SHAPES_HELP} ({sep}-separated)")
        self._skipped.clear()  # lines skipped before the header are not records

    def _csv_lines(self) -> Iterator[str]:
        f, cap = self._f, self.cap
        while True:
            raw = f.readline(cap + 1)
            if not raw:
                return
            self._phys += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                size = _skip_rest_of_line(f, len(raw))
                self._skipped.append((self._phys, f"line is {size} bytes, over the {cap}-byte limit", False))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._skipped.append((self._phys, f"line is {_utf8_error(e)}", True))
                continue
            if self._phys == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if self._row_start is None:
                self._row_start = self._phys
            yield text

    def _iter_csv(self) -> Iterator[tuple[int, Any, str | None]]:
        header, n = self._header, len(self._header)
        while True:
            self._row_start = None
            try:
                row = next(self._csv)
                error = None
            except StopIteration:
                row, error = None, None
            except csv.Error as e:
                row, error = [], f"CSV parse error: {e}"
            for line, reason, utf8 in self._skipped:
                yield line, None, self._bad(line, reason, utf8=True) if utf8 else reason
            self._skipped.clear()
            if row is None:
                return
            line = self._row_start or self._phys
            if error:
                yield line, None, self._bad(line, error)
                continue
            if not any(c.strip() for c in row):
                continue  # blank line
            if len(row) != n:
                yield line, None, self._bad(line, f"row has {len(row)} fields, the header has {n}")
                continue
            obj = {k: v for k, v in zip(header, row) if k in KNOWN_FIELDS}
            self.parsed += 1
            if "messages" in obj:
                try:
                    obj["messages"] = json.loads(obj["messages"])
                except (ValueError, RecursionError):
                    yield line, None, "column 'messages' is not a JSON array of {role, content} objects"
                    continue
            yield line, obj, None

    # -- Parquet --------------------------------------------------------------------------

    def _parquet_prepare(self) -> None:
        import pyarrow.parquet as pq

        try:
            self._pq = pq.ParquetFile(self._f)
            names = self._pq.schema_arrow.names
            self._rows_total = self._pq.metadata.num_rows
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise FileRejected(f"not a readable Parquet file: {e}") from None
        self._columns = [c for c in names if c.strip().lower() in KNOWN_FIELDS]
        usable = {c.strip().lower() for c in self._columns}
        if not any(all(c in usable for c in cols) for cols in SHAPE_COLUMNS):
            raise FileRejected(f"the Parquet schema has no usable columns (found: {', '.join(names)[:300]}); "
                               f"it needs the columns of one record shape: {SHAPES_HELP}")

    def _iter_parquet(self) -> Iterator[tuple[int, Any, str | None]]:
        rename = {c: c.strip().lower() for c in self._columns}
        line = 0
        batches = self._pq.iter_batches(batch_size=1024, columns=self._columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a corrupt row group: keep what was read, say where it stopped
                yield line + 1, None, f"Parquet read error: {e}; the rest of the file was not read"
                return
            for row in batch.to_pylist():
                line += 1
                self._rows_done = self.parsed = line
                yield line, {rename[k]: v for k, v in row.items()}, None


def iter_records(path: str | os.PathLike, cfg: DataConfig | None = None, *,
                 count_tokens: Callable[[str], int] | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Parsed]:
    """Parse, validate and clean one file without a store: one ``Parsed`` per record-bearing line.

    No deduplication happens here. Used by ``ingest_file`` and by readers such as the drift
    CLI (``[p.record.payload for p in iter_records(f) if p.record]``).

    Raises:
        FileRejected: the file cannot be read as records at all (encoding, binary, format).
    """
    normalise = Normaliser(cfg or DataConfig(), count_tokens)
    with _Reader(Path(path), max_line_bytes) as reader:
        for line, obj, error in reader:
            if error is None:
                try:
                    yield Parsed(line, normalise(obj), None)
                    continue
                except _Invalid as e:
                    error = str(e)
            yield Parsed(line, None, error)


# ----------------------------------------------------------------------------- near-duplicates


NUM_PERM = 128       # MinHash values per signature (a power of two: one bin each)
SHINGLE_CHARS = 5    # character shingles; 5 keeps Chinese (1 char ~ 1 word) and Latin text discriminative
VERIFY_SLACK = 0.1   # signature estimates this far below the threshold are checked on the real texts
_MERSENNE_MULT = 0x9E3779B97F4A7C15


def near_dup_key(payload: dict) -> tuple[bytes, str]:
    """(scope, text) compared for near-duplicates.

    ``text`` is the user and assistant turns (or the text record), lower-cased with spaces
    collapsed. Only records with the same system prompt (``scope``, a hash of it) can be
    near-duplicates: a task template is shared by all its records, so comparing it would make
    every short record of a task look alike, while the same question under another task's
    instruction (LawBench 3-1 and 3-4 share their case facts) is a different example.
    """
    if "text" in payload:
        return b"", " ".join(payload["text"].lower().split())
    system = "\n".join(m["content"] for m in payload["messages"] if m["role"] == "system")
    text = "\n".join(m["content"] for m in payload["messages"] if m["role"] != "system")
    scope = hashlib.sha256(system.encode("utf-8")).digest()[:8] if system else b""
    return scope, " ".join(text.lower().split())


def shingle_jaccard(a: str, b: str, k: int = SHINGLE_CHARS) -> float:
    """Exact Jaccard similarity of the k-character shingle sets of two texts."""
    sa = {a[i:i + k] for i in range(max(1, len(a) - k + 1))}
    sb = {b[i:i + k] for i in range(max(1, len(b) - k + 1))}
    return len(sa & sb) / len(sa | sb)


class MinHasher:
    """MinHash signatures of character shingles, stable across processes (numpy, no Python hash()).

    One-permutation hashing: each shingle is hashed once; its top bits pick one of
    ``num_perm`` bins and the signature keeps the smallest low-32-bit value per bin. Empty bins
    (short texts) borrow the next non-empty bin's value, shifted by the distance
    ("rotation" densification), so two signatures still agree in a share of positions that
    estimates the Jaccard similarity of the shingle sets. O(shingles), not O(shingles x num_perm).
    """

    def __init__(self, num_perm: int = NUM_PERM, shingle: int = SHINGLE_CHARS):
        import numpy as np

        if num_perm < 2 or num_perm & (num_perm - 1):
            raise ValueError(f"num_perm must be a power of two >= 2, got {num_perm}")
        self.np = np
        self.k = shingle
        self.num_perm = num_perm
        self._bin_shift = np.uint64(64 - (num_perm.bit_length() - 1))

    def signature(self, text: str) -> "np.ndarray":
        np = self.np
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        k = max(1, min(self.k, len(codes)))
        n = len(codes) - k + 1
        if n <= 0:
            codes, n = np.zeros(1, dtype=np.uint64), 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # polynomial hash of each shingle; uint64 arithmetic wraps on purpose
            h = h * np.uint64(1_000_003) + codes[j:j + n]
        # splitmix64 finaliser: every output bit depends on every input bit
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(_MERSENNE_MULT)
        h ^= h >> np.uint64(31)
        empty = np.uint64(1 << 32)
        sig = np.full(self.num_perm, empty, dtype=np.uint64)
        np.minimum.at(sig, (h >> self._bin_shift).astype(np.intp), h & np.uint64(0xFFFFFFFF))
        missing = sig == empty
        if missing.any():
            full = np.flatnonzero(~missing)
            idx = np.arange(self.num_perm)
            nxt = np.searchsorted(full, idx) % len(full)      # next non-empty bin, circularly
            src = full[nxt]
            shift = ((src - idx) % self.num_perm).astype(np.uint64)
            sig = (sig[src] + shift * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
        return sig.astype(np.uint32)


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most selective banding that still makes a pair AT the threshold a
    candidate with probability >= 0.99; candidates are then checked on the full signature."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


class NearDupIndex:
    """LSH index over MinHash signatures, keyed by content hash, with rollback to a mark.

    Each band of a signature is hashed to one integer, mixed with the record's scope (its
    system prompt's hash) so only records of the same scope meet. Buckets hold a bare slot
    number until a second record lands in them; signatures live in one growing uint32 array.
    About 1.8 KB of memory per indexed record (measured at threshold 0.9: 12 bands).
    """

    def __init__(self, threshold: float, hasher: MinHasher | None = None):
        self.threshold = threshold
        self.hasher = hasher or MinHasher()
        np = self.hasher.np
        self.bands, self.rows = lsh_params(threshold, self.hasher.num_perm)
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.keys: list[str] = []
        self.scopes: list[bytes] = []
        self._sigs = np.empty((1024, self.hasher.num_perm), dtype=np.uint32)
        self._mult = np.random.default_rng(0x15AD).integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)
        self.built_upto = 0  # highest records.id already indexed

    def signature(self, payload: dict) -> tuple[bytes, str, Any]:
        """(scope, compared text, MinHash signature) of a stored payload."""
        scope, text = near_dup_key(payload)
        return scope, text, self.hasher.signature(text)

    def _band_keys(self, scope: bytes, sig) -> list[int]:
        np = self.hasher.np
        bands = sig[:self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        keys = (bands * self._mult).sum(axis=1, dtype=np.uint64)  # wraps: a hash, not a number
        return (keys ^ np.uint64(int.from_bytes(scope.ljust(8, b"\0"), "little"))).tolist()

    def candidates(self, scope: bytes, sig, prefer: str | None = None) -> list[tuple[str, float]]:
        """Indexed keys whose estimated similarity is within VERIFY_SLACK of the threshold, best first.

        A candidate whose key equals ``prefer`` (the record's own content hash: an exact
        duplicate) is returned alone, at once.
        """
        found: list[tuple[str, float]] = []
        seen: set[int] = set()
        floor = self.threshold - VERIFY_SLACK
        for bucket, band in zip(self.buckets, self._band_keys(scope, sig)):
            entry = bucket.get(band)
            if entry is None:
                continue
            for slot in (entry,) if isinstance(entry, int) else entry:
                if slot in seen or self.scopes[slot] != scope:
                    continue
                seen.add(slot)
                if self.keys[slot] == prefer:
                    return [(prefer, 1.0)]
                sim = float((self._sigs[slot] == sig).mean())
                if sim >= floor:
                    found.append((self.keys[slot], sim))
        return sorted(found, key=lambda c: -c[1])

    def add(self, key: str, scope: bytes, sig) -> None:
        slot = len(self.keys)
        if slot == len(self._sigs):
            self._sigs = self.hasher.np.concatenate([self._sigs, self.hasher.np.empty_like(self._sigs)])
        self._sigs[slot] = sig
        self.keys.append(key)
        self.scopes.append(scope)
        for bucket, band in zip(self.buckets, self._band_keys(scope, sig)):
            entry = bucket.get(band)
            if entry is None:
                bucket[band] = slot
            elif isinstance(entry, int):
                bucket[band] = [entry, slot]
            else:
                entry.append(slot)

    def mark(self) -> int:
        return len(self.keys)

    def rollback(self, mark: int) -> None:
        """Forget everything added after ``mark`` (a rolled-back or dry-run transaction)."""
        while len(self.keys) > mark:
            slot = len(self.keys) - 1
            for bucket, band in zip(self.buckets, self._band_keys(self.scopes[slot], self._sigs[slot])):
                entry = bucket[band]
                if isinstance(entry, int):
                    del bucket[band]
                else:
                    entry.pop()
                    if len(entry) == 1:
                        bucket[band] = entry[0]
            self.keys.pop()
            self.scopes.pop()

    def catch_up(self, db: "sqlite3.Connection") -> None:
        """Index stored records newer than ``built_upto`` (all of them the first time)."""
        cur = db.execute("SELECT id, content_hash, payload FROM records WHERE id > ? ORDER BY id",
                         (self.built_upto,))
        for rid, content_hash, payload in cur:
            scope, _, sig = self.signature(json.loads(payload))
            self.add(content_hash, scope, sig)
            self.built_upto = rid


# One index per (Store, threshold), rebuilt lazily from stored payloads; see module docstring.
_NEAR_DUP_INDEXES: "weakref.WeakKeyDictionary[Any, dict[float, NearDupIndex]]" = weakref.WeakKeyDictionary()


def _near_dup_index(store: "Store", threshold: float) -> NearDupIndex:
    per_store = _NEAR_DUP_INDEXES.setdefault(store, {})
    if threshold not in per_store:
        hasher = next(iter(per_store.values())).hasher if per_store else None
        per_store[threshold] = NearDupIndex(threshold, hasher)
    return per_store[threshold]


# ----------------------------------------------------------------------------- ingesting one file


class _RollBack(Exception):
    """Raised inside a dry run's transaction so that nothing it wrote is kept."""


@contextlib.contextmanager
def _transaction(store: "Store", dry_run: bool) -> Iterator["sqlite3.Connection"]:
    try:
        with store.transaction() as tx:
            yield tx
            if dry_run:
                raise _RollBack
    except _RollBack:
        pass


@contextlib.contextmanager
def _page_cache(db: "sqlite3.Connection", kib: int) -> Iterator[None]:
    """Raise the connection's page cache to ``kib`` KiB for the block, then restore it.

    Records arrive in file order but their content hashes are random, so every insert touches a
    random page of the ``content_hash`` UNIQUE index; with SQLite's default 2 MiB cache those pages
    are spilled and re-read over and over once the index outgrows it (~20k records). 16 MiB holds
    the index of ~150k stored records (measured: 100k inserts into a fresh store, 21 -> 18 us each;
    32 MiB was slower again); it is a cap, so memory still does not grow with the file.
    """
    before = db.execute("PRAGMA cache_size").fetchone()[0]
    db.execute(f"PRAGMA cache_size = -{int(kib)}")  # negative = KiB, positive = pages
    try:
        yield
    finally:
        db.execute(f"PRAGMA cache_size = {int(before)}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _FileIngest:
    """The state of one file's ingest inside its transaction (batches, counts, report)."""

    def __init__(self, store: "Store", tx: "sqlite3.Connection", cfg: DataConfig, result: IngestResult,
                 file_id: int, report, now: float):
        self.store, self.tx, self.cfg, self.result, self.file_id = store, tx, cfg, result, file_id
        self.report = report
        self.now = now
        self.batch: list[tuple[int, Record | None, str | None]] = []
        self.near = None
        if cfg.near_dup_threshold < 1.0:
            self.near = _near_dup_index(store, cfg.near_dup_threshold)
            self.near.catch_up(tx)
            self.near_mark = self.near.mark()
        self.in_file: dict[str, int] = {}  # content hash -> line, for records of the current batch
        self.batch_texts: dict[str, str] = {}  # content hash -> near-dup text, for the current batch
        self._reject_rows: list[tuple] = []

    def _outcome(self, line: int, outcome: str, reason: str) -> None:
        r = self.result
        if outcome == "duplicate":
            r.duplicates += 1
        else:
            r.rejected += 1
        entry = {"file": r.file, "line": line, "outcome": outcome, "reason": reason}
        if len(r.rejects) < MAX_RESULT_REJECTS:
            r.rejects.append(entry)
        else:
            r.rejects_truncated = True
        if self.report is not None:
            self.report.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._reject_rows.append((self.file_id, line, outcome, reason))

    def _where(self, content_hash: str) -> str:
        """'line N' (this file) or 'NAME line N' for a stored record with this content hash."""
        row = self.tx.execute("SELECT r.file_id, r.line, f.name FROM records r JOIN files f ON f.id = r.file_id "
                              "WHERE r.content_hash = ?", (content_hash,)).fetchone()
        if row is None:  # in this batch, not inserted yet
            return f"line {self.in_file[content_hash]}" if content_hash in self.in_file else "a stored record"
        return f"line {row[1]}" if row[0] == self.file_id else f"{row[2]} line {row[1]}"

    def flush(self) -> None:
        """Decide the outcome of every line in the batch and write its records and rejects."""
        if not self.batch:
            return
        cfg, near = self.cfg, self.near
        outcomes: list[tuple[int, str, str]] = []  # (line, outcome, reason), emitted in line order
        repeats: list[tuple[int, str]] = []         # (line, hash) repeating an earlier line of this batch
        in_file, file_id, now, holdout_fraction = self.in_file, self.file_id, self.now, cfg.holdout_fraction
        in_file.clear()
        self.batch_texts.clear()
        rows = []
        for line, rec, error in self.batch:
            if rec is None:
                outcomes.append((line, "rejected", error))
                continue
            h = rec.content_hash
            if h in in_file:
                repeats.append((line, h))
                continue
            if near is not None:  # the index holds every stored record, so it also finds exact duplicates
                scope, text, sig = near.signature(rec.payload)
                match = self._near_match(h, scope, text, sig)
                if match is not None:
                    key, sim = match
                    reason = (f"exact duplicate of {self._where(key)}" if key == h else
                              f"near-duplicate (similarity {sim:.2f} >= data.near_dup_threshold="
                              f"{cfg.near_dup_threshold}) of {self._where(key)}")
                    outcomes.append((line, "duplicate", reason))
                    continue
                near.add(h, scope, sig)
                self.batch_texts[h] = text
            in_file[h] = line
            rows.append((h, file_id, line, rec.kind, rec.payload_json, rec.category,
                         stable_split(h, holdout_fraction), rec.n_chars, now))
        stored_elsewhere: dict[str, str] = {}
        if rows:
            # Optimistic insert: the UNIQUE index skips records stored before (by earlier files or
            # earlier batches of this one); only when some were skipped do we ask which.
            before = self.tx.total_changes
            self.tx.executemany("INSERT OR IGNORE INTO records (content_hash, file_id, line, kind, payload, category, "
                                "split, n_chars, ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            inserted = self.tx.total_changes - before
            if inserted < len(rows):
                stored_elsewhere = self._skipped_as_stored(rows)
                outcomes += [(line, "duplicate", f"exact duplicate of {stored_elsewhere[h]}")
                             for h, _, line, *_ in rows if h in stored_elsewhere]
            self.result.accepted += inserted
        for line, h in repeats:
            where = stored_elsewhere.get(h) or f"line {self.in_file[h]}"
            outcomes.append((line, "duplicate", f"exact duplicate of {where}"))
        self._reject_rows = []
        for line, outcome, reason in sorted(outcomes):
            self._outcome(line, outcome, reason)
        if self._reject_rows:
            self.tx.executemany("INSERT INTO rejects (file_id, line, outcome, reason) VALUES (?, ?, ?, ?)",
                                self._reject_rows)
        self.batch.clear()  # in place: _read_all appends to this very list

    def _near_match(self, h: str, scope: bytes, text: str, sig) -> tuple[str, float] | None:
        """The stored (or earlier in this file) record this one duplicates, with the exact similarity.

        The signature only shortlists candidates; the decision is the exact shingle Jaccard of
        the two texts, so short texts (whose signature estimates are noisier) are judged right.
        """
        for key, _ in self.near.candidates(scope, sig, prefer=h):
            if key == h:
                return key, 1.0
            other = self.batch_texts.get(key)
            if other is None:
                row = self.tx.execute("SELECT payload FROM records WHERE content_hash = ?", (key,)).fetchone()
                if row is None:
                    continue
                other = near_dup_key(json.loads(row[0]))[1]
            sim = shingle_jaccard(text, other)
            if sim >= self.near.threshold:
                return key, sim
        return None

    def _skipped_as_stored(self, rows: list[tuple]) -> dict[str, str]:
        """Hash -> where it is stored, for the rows the INSERT OR IGNORE skipped as already stored."""
        hashes = [r[0] for r in rows]
        stored: dict[str, tuple[int, int, str]] = {}
        for i in range(0, len(hashes), 500):  # stay under SQLite's bound-parameter limit
            part = hashes[i:i + 500]
            sql = ("SELECT r.content_hash, r.file_id, r.line, f.name FROM records r JOIN files f ON f.id = r.file_id "
                   f"WHERE r.content_hash IN ({','.join('?' * len(part))})")
            for h, fid, line, name in self.tx.execute(sql, part):
                stored[h] = (fid, line, name)
        where = {}
        for h, _, line, *_ in rows:
            fid, first, name = stored[h]
            if (fid, first) != (self.file_id, line):
                where[h] = f"line {first}" if fid == self.file_id else f"{name} line {first}"
        return where

    def finish(self, committed: bool, max_id: int) -> None:
        """Keep this file's signatures in the near-dup index only if its transaction committed."""
        if self.near is None:
            return
        if committed:
            self.near.built_upto = max(self.near.built_upto, max_id)
        else:
            self.near.rollback(self.near_mark)


def ingest_file(path: str | os.PathLike, store: "Store", cfg: DataConfig, *, source: str = "cli",
                count_tokens: Callable[[str], int] | None = None, dry_run: bool = False,
                report_path: str | os.PathLike | None = None,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> IngestResult:
    """Ingest one file into the store in ONE transaction; never raises on bad user data.

    Args:
        path: the file (JSONL, JSON, CSV, TSV or Parquet; see the module docstring).
        store: the state store; records, rejects, the files row and an ``ingest`` event are written.
        cfg: the ``data`` section of the config (limits, cleaning, dedup, holdout share).
        source: 'inbox' or 'cli', stored in ``files.source``.
        count_tokens: the model's token counter; default ``estimate_tokens``.
        dry_run: do everything, report the same counts, write nothing (the transaction is rolled back).
        report_path: where to write the JSONL report of duplicates and rejects (atomically, after
            the commit); None = no report file.
        max_line_bytes: longer lines (and JSON array elements) are rejected without being loaded whole.

    Raises:
        OSError / sqlite3.Error: only for unwritable state (report folder, database), never for the file.
    """
    path = Path(path)
    result = IngestResult(file=str(path))
    try:
        stat = path.stat()
        sha = _file_sha256(path)
    except OSError as e:
        result.file_error = f"cannot read the file: {e.strerror or e}"
        result.rejects = [{"file": result.file, "line": 0, "outcome": "rejected", "reason": result.file_error}]
        return result
    report = tmp_report = None
    if report_path is not None and not dry_run:  # fails early (unwritable folder) before any work
        tmp_report = Path(f"{report_path}.tmp")
        report = open(tmp_report, "w", encoding="utf-8")
    reader: _Reader | None = None
    try:
        reader = _Reader(path, max_line_bytes)
    except FileRejected as e:
        result.file_error = e.reason
    except BaseException:
        if report is not None:
            report.close()
            tmp_report.unlink(missing_ok=True)
        raise
    normalise = Normaliser(cfg, count_tokens)
    committed, work, max_id = False, None, 0
    try:
        with _transaction(store, dry_run) as tx, _page_cache(tx, INGEST_CACHE_KIB):
            now = store.clock()
            file_id = tx.execute(
                "INSERT INTO files (path, name, sha256, size, mtime, source, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'ingesting', ?)",
                (str(path.absolute()), path.name, sha, stat.st_size, stat.st_mtime, source, now)).lastrowid
            work = _FileIngest(store, tx, cfg, result, file_id, report, now)
            if reader is not None:
                _read_all(reader, normalise, work, result)
                work.flush()
                result.file_error = reader.whole_file_error()
                if result.file_error is None and result.records_total == 0:
                    result.file_error = "no records: the file holds no lines, rows or array elements"
            if result.file_error is not None:
                _reject_whole_file(tx, result, file_id, report)
            status = "rejected" if result.file_error else "done"
            tx.execute("UPDATE files SET status = ?, reason = ?, records_total = ?, accepted = ?, "
                       "duplicates = ?, rejected = ?, finished_at = ? WHERE id = ?",
                       (status, result.file_error, result.records_total, result.accepted,
                        result.duplicates, result.rejected, store.clock(), file_id))
            store.add_event("ingest", subject=path.name, ok=result.file_error is None,
                            reason=result.file_error or _summary_line(result), actor=_actor(source),
                            data={**result.counts(), "file_id": file_id, "dry_run": dry_run}, db=tx)
            max_id = tx.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]
        committed = not dry_run
        result.file_id = file_id if committed else None
    finally:
        if work is not None:
            work.finish(committed, max_id)
        if reader is not None:
            reader.close()
        if report is not None:
            report.close()
            if committed:
                os.replace(tmp_report, report_path)
            else:
                tmp_report.unlink(missing_ok=True)
    return result


def _read_all(reader: _Reader, normalise: Normaliser, work: _FileIngest, result: IngestResult) -> None:
    """Feed every parsed line to ``work``, with a progress bar on a terminal for long files."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=reader.size, unit="B", unit_scale=True, desc=reader.path.name, file=sys.stderr,
                   delay=2.0, leave=False)
    try:
        batch = work.batch
        for line, obj, error in reader:
            result.records_total += 1
            record = None
            if error is None:
                try:
                    record = normalise(obj)
                except _Invalid as e:
                    error = str(e)
            batch.append((line, record, error))
            if len(batch) >= BATCH_SIZE:
                work.flush()
                if bar is not None:
                    bar.update(reader.progress() - bar.n)
    finally:
        if bar is not None:
            bar.close()


def _reject_whole_file(tx: "sqlite3.Connection", result: IngestResult, file_id: int, report) -> None:
    """Replace any per-line outcomes by one whole-file rejection (line 0) with zero counts."""
    tx.execute("DELETE FROM rejects WHERE file_id = ?", (file_id,))
    tx.execute("DELETE FROM records WHERE file_id = ?", (file_id,))
    result.records_total = result.accepted = result.duplicates = result.rejected = 0
    entry = {"file": result.file, "line": 0, "outcome": "rejected", "reason": result.file_error}
    result.rejects = [entry]
    result.rejects_truncated = False
    tx.execute("INSERT INTO rejects (file_id, line, outcome, reason) VALUES (?, 0, 'rejected', ?)",
               (file_id, result.file_error))
    if report is not None:
        report.seek(0)
        report.truncate()
        report.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _actor(source: str) -> str:
    return "cli" if source == "cli" else "daemon"


def _summary_line(r: IngestResult | dict) -> str:
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return (f"{get('records_total')} records: {get('accepted')} accepted, {get('duplicates')} duplicates, "
            f"{get('rejected')} rejected")


def write_report_from_store(store: "Store", file_id: int, report_path: str | os.PathLike) -> int:
    """Rewrite a file's rejects report from the database (after a crash between commit and report).

    Returns the number of entries written.
    """
    row = store.query_one("SELECT path FROM files WHERE id = ?", (file_id,))
    if row is None:
        raise ValueError(f"no file with id {file_id} in the store")
    rows = store.query("SELECT line, outcome, reason FROM rejects WHERE file_id = ? ORDER BY line, id", (file_id,))
    tmp = Path(f"{report_path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"file": row["path"], "line": r["line"], "outcome": r["outcome"],
                                "reason": r["reason"]}, ensure_ascii=False) + "\n")
    os.replace(tmp, report_path)
    return len(rows)


# ----------------------------------------------------------------------------- many files, CLI


def ingest_files(paths: Iterable[str | os.PathLike], store: "Store", cfg: DataConfig, **kw: Any) -> dict:
    """Ingest several files (one transaction each) and sum the outcomes: the CLI's JSON.

    Returns:
        {"files": [per-file counts and file_error], "records_total", "accepted", "duplicates",
         "rejected", "rejects": [{"file", "line", "outcome", "reason"}], "dry_run"}
    """
    out: dict[str, Any] = {"files": [], "records_total": 0, "accepted": 0, "duplicates": 0, "rejected": 0,
                           "rejects": [], "dry_run": bool(kw.get("dry_run", False))}
    for p in paths:
        r = ingest_file(p, store, cfg, **kw)
        out["files"].append({"file": r.file, **r.counts(), "file_error": r.file_error, "file_id": r.file_id,
                             "rejects_truncated": r.rejects_truncated})
        for key in ("records_total", "accepted", "duplicates", "rejected"):
            out[key] += getattr(r, key)
        out["rejects"].extend(r.rejects)
    return out


def cli_ingest(paths: list[str], cfg: "Config", *, dry_run: bool) -> dict:
    """`lorad ingest`: ingest files into the store at cfg.paths.state_dir; the files are not moved.

    A dry run against a state folder without a database uses an in-memory one, so it creates nothing.
    """
    from daemon.store import DB_NAME, Store, open_store

    if dry_run and not (Path(cfg.paths.state_dir) / DB_NAME).exists():
        store = Store(":memory:")
    else:
        store = open_store(cfg.paths.state_dir)
    try:
        return ingest_files(paths, store, cfg.data, source="cli", dry_run=dry_run)
    finally:
        store.close()


def format_ingest_summary(result: dict, *, max_rejects_per_file: int = 20) -> str:
    """Human-readable summary of ``ingest_files``/``cli_ingest`` output, one block per file."""
    by_file: dict[str, list[dict]] = {}
    for r in result.get("rejects", []):
        by_file.setdefault(r["file"], []).append(r)
    lines = []
    for f in result.get("files", []):
        if f.get("file_error"):
            lines.append(f"{f['file']}: REJECTED: {f['file_error']}")
            continue
        lines.append(f"{f['file']}: {_summary_line(f)}")
        entries = [r for r in by_file.get(f["file"], []) if r["line"] != 0]
        for r in entries[:max_rejects_per_file]:
            lines.append(f"  line {r['line']}: {r.get('outcome', 'rejected')}: {r['reason']}")
        hidden = f["duplicates"] + f["rejected"] - min(len(entries), max_rejects_per_file)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more (all are in the rejects table of lorad.db)")
    n = len(result.get("files", []))
    lines.append(f"total: {n} file{'s' if n != 1 else ''}, {_summary_line(result)}")
    if result.get("dry_run"):
        lines.append("dry run: nothing was written")
    return "\n".join(lines)
