"""One file into the store: parse, normalise, dedup and write records and rejects in ONE transaction.

Atomicity: one file = one ``store.transaction()``: its ``files`` row, records, rejects and the
``ingest`` event commit together, so after ``kill -9`` a file is ingested once or not at all.
``dry_run`` runs the same code inside a transaction that is rolled back. SQLite's page cache is
raised to a fixed cap (``INGEST_CACHE_KIB``) while a file is ingested.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from daemon.config import DataConfig, IngestConfig
from pipelines.ingest.formats import DEFAULT_MAX_LINE_BYTES, FileReader, FileRejected
from pipelines.ingest.opening import FileRefused, OpenedFile, open_regular_file
from pipelines.ingest.neardup import near_dup_index, near_dup_key, shingle_jaccard
from pipelines.ingest.records import InvalidRecord, Normaliser, Record, stable_split

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    import sqlite3

    from daemon.store import Store

BATCH_SIZE = 512               # records per executemany / dedup query
MAX_RESULT_REJECTS = 10_000    # IngestResult.rejects keeps this many; the report and the DB keep all
INGEST_CACHE_KIB = 16 << 10    # SQLite page cache while a file is ingested (see _page_cache)


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
    changed: bool = False                              # the file changed while read: nothing kept, read it again

    def to_dict(self) -> dict:
        return asdict(self)

    def counts(self) -> dict:
        return {"records_total": self.records_total, "accepted": self.accepted,
                "duplicates": self.duplicates, "rejected": self.rejected}



class _RollBack(Exception):
    """Raised inside a dry run's transaction so that nothing it wrote is kept."""


class _FileChanged(Exception):
    """Raised inside a file's transaction when the file changed while it was read: nothing is kept."""


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
    the index of ~150k stored records; it is a cap, so memory still does not grow with the file.
    """
    before = db.execute("PRAGMA cache_size").fetchone()[0]
    db.execute(f"PRAGMA cache_size = -{int(kib)}")  # negative = KiB, positive = pages
    try:
        yield
    finally:
        db.execute(f"PRAGMA cache_size = {int(before)}")


class _FileIngest:
    """The state of one file's ingest inside its transaction (batches, counts, report)."""

    def __init__(self, store: "Store", tx: "sqlite3.Connection", cfg: DataConfig, result: IngestResult,
                 file_id: int, report, now: float, max_batch_bytes: int):
        self.store, self.tx, self.cfg, self.result, self.file_id = store, tx, cfg, result, file_id
        self.max_batch_bytes = max_batch_bytes  # a batch is flushed at BATCH_SIZE records or this many bytes
        self.report = report
        self.now = now
        self.batch: list[tuple[int, Record | None, str | None]] = []
        self.near = None
        if cfg.near_dup_threshold < 1.0:
            self.near = near_dup_index(store, cfg.near_dup_threshold)
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
            self.report.write(report_line(entry))
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
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, limits: IngestConfig | None = None,
                opened: OpenedFile | None = None) -> IngestResult:
    """Ingest one file into the store in ONE transaction; never raises on bad user data.

    Args:
        path: the file (JSONL, JSON, CSV, TSV or Parquet; see ``formats.py``).
        store: the state store; records, rejects, the files row and an ``ingest`` event are written.
        cfg: the ``data`` section of the config (limits, cleaning, dedup, holdout share).
        source: 'inbox' or 'cli', stored in ``files.source``.
        count_tokens: the model's token counter; default ``estimate_tokens``.
        dry_run: do everything, report the same counts, write nothing (the transaction is rolled back).
        report_path: where to write the JSONL report of duplicates and rejects (atomically, after
            the commit); None = no report file.
        max_line_bytes: longer lines (and JSON array elements) are rejected without being loaded whole.
        limits: the ``ingest`` section of the config (decoded bytes per cell, batch and file).
        opened: ``path`` already opened by the caller (the inbox); else it is opened here, without
            following a symbolic link. Either way every byte is read through that one descriptor.

    Returns a result whose ``changed`` is True (and nothing written) when the file changed while
    it was read: its writer is not done; ingest it again once it settles.

    Raises:
        OSError / sqlite3.Error: only for unwritable state (report folder, database), never for the file.
    """
    path = Path(path)
    result = IngestResult(file=str(path))
    owned = opened is None
    try:
        if opened is None:
            opened = open_regular_file(path)
        sha = opened.sha256()
    except (FileRefused, OSError) as e:
        if owned and opened is not None:
            opened.close()
        result.file_error = e.reason if isinstance(e, FileRefused) else f"cannot read the file: {e.strerror or e}"
        result.rejects = [{"file": result.file, "line": 0, "outcome": "rejected", "reason": result.file_error}]
        return result
    try:
        return _ingest_opened(opened, sha, result, store, cfg, source=source, count_tokens=count_tokens,
                              dry_run=dry_run, report_path=report_path, max_line_bytes=max_line_bytes,
                              limits=limits or IngestConfig())
    finally:
        if owned:
            opened.close()


