"""The inbox watcher: notices files, waits until each is complete, hands its path on. No business logic.

A file counts only when complete: names ending ``.part``/``.tmp``/``.crdownload`` or starting with
``.`` are ignored until renamed, and its size and mtime must stay unchanged for ``settle_seconds``.
Symlinks are never followed (a link could point outside the inbox). Files present at startup
(arrived while the daemon was down) are picked up by a scan. Filesystem events come from watchdog
(inotify on Linux); while nothing is pending the settle thread sleeps on a condition variable, so
an idle inbox costs no CPU.
"""

from __future__ import annotations

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


def is_candidate(root: Path, path: Path) -> bool:
    """True for a regular, non-hidden, non-temporary file inside root (not under .done/.rejected, no symlinks)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return False
    if any(part.startswith(".") for part in rel.parts):
        return False  # hidden files, and everything under .done/ and .rejected/
    if path.name.lower().endswith(IGNORED_SUFFIXES) or path.name.endswith("~"):
        return False
    # No component may be a symlink: a linked folder could lead anywhere on the machine.
    current = root
    for part in rel.parts:
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
        except FileNotFoundError:
            return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class InboxWatcher:
    """Watch ``root`` and call ``on_ready(path)`` once per complete file (in the settle thread).

    Args:
        root: the inbox folder (created if missing).
        on_ready: called with each complete file; it must move the file out of the inbox (or the
            watcher would offer it again after the next change).
        settle_seconds: how long size and mtime must stay unchanged.
        clock: monotonic clock, injectable for tests.
    """

    def __init__(self, root: str | os.PathLike, on_ready: Callable[[Path], None], *, settle_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(root).resolve()
        self.on_ready = on_ready
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._pending: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, stable since)
        self._cond = threading.Condition()
        self._stopping = False
        self._observer = None
        self._thread: threading.Thread | None = None

    # -- event intake -----------------------------------------------------------------------

    def offer(self, path: str | os.PathLike) -> None:
        """Note that ``path`` may have changed; it becomes ready after settling."""
        p = Path(path)
        if not is_candidate(self.root, p):
            return
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        with self._cond:
            prev = self._pending.get(p)
            if prev is None or (prev[0], prev[1]) != (st.st_size, st.st_mtime):
                self._pending[p] = (st.st_size, st.st_mtime, self.clock())
                self._cond.notify()

    def scan(self) -> int:
        """Offer every file already in the inbox (startup, or after a missed burst). Returns how many."""
        n = 0
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                self.offer(Path(dirpath) / name)
                n += 1
        return n

    # -- settling ---------------------------------------------------------------------------

    def due(self) -> list[Path]:
        """Pop the files that have been stable for settle_seconds (re-checking size and mtime now)."""
        now = self.clock()
        ready = []
        with self._cond:
            for p, (size, mtime, since) in list(self._pending.items()):
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    del self._pending[p]
                    continue
                if (st.st_size, st.st_mtime) != (size, mtime):
                    self._pending[p] = (st.st_size, st.st_mtime, now)
                elif now - since >= self.settle_seconds:
                    del self._pending[p]
                    ready.append(p)
        return sorted(ready)

    def _next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(since for _, _, since in self._pending.values()) + self.settle_seconds

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
            for path in self.due():
                try:
                    self.on_ready(path)
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
