"""Files and folders that appear whole or not at all.

A folder is built under a temporary sibling name, every file is fsynced, then one ``os.replace``
publishes it and the parent folder is fsynced: after a crash at any instant the final path holds the
old content, nothing, or the complete new content, never a half-written mix. A single file works the
same way. Only the stdlib is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

T = TypeVar("T")
TMP_PREFIX = ".tmp-"   # siblings with this prefix are unfinished writes: safe to delete once no writer runs


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then ``root`` itself: data reaches the disk before a rename publishes it."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def leftovers(final: str | os.PathLike) -> list[Path]:
    """Temporary siblings that crashed ``atomic_dir`` / ``atomic_file`` calls for ``final`` left behind."""
    final = Path(final)
    return sorted(final.parent.glob(f"{TMP_PREFIX}{final.name}-*")) + \
        sorted(final.parent.glob(f"{TMP_PREFIX}old-{final.name}-*"))


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Run ``write(tmp)`` in a fresh temporary folder beside ``final``, then publish it as ``final``.

    An existing ``final`` is replaced (moved aside first: ``os.replace`` cannot overwrite a non-empty
    folder). If ``write`` raises, nothing is published and the temporary folder is removed.

    Returns:
        What ``write`` returned.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        out = write(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # already gone after a successful rename
    fsync_dir(final.parent)
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` gets the whole content when the block ends.

    If the block raises, ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
