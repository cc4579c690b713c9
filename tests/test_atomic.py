"""Atomic writes: usual permissions, and a failing write neither leaves a temp file nor touches the old file."""

from __future__ import annotations

import os
import stat

import pytest

from mi_lenses.atomic import write_atomic, write_files_atomic


def test_written_file_has_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "sub" / "page.html", "<p>ok</p>")
    finally:
        os.umask(mask)
    assert path.read_text() == "<p>ok</p>"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["page.html"]


def test_failed_write_keeps_the_old_files_and_leaves_no_temp(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")

    def boom(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_files_atomic(tmp_path, [("a.txt", lambda t: t.write_text("new a")), ("b.txt", boom)])
    # nothing is renamed until every file is written: both old files intact, no temp files left
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
