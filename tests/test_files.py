"""pipelines/files.py: a folder or file appears whole or not at all."""

from __future__ import annotations

import pytest

from pipelines.files import atomic_dir, atomic_file, leftovers


def test_atomic_dir_publishes_the_whole_folder_and_returns_what_write_returned(tmp_path):
    final = tmp_path / "out" / "v1"

    def write(tmp):
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        return {"files": 2}

    assert atomic_dir(final, write) == {"files": 2}
    assert (final / "a.txt").read_text() == "a" and (final / "sub" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v1"]   # no temp sibling left


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    atomic_dir(final, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_atomic_dir_failing_write_publishes_nothing_and_keeps_the_old_folder(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    (final / "keep.txt").write_text("old")

    def write(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(final, write)
    assert [p.name for p in final.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_leftovers_names_the_temp_siblings_of_a_crashed_write(tmp_path):
    final = tmp_path / "key"
    for name in (".tmp-key-123", ".tmp-old-key-9", ".tmp-other-1", "key"):
        (tmp_path / name).mkdir()
    assert [p.name for p in leftovers(final)] == [".tmp-key-123", ".tmp-old-key-9"]


def test_atomic_file_writes_whole_or_leaves_the_old_content(tmp_path):
    path = tmp_path / "data.jsonl"
    with atomic_file(path) as f:
        f.write("one\n")
    assert path.read_text() == "one\n"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("two\n")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
