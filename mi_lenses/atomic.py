"""Atomic file writes: each file is written to a temp file in its target's folder, flushed, given the usual
permissions (``0666 & ~umask``, not ``mkstemp``'s ``0600``) and renamed into place, so a crash never leaves a
half-written file under a final name and never destroys the file it was replacing.

Only regular files are written: a path that is a device (``/dev/null``, ``/dev/full``), a FIFO, a socket, a link to
one of them or a symlink loop is refused by name, never replaced; a link to a regular file is followed (the file it
points to is replaced, the link kept). A temp file is named ``.NAME.HOST-PID.XXXX.mi-lenses-tmp``; one left behind by
a killed process of this host is removed by the next write into its folder.

A path that cannot be written (an existing folder where a file goes, a read-only, virtual or full file system, a
parent that is a file) is a :class:`~mi_lenses.errors.OutputError` (a ``MiLensesError`` and an ``OSError``) naming
the path and the fix, never an ``OSError`` traceback; :func:`check_output` finds it before any work is done.

Example:
    >>> path = write_atomic(tmp / "out" / "lens.json", '{"ok": true}')
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())    # no temp file left behind
    ('{"ok": true}', ['lens.json'])
    >>> check_output(tmp / "out", "--json")
    Traceback (most recent call last):
    ...
    mi_lenses.errors.OutputError: --json: ... is a folder, not a file: give a file path, e.g. .../result.json.
    >>> check_output("/dev/null", "--json")
    Traceback (most recent call last):
    ...
    mi_lenses.errors.OutputError: --json: /dev/null is a character device, not a regular file: ...
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable

from mi_lenses.errors import OutputError

STDOUT = "-"  # the command line's name for standard output (``--json -``)
TMP_SUFFIX = ".mi-lenses-tmp"
MIN_FREE = 64 * 1024  # bytes a file system must have free before work whose output goes there starts
_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def regular_target(path: str | os.PathLike, what: str = "output") -> Path:
    """The file a write to ``path`` replaces or creates: ``path`` itself, or where its symlinks lead. A device, FIFO,
    socket or symlink loop (also behind a link) is an ``OutputError`` naming it."""
    p = Path(path).expanduser()
    if not p.is_symlink():
        target = p
    else:
        try:
            target = p.resolve(strict=False)
        except (RuntimeError, OSError) as err:  # Python < 3.13 raises RuntimeError on a loop
            raise OutputError(f"{what}: {path} is a symlink loop: remove the link or choose another path.") from err
        if target.is_symlink():  # resolve gives up on a loop without raising on some Pythons
            raise OutputError(f"{what}: {path} is a symlink loop: remove the link or choose another path.")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        if err.errno == 40:  # ELOOP
            raise OutputError(f"{what}: {path} is a symlink loop: remove the link or choose another path.") from err
        raise OutputError(f"{what}: cannot write {path} ({err.strerror or err}): choose another path.") from err
    for test, kind in _KINDS:
        if test(mode):
            via = "" if target == p else f" (a link to {target})"
            raise OutputError(f"{what}: {path}{via} is {kind}, not a regular file: mi_lenses writes only regular "
                              f"files; give a file path (or {STDOUT} for standard output).")
    return target


def check_output(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """``path`` if mi_lenses can write a file there (``folder=True``: a folder of files), else an ``OutputError``
    that names ``what`` (e.g. ``"--json"``), the path and the fix. It refuses devices, FIFOs and links to them, probes
    by creating and removing a temp file in the nearest existing folder (finding read-only and virtual file systems)
    and asks that folder's file system for free space, all before any work is done. ``-`` (standard output) passes
    for a file."""
    if str(path) == "":
        raise OutputError(f"{what}: no path given: pass a file path, e.g. result.json.")
    if str(path) == STDOUT:
        if folder:
            raise OutputError(f"{what}: {STDOUT} (standard output) cannot hold a folder of files: give a folder path.")
        return Path(STDOUT)
    p = Path(path).expanduser()
    if (not folder and (p.name in ("", ".", "..") or p.is_dir())):
        raise OutputError(f"{what}: {path} is a folder, not a file: give a file path, e.g. "
                          f"{p / 'result.json'}.")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{what}: {path} exists and is not a folder: choose another output folder.")
    if not folder:
        p = regular_target(p, what)
    parent = p if folder else p.parent
    existing = next((a for a in [parent, *parent.parents] if a.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{what}: cannot write {path}: {existing} is a file, not a folder. Choose another path.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix("probe"), suffix=TMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"{what}: cannot write {path} ({err.strerror or err}): {existing} is not writable. "
                          "Choose a path in a folder you can write to.") from err
    free = _free_bytes(existing)
    if free is not None and free < MIN_FREE:
        raise OutputError(f"{what}: cannot write {path}: the file system of {existing} is full ({free // 1024} KiB "
                          "free). Free some space or choose a path on another file system.")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{what}: {path} exists and cannot be replaced (read-only): choose another path.")
    return p


def write_files_atomic(folder: str | os.PathLike, writers: list[tuple[str, Callable[[Path], None]]]) -> Path:
    """Write files into ``folder``: each ``writer(tmp_path)`` fills a temp file next to its target; once all are
    written they are renamed into place in the order given (put the file that commits the others, e.g. a config
    holding their checksum, last). Other files in ``folder`` are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder: choose another output path.")
    mode = 0o666 & ~_umask()
    tmps: list[tuple[Path, Path]] = []
    target = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(folder)
        for name, writer in writers:
            target = regular_target(folder / name)
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target.name), suffix=TMP_SUFFIX, dir=target.parent)
            os.close(fd)
            tmps.append((Path(tmp), target))
            writer(Path(tmp))
            os.chmod(tmp, mode)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, final in tmps:
            os.replace(tmp, final)
    except OutputError:
        raise
    except OSError as err:  # a folder where a file goes, a read-only or virtual file system, no space left
        raise OutputError(f"cannot write {target} ({err.strerror or err}): choose a path in a folder you can "
                          "write to (nothing was written there).") from err
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    return folder


def write_file_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically create or replace ``path`` (or the regular file its links lead to) with what ``writer(tmp_path)``
    writes."""
    path = Path(path)
    if path.name in ("", ".", "..") or path.is_dir():
        raise OutputError(f"{path} is a folder, not a file: give a file path, e.g. {path / 'result.json'}.")
    target = regular_target(path)
    write_files_atomic(target.parent, [(target.name, writer)])
    return path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Atomically create or replace ``path`` with ``text`` (UTF-8)."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files in ``folder`` that a killed mi_lenses process of this host left (its PID is gone);
    returns them. Temp files of live processes and of other hosts (a shared file system) are left alone."""
    removed = []
    host = _host()
    try:
        names = [n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(r"\..*\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+" + re.escape(TMP_SUFFIX), name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            try:
                os.unlink(folder / name)
                removed.append(folder / name)
            except OSError:
                pass  # another process removed it first, or it is not ours to remove: leave it
    return removed


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_host()}-{os.getpid()}."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write on ``folder``'s file system (root may use the reserved blocks)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or a file system that cannot say
        return None
    if st.f_blocks == 0:  # a virtual file system (proc, sysfs) reports no blocks at all
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
