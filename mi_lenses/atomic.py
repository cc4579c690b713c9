"""Atomic file writes: each file is written to a temp file in its target's folder, flushed, given the usual
permissions (``0666 & ~umask``, not ``mkstemp``'s ``0600``) and renamed into place, so a crash never leaves a
half-written file under a final name and never destroys the file it was replacing.

Example:
    >>> path = write_atomic(tmp / "out" / "lens.json", '{"ok": true}')
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())    # no temp file left behind
    ('{"ok": true}', ['lens.json'])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from mi_lenses.errors import LensInputError


def write_files_atomic(folder: str | os.PathLike, writers: list[tuple[str, Callable[[Path], None]]]) -> Path:
    """Write files into ``folder``: each ``writer(tmp_path)`` fills a temp file next to its target; once all are
    written they are renamed into place in the order given (put the file that commits the others, e.g. a config
    holding their checksum, last). Other files in ``folder`` are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LensInputError(f"{folder} exists and is not a folder: choose another output path.")
    folder.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()
    tmps: list[tuple[Path, Path]] = []
    try:
        for name, writer in writers:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(fd)
            tmps.append((Path(tmp), folder / name))
            writer(Path(tmp))
            os.chmod(tmp, mode)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, final in tmps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    return folder


def write_file_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically create or replace ``path`` with what ``writer(tmp_path)`` writes."""
    path = Path(path)
    write_files_atomic(path.parent, [(path.name, writer)])
    return path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Atomically create or replace ``path`` with ``text`` (UTF-8)."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
