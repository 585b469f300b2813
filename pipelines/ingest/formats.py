"""The file readers: recognise a file's encoding and format and yield its objects one by one.

Formats (chosen by extension, then by sniffing the first bytes):
  ``.jsonl`` / ``.ndjson``  one JSON object per line, read line by line;
  ``.json``                 a JSON array (streamed element by element), or JSON Lines, or
                            concatenated objects when it starts with ``{``;
  ``.csv`` / ``.tsv``       a header row naming the fields, then one record per row;
  ``.parquet``              read by batches of rows with pyarrow.
Files must be UTF-8 (a byte-order mark is allowed); UTF-16/32 and binary files are rejected
whole with a reason.

Streaming: lines longer than ``max_line_bytes`` are rejected without being loaded whole; JSON
arrays are decoded element by element (an element over ``max_line_bytes`` is rejected, and a
broken array stops at the break); Parquet is read a batch of rows at a time.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from daemon.config import DataConfig, IngestConfig
from pipelines.ingest.opening import FileRefused, OpenedFile, open_regular_file
from pipelines.ingest.records import KNOWN_FIELDS, SHAPE_COLUMNS, SHAPES_HELP, InvalidRecord, Normaliser, Parsed

DEFAULT_MAX_LINE_BYTES = 1 << 20
READ_CHUNK = 1 << 16           # bytes read at a time by the streaming JSON decoder
SNIFF_BYTES = 1 << 16          # bytes looked at to recognise the encoding and format


class FileRejected(Exception):
    """The whole file cannot be read as records; ``reason`` says why and what to do."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason



def _skip_rest_of_line(f, size: int) -> int:
    """Consume the rest of an over-long line in bounded reads; return its full size in bytes."""
    while True:
        chunk = f.readline(READ_CHUNK)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return size


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})"


class FileReader:
    """Opens a file, recognises its encoding and format, and yields ``(line, object, error)``.

    Raises ``FileRejected`` at construction when the file cannot be read as records.
    ``parsed`` / ``bad`` let the caller tell "some lines are broken" from "nothing in this
    file can be read" (binary, another encoding, not JSON at all).
    """

    def __init__(self, opened: OpenedFile, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 limits: IngestConfig | None = None):
        self.path = opened.path
        self.cap = max_line_bytes
        self.limits = limits or IngestConfig()
        self.parsed = 0        # lines/rows/elements that parsed (whatever their shape)
        self.bad = 0           # ones that did not decode or parse (a truncated last line excluded)
        self.first_bad: str | None = None
        self.first_bad_is_utf8 = False
        self._rows_total = 0   # parquet: for progress
        self._rows_done = 0
        self._f = None
        self._csv_limit: int | None = None
        self.size = opened.size
        if self.size > self.limits.max_file_bytes:
            raise FileRejected(f"the file is {self.size} bytes, over ingest.max_file_bytes="
                               f"{self.limits.max_file_bytes}: split it into smaller files")
        try:
            self._f = opened.file
            self._f.seek(0)
            head = self._f.read(SNIFF_BYTES)
            self._f.seek(0)
        except OSError as e:
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
        """Restore what the reader changed; the file itself belongs to whoever opened it."""
        self._f = None
        if self._csv_limit is not None:
            csv.field_size_limit(self._csv_limit)
            self._csv_limit = None

    def __enter__(self) -> "FileReader":
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
        from pipelines.ingest.parquet import ParquetRows

        try:
            self._pq = ParquetRows(self._f, set(KNOWN_FIELDS), self.limits)
            self._rows_total = self._pq.num_rows
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise FileRejected(f"not a readable Parquet file: {e}") from None
        names = self._pq.names
        usable = {c.strip().lower() for c in self._pq.columns}
        if not any(all(c in usable for c in cols) for cols in SHAPE_COLUMNS):
            raise FileRejected(f"the Parquet schema has no usable columns (found: {', '.join(names)[:300]}); "
                               f"it needs the columns of one record shape: {SHAPES_HELP}")
        problem = self._pq.whole_file_problem()
        if problem is not None:
            raise FileRejected(problem)

    def _iter_parquet(self) -> Iterator[tuple[int, Any, str | None]]:
        rename = {c: c.strip().lower() for c in self._pq.columns}
        rows = self._pq.rows()
        line = 0
        while True:
            try:
                line, row, error = next(rows)
            except StopIteration:
                return
            except Exception as e:  # a corrupt row group: keep what was read, say where it stopped
                yield line + 1, None, f"Parquet read error: {e}; the rest of the file was not read"
                return
            self._rows_done = line
            if error is None:
                self.parsed += 1
                yield line, {rename[k]: v for k, v in row.items()}, None
            else:
                yield line, None, error


def iter_records(path: str | os.PathLike, cfg: DataConfig | None = None, *,
                 count_tokens: Callable[[str], int] | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, limits: IngestConfig | None = None) -> Iterator[Parsed]:
    """Parse, validate and clean one file without a store: one ``Parsed`` per record-bearing line.

    No deduplication happens here. Used by ``ingest_file`` and by readers such as the drift
    CLI (``[p.record.payload for p in iter_records(f) if p.record]``).

    Raises:
        FileRejected: the file cannot be read as records at all (encoding, binary, format).
    """
    normalise = Normaliser(cfg or DataConfig(), count_tokens)
    try:
        opened = open_regular_file(path, follow_symlinks=True)  # a path the operator named
    except FileRefused as e:
        raise FileRejected(e.reason) from None
    except OSError as e:
        raise FileRejected(f"cannot read the file: {e.strerror or e}") from None
    with opened, FileReader(opened, max_line_bytes, limits) as reader:
        for line, obj, error in reader:
            if error is None:
                try:
                    yield Parsed(line, normalise(obj), None)
                    continue
                except InvalidRecord as e:
                    error = str(e)
            yield Parsed(line, None, error)


def read_payloads(path: str | os.PathLike, cfg: DataConfig | None = None) -> tuple[list[dict], list[str]]:
    """A data file's records as payloads, parsed and cleaned exactly as ingest does, with the rejected lines.

    A record's ``category`` rides along in its payload, as in a snapshot's (train.category_weights).

    Returns:
        (payloads, ["line N: reason", ...] for the records ingest would reject)
    Raises:
        FileNotFoundError: no such file.
        FileRejected: the file cannot be read as records at all.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    payloads, rejected = [], []
    for parsed in iter_records(path, cfg):
        if parsed.record is None:
            rejected.append(f"line {parsed.line}: {parsed.error}")
        elif parsed.record.category:
            payloads.append({**parsed.record.payload, "category": parsed.record.category})
        else:
            payloads.append(dict(parsed.record.payload))
    return payloads, rejected