def _ingest_opened(opened: OpenedFile, sha: str, result: IngestResult, store: "Store", cfg: DataConfig, *,
                   source: str, count_tokens: Callable[[str], int] | None, dry_run: bool,
                   report_path: str | os.PathLike | None, max_line_bytes: int,
                   limits: IngestConfig) -> IngestResult:
    """``ingest_file`` once the file is open and hashed: one transaction, rolled back if the file changed."""
    path, stat = opened.path, opened.stat
    report = tmp_report = None
    if report_path is not None and not dry_run:  # fails early (unwritable folder) before any work
        tmp_report = Path(f"{report_path}.tmp")
        report = open(tmp_report, "w", encoding="utf-8")
    reader: FileReader | None = None
    try:
        reader = FileReader(opened, max_line_bytes, limits)
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
            work = _FileIngest(store, tx, cfg, result, file_id, report, now, limits.max_batch_bytes)
            if reader is not None:
                _read_all(reader, normalise, work, result)
                work.flush()
                result.file_error = reader.whole_file_error()
                if result.file_error is None and result.records_total == 0:
                    result.file_error = "no records: the file holds no lines, rows or array elements"
            if opened.changed():  # its writer is not done: keep nothing, read it again once it settles
                raise _FileChanged
            if result.file_error is not None:
                _reject_whole_file(tx, result, file_id, report)
            status = "rejected" if result.file_error else "done"
            tx.execute("UPDATE files SET status = ?, reason = ?, records_total = ?, accepted = ?, "
                       "duplicates = ?, rejected = ?, finished_at = ? WHERE id = ?",
                       (status, result.file_error, result.records_total, result.accepted,
                        result.duplicates, result.rejected, store.clock(), file_id))
            store.add_event("ingest", subject=path.name, ok=result.file_error is None,
                            reason=result.file_error or summary_line(result), actor=_actor(source),
                            data={**result.counts(), "file_id": file_id, "dry_run": dry_run}, db=tx)
            max_id = tx.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]
        committed = not dry_run
        result.file_id = file_id if committed else None
    except _FileChanged:
        changed = IngestResult(file=result.file, changed=True)
        changed.file_error = "the file changed while it was being read; it is read again once it stops changing"
        result = changed
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


def _read_all(reader: FileReader, normalise: Normaliser, work: _FileIngest, result: IngestResult) -> None:
    """Feed every parsed line to ``work``, with a progress bar on a terminal for long files."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=reader.size, unit="B", unit_scale=True, desc=reader.path.name, file=sys.stderr,
                   delay=2.0, leave=False)
    try:
        batch, batch_bytes = work.batch, 0
        for line, obj, error in reader:
            result.records_total += 1
            record = None
            if error is None:
                try:
                    record = normalise(obj)
                    batch_bytes += len(record.payload_json)
                except InvalidRecord as e:
                    error = str(e)
            batch.append((line, record, error))
            if len(batch) >= BATCH_SIZE or batch_bytes >= work.max_batch_bytes:
                work.flush()
                batch_bytes = 0
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
        report.write(report_line(entry))


# Characters str.splitlines() (and JavaScript) break lines at that JSON leaves raw with ensure_ascii=False: a
# reason quoting a record's key must not split one report entry in two.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def report_line(entry: dict) -> str:
    """One report entry as a JSON line (readable text, no character that any reader takes for a line break)."""
    text = json.dumps(entry, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text + "\n"


def _actor(source: str) -> str:
    return "cli" if source == "cli" else "daemon"


def summary_line(r: IngestResult | dict) -> str:
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
            f.write(report_line({"file": row["path"], "line": r["line"], "outcome": r["outcome"],
                                 "reason": r["reason"]}))
    os.replace(tmp, report_path)
    return len(rows)
