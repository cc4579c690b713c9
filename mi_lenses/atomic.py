"""Atomic file writes: each file is written to a temp file in its target's folder, flushed, given the usual
permissions (``0666 & ~umask``, not ``mkstemp``'s ``0600``) and renamed into place, so a crash never leaves a
half-written file under a final name and never destroys the file it was replacing.

A path that cannot be written (an existing folder where a file goes, a read-only or virtual file system, a parent
that is a file) is a :class:`~mi_lenses.errors.OutputError` (a ``MiLensesError`` and an ``OSError``) naming the path and the fix, never an ``OSError``
traceback; :func:`check_output` finds it before any work is done.

Example:
    >>> path = write_atomic(tmp / "out" / "lens.json", '{"ok": true}')
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())    # no temp file left behind
    ('{"ok": true}', ['lens.json'])
    >>> check_output(tmp / "out", "--json")
    Traceback (most recent call last):
    ...
    mi_lenses.errors.OutputError: --json: ... is a folder, not a file: give a file path, e.g. .../result.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from mi_lenses.errors import OutputError


def check_output(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """``path`` if mi_lenses can write a file there (``folder=True``: a folder of files), else a ``OutputError``
    that names ``what`` (e.g. ``"--json"``), the path and the fix. It probes by creating and removing a temp file in
    the nearest existing folder, so it finds read-only and virtual file systems before any work is done."""
    p = Path(path).expanduser()
    if str(path) == "":
        raise OutputError(f"{what}: no path given: pass a file path, e.g. result.json.")
    if (not folder and (p.name in ("", ".", "..") or p.is_dir())):
        raise OutputError(f"{what}: {path} is a folder, not a file: give a file path, e.g. "
                             f"{p / 'result.json'}.")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{what}: {path} exists and is not a folder: choose another output folder.")
    parent = p if folder else p.parent
    existing = next((a for a in [parent, *parent.parents] if a.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{what}: cannot write {path}: {existing} is a file, not a folder. Choose another path.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mi_lenses_probe.", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"{what}: cannot write {path} ({err.strerror or err}): {existing} is not writable. "
                             "Choose a path in a folder you can write to.") from err
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
        for name, writer in writers:
            target = folder / name
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(fd)
            tmps.append((Path(tmp), folder / name))
            writer(Path(tmp))
            os.chmod(tmp, mode)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, final in tmps:
            os.replace(tmp, final)
    except OSError as err:  # a folder where a file goes, a read-only or virtual file system, no space left
        raise OutputError(f"cannot write {target} ({err.strerror or err}): choose a path in a folder you can "
                             "write to (nothing was written there).") from err
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    return folder


def write_file_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically create or replace ``path`` with what ``writer(tmp_path)`` writes."""
    path = Path(path)
    if path.name in ("", ".", "..") or path.is_dir():
        raise OutputError(f"{path} is a folder, not a file: give a file path, e.g. {path / 'result.json'}.")
    write_files_atomic(path.parent, [(path.name, writer)])
    return path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Atomically create or replace ``path`` with ``text`` (UTF-8)."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
