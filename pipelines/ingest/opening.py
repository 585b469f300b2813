"""Open a data file once, safely: never through a symlink, never blocking on a special file.

Everything lorad learns about a file (its hash, its records) is read through the one descriptor
opened here, so a file swapped for a link or a FIFO after it settled is never read. Inside the
inbox every folder on the way is opened with ``O_NOFOLLOW`` too (``root=``), so a subfolder
replaced by a link cannot lead out of it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

NAME_MAX = 255                   # bytes in one file name (Linux, macOS)
REPORT_SUFFIX = ".rejects.jsonl"  # a file's rejects report is its name plus this
READ_BUFFER = 1 << 20            # halves the per-line cost of readline against the 8 KiB default
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class FileRefused(Exception):
    """lorad will not read this entry at all (a link, a special file, an unusable name); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe_mode(mode: int) -> str:
    """'a symbolic link', 'a named pipe (FIFO)', ... for a file type that is not a regular file."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "not a regular file"


def name_problem(name: str) -> str | None:
    """Why lorad will not take a file with this name (not UTF-8, no room for its report), or None."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "its name is not valid UTF-8: rename it (lorad stores and reports names as UTF-8)"
    room = NAME_MAX - len(REPORT_SUFFIX)
    if size > room:
        return (f"its name is {size} bytes, too long for its rejects report ('{REPORT_SUFFIX}' must fit in the "
                f"{NAME_MAX}-byte limit): rename it to at most {room} bytes")
    return None


class OpenedFile:
    """A regular file opened once; hash and read it only through ``file``."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.stat = os.fstat(fd)
        self.file: BinaryIO = open(fd, "rb", buffering=READ_BUFFER)

    @property
    def size(self) -> int:
        return self.stat.st_size

    def sha256(self) -> str:
        """The content's sha256, read with ``pread`` so the file position is untouched."""
        h, fd, offset = hashlib.sha256(), self.file.fileno(), 0
        while chunk := os.pread(fd, 1 << 20, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    def changed(self) -> bool:
        """True when the file grew or was written since it was opened (its writer is not done)."""
        now = os.fstat(self.file.fileno())
        return (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns)

    def is_settled_as(self, settled: os.stat_result) -> bool:
        """True when this is the very file (inode, size, mtime) that ``settled`` described."""
        a, b = self.stat, settled
        return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "OpenedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_regular_file(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                      follow_symlinks: bool = False) -> OpenedFile:
    """Open ``path`` for reading with ``O_NONBLOCK`` (and ``O_NOFOLLOW`` unless ``follow_symlinks``).

    Args:
        root: when given, ``path`` must lie under it, and every folder between is opened without
            following links (the inbox).
        follow_symlinks: follow a link at the last component (a path an operator named).

    Raises:
        FileRefused: a symbolic link, FIFO, socket, device or directory.
        OSError: anything else (FileNotFoundError when it is gone).
    """
    path = Path(path)
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:
        fd = _open_under(Path(root), path, nofollow) if root is not None else os.open(path, _OPEN_FLAGS | nofollow)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileRefused("it is a symbolic link: lorad does not follow links; copy or move the file itself "
                              "in instead") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(f"it is {describe_mode(mode)}: lorad reads regular files only")
        os.set_blocking(fd, True)  # O_NONBLOCK was for the open (a FIFO must not block it); reads block as usual
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(path, fd)


def _open_under(root: Path, path: Path, nofollow: int) -> int:
    """Open ``root/…/name`` one component at a time, no folder on the way followed if it is a link."""
    parts = path.relative_to(root).parts
    dir_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the inbox itself may be a link the operator chose
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise FileRefused(f"its folder {part!r} is not a folder (a symbolic link?): lorad does not "
                                      f"follow links") from None
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        return os.open(parts[-1], _OPEN_FLAGS | nofollow, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
