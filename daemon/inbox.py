"""The inbox watcher: notices files, waits until each is complete, hands its path on. No business logic.

A file counts only when complete: names ending ``.part``/``.tmp``/``.crdownload`` or starting with
``.`` are ignored until renamed, and its size, mtime and inode must stay unchanged for ``settle_seconds``.
Symlinks are never followed (a link could point outside the inbox): a link, FIFO, socket or device,
or a name lorad cannot store (not UTF-8, too long), is moved to ``.rejected/`` with a report and one
log line (or, when it cannot be moved, logged once), never retried. Files present at startup
(arrived while the daemon was down) are picked up by a scan. Filesystem events come from watchdog
(inotify on Linux); while nothing is pending the settle thread sleeps on a condition variable, so
an idle inbox costs no CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import warnings
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("lorad.inbox")

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp")
DONE, REJECTED = ".done", ".rejected"
REPORTS = ".reports"   # under DONE: the per-file reject reports


def _visible(root: Path, path: Path) -> bool:
    """True for a path inside root that is not hidden (nor under .done/.rejected) and not a temporary name."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return False
    if not rel.parts or any(part.startswith(".") for part in rel.parts):
        return False  # hidden files, and everything under .done/ and .rejected/
    return not (path.name.lower().endswith(IGNORED_SUFFIXES) or path.name.endswith("~"))


def refusal(root: Path, path: Path) -> str | None:
    """Why lorad will not read this visible inbox entry (a link on the way, a special file, its name), or None.

    None also for a regular file, a real folder and an entry that is gone.
    """
    from pipelines.ingest.opening import describe_mode, name_problem

    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):  # a linked folder could lead anywhere on the machine
            where = "it is" if current == path else f"its folder {part!r} is"
            return f"{where} a symbolic link: lorad does not follow links; move the file itself in instead"
    if stat.S_ISDIR(mode):
        return None
    if not stat.S_ISREG(mode):
        return f"it is {describe_mode(mode)}: lorad reads regular files only"
    return name_problem(staged_name(root, path))


def staged_name(root: Path, path: Path) -> str:
    """One file name for an inbox path (folders joined by '__'): its rejects report is named after it."""
    return path.relative_to(root).as_posix().replace("/", "__")


def is_candidate(root: Path, path: Path) -> bool:
    """True for a regular, non-hidden, non-temporary file inside root (not under .done/.rejected, no symlinks)."""
    if not _visible(root, path) or refusal(root, path) is not None:
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def unique_path(path: Path) -> Path:
    """``path``, or ``path`` with a numeric suffix when a file of that name was already moved there."""
    if not os.path.lexists(path):
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}.{i}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise RuntimeError(f"too many files named {path.name} in {path.parent}")


def set_aside(root: Path, path: Path, reason: str) -> Path | None:
    """Move an entry lorad will not read to .rejected/ (the entry itself, never a link's target), with a
    one-line rejects report beside it; return where it went, or None when it cannot be moved."""
    from pipelines.ingest.opening import NAME_MAX, REPORT_SUFFIX

    try:
        dest = unique_path(root / REJECTED / path.relative_to(root))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, dest)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("cannot move a refused inbox entry aside; it stays and is not reported again",
                    extra={"file": _printable(path), "reason": reason, "error": str(e)})
        return None
    report = dest.with_name(dest.name + REPORT_SUFFIX)
    if len(os.fsencode(report.name)) > NAME_MAX:
        report = dest.with_name(hashlib.sha256(os.fsencode(dest.name)).hexdigest()[:16] + REPORT_SUFFIX)
    entry = {"file": _printable(path), "line": 0, "outcome": "rejected", "reason": reason}
    try:
        fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    except OSError as e:
        log.warning("cannot write the rejects report", extra={"file": str(report), "error": str(e)})
    log.warning("inbox entry refused and moved aside", extra={**entry, "moved_to": _printable(dest)})
    return dest


