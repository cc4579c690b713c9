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


# ------------------------------------------------------------------------------------------------ only regular files
def _device(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot make a device node here ({err})")
    return node


@pytest.mark.parametrize("kind", ["device", "link to a device", "fifo", "link to a fifo"])
def test_devices_fifos_and_links_to_them_are_refused_and_kept(tmp_path, kind):
    from mi_lenses.atomic import check_output
    from mi_lenses.errors import OutputError

    special = _device(tmp_path) if "device" in kind else tmp_path / "fifo"
    if "fifo" in kind:
        os.mkfifo(special)
    path = special
    if kind.startswith("link"):
        path = tmp_path / "link"
        path.symlink_to(special)
    word = "character device" if "device" in kind else "FIFO"
    for attempt in (lambda: check_output(path, "--json"), lambda: write_atomic(path, "{}")):
        with pytest.raises(OutputError, match=word):
            attempt()
    mode = os.lstat(special).st_mode
    assert (stat.S_ISCHR(mode) if "device" in kind else stat.S_ISFIFO(mode)), "the special file was replaced"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left"


def test_a_link_to_a_regular_file_is_followed_and_kept(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_atomic(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_a_symlink_loop_is_named(tmp_path):
    from mi_lenses.errors import OutputError

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OutputError, match="symlink loop"):
        write_atomic(tmp_path / "a", "x")


def test_temp_files_of_killed_processes_are_cleaned_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from mi_lenses.atomic import TMP_SUFFIX, _tmp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = _tmp_prefix("page.html")
    stale = tmp_path / (mine.replace(f"-{os.getpid()}.", f"-{dead.pid}.") + "abc" + TMP_SUFFIX)
    live = tmp_path / (mine + "def" + TMP_SUFFIX)  # this process is alive: its temp file is left alone
    other = tmp_path / (f".page.html.otherhost-{dead.pid}.ghi" + TMP_SUFFIX)  # another host's (shared folder)
    for f in (stale, live, other):
        f.write_text("half")
    write_atomic(tmp_path / "page.html", "whole")
    assert not stale.exists() and live.exists() and other.exists()


def test_a_full_file_system_is_found_before_any_work(tmp_path):
    import subprocess

    from mi_lenses.atomic import check_output
    from mi_lenses.errors import OutputError

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        assert check_output(mnt / "ok.json", "--json") == mnt / "ok.json"  # 64 KiB free: enough
        with open(mnt / "filler", "wb") as fh:
            with pytest.raises(OSError):
                fh.write(b"x" * 128 * 1024)
                fh.flush()
        with pytest.raises(OutputError, match="is full"):
            check_output(mnt / "r.json", "--json")
        with pytest.raises(OutputError, match="No space left"):  # a write that fails anyway keeps the old state
            write_atomic(mnt / "r.json", "x" * 100_000)
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