def _printable(path: Path) -> str:
    """The path as valid UTF-8 text: undecodable bytes of a name appear as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class InboxWatcher:
    """Watch ``root`` and call ``on_ready(path)`` once per complete file (in the settle thread).

    Args:
        root: the inbox folder (created if missing).
        on_ready: called with each complete file and its settled ``os.lstat`` (read only the file with
            that inode); it must move the file out of the inbox (or the watcher would offer it again
            after the next change).
        settle_seconds: how long size and mtime must stay unchanged.
        clock: monotonic clock, injectable for tests.
        on_refused: told of each entry refused (and moved aside or logged), with the reason; e.g. to count it.
    """

    def __init__(self, root: str | os.PathLike, on_ready: Callable[[Path, os.stat_result], None], *,
                 settle_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 on_refused: Callable[[Path, str], None] | None = None):
        self.root = Path(root).resolve()
        self.on_ready = on_ready
        self.on_refused = on_refused
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._pending: dict[Path, tuple[os.stat_result, float]] = {}  # path -> (its lstat, stable since)
        self._refused: set[Path] = set()  # entries that could not be moved aside: reported once
        self._cond = threading.Condition()
        self._stopping = False
        self._observer = None
        self._thread: threading.Thread | None = None

    # -- event intake -----------------------------------------------------------------------

    def offer(self, path: str | os.PathLike) -> None:
        """Note that ``path`` may have changed; it becomes ready after settling (or is refused at once)."""
        p = Path(path)
        if not _visible(self.root, p):
            return
        reason = refusal(self.root, p)
        if reason is not None:
            self.refuse(p, reason)
            return
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            return  # a real folder: its files arrive as their own events (or by scan)
        with self._cond:
            prev = self._pending.get(p)
            if prev is None or _identity(prev[0]) != _identity(st):
                self._pending[p] = (st, self.clock())
                self._cond.notify()

    def refuse(self, path: Path, reason: str) -> None:
        """Move an entry lorad will not read aside, once; if it cannot be moved, it is logged once."""
        with self._cond:
            if path in self._refused:
                return
            self._pending.pop(path, None)
        if set_aside(self.root, path, reason) is None:
            with self._cond:
                self._refused.add(path)
        if self.on_refused is not None:
            self.on_refused(path, reason)

    def scan(self) -> int:
        """Offer every file already in the inbox (startup, or after a missed burst). Returns how many."""
        n = 0
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                self.offer(Path(dirpath) / name)  # a linked folder is offered only to be refused
                n += 1
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        return n

    # -- settling ---------------------------------------------------------------------------

    def due(self) -> list[Path]:
        """Pop the files that have been stable for settle_seconds (re-checking them now)."""
        return [p for p, _ in self._due()]

    def _due(self) -> list[tuple[Path, os.stat_result]]:
        """(path, settled lstat) of each file stable for settle_seconds; one that became a link or a special
        file is refused, one replaced or written meanwhile starts settling again."""
        now = self.clock()
        ready, refused = [], []
        with self._cond:
            for p, (settled, since) in list(self._pending.items()):
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    del self._pending[p]
                    continue
                if not stat.S_ISREG(st.st_mode):
                    del self._pending[p]
                    if not stat.S_ISDIR(st.st_mode):
                        refused.append(p)
                elif _identity(st) != _identity(settled):
                    self._pending[p] = (st, now)
                elif now - since >= self.settle_seconds:
                    del self._pending[p]
                    ready.append((p, st))
        for p in refused:
            self.refuse(p, refusal(self.root, p) or "it is not a regular file: lorad reads regular files only")
        return sorted(ready)

    def _next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(since for _, since in self._pending.values()) + self.settle_seconds

    def _settle_loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                deadline = self._next_deadline()
                if deadline is None:
                    self._cond.wait()  # idle: no timer, no CPU, until an event arrives
                    continue
                delay = deadline - self.clock()
                if delay > 0:
                    self._cond.wait(timeout=min(delay, 60.0))
                    continue
            for path, settled in self._due():
                try:
                    self.on_ready(path, settled)
                except Exception:  # the handler must never kill the watcher
                    log.exception("inbox handler failed", extra={"file": str(path)})

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # created, modified, closed, moved (to its dest path)
                if event.is_directory:
                    if event.event_type in ("created", "moved"):
                        # A folder dropped or renamed in: its files may predate our watch on it.
                        threading.Thread(target=watcher.scan, daemon=True).start()
                    return
                watcher.offer(getattr(event, "dest_path", "") or event.src_path)

        # lorad's own folders exist before the watch starts: watchdog 7 registers a folder created together with
        # its parent (mkdir -p) twice and warns "Callback with id ... already exists" (benign: the same callback).
        (self.root / DONE / REPORTS).mkdir(parents=True, exist_ok=True)
        (self.root / REJECTED).mkdir(exist_ok=True)
        warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)
        self._thread = threading.Thread(target=self._settle_loop, name="inbox-settle", daemon=True)
        self._thread.start()
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.start()
        found = self.scan()
        log.info("watching inbox", extra={"inbox": str(self.root), "files_at_start": found})

    def stop(self, timeout: float = 5.0) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change while a file settles: its inode (not replaced) and its size and mtime (not written)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
