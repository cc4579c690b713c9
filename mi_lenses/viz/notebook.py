"""One circuitsvis bundle per notebook: which output of a Jupyter kernel session carries the 1.3 MB bundle.

Every view's HTML (``Result.show()``) is built with the bundle inlined; how much of it a notebook output gets is
decided here, when the view is displayed:

- the first view displayed in a kernel session carries the bundle (a classic script that defines
  ``window.CircuitsVis``); every later view carries only its mount points and a small script that waits until
  ``window.CircuitsVis`` exists, then renders. A saved notebook therefore holds the bundle once, and every view
  still renders when the notebook is reopened, in nbconvert's HTML and on the docs site: all outputs share one page.
- the cell that carried the bundle carries it again each time it runs again (a "Run all" without a restart, or a
  re-run of that cell), so the saved notebook keeps it. Cells are told apart by Jupyter's cell id where the frontend
  sends one (JupyterLab, Notebook 7, VS Code), else by their source.
- where outputs do not share a page (Google Colab puts each output in its own frame), or with
  ``MI_LENSES_NOTEBOOK_BUNDLE=every``, every view carries its own bundle, as outside a kernel (``str(view)``,
  ``view.local_src`` and ``Result.to_html`` pages are always self-contained).
- a view whose bundle never arrives (the carrying output was cleared or its cell deleted) says so in place of the
  view after 10 s: run the notebook again in a fresh kernel, or call :func:`reset` before displaying a view.

Example:
    >>> html = "<p>x</p>" + BUNDLE_OPEN + "var CircuitsVis = 1;</script><div id='v'></div>"
    >>> strip_bundles(html)
    "<p>x</p><div id='v'></div>"
    >>> notebook_html(html) == dedupe_bundles(html)      # outside a Jupyter kernel: self-contained
    True
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

BUNDLE_OPEN = '<script data-mi-lenses="circuitsvis-bundle">'
ENV = "MI_LENSES_NOTEBOOK_BUNDLE"  # "once" (default) or "every"


@dataclass
class _Session:
    """The kernel session's carrier: the cell whose output holds the bundle, and the run that last emitted it."""

    cell: str | None = None
    run: str | None = None


_SESSION = _Session()


def reset() -> None:
    """Make the next view displayed in this kernel session carry the bundle again (e.g. after clearing the output
    that carried it)."""
    _SESSION.cell = _SESSION.run = None


def kernel_cell() -> tuple[str, str] | None:
    """``(cell, run)`` of the Jupyter cell executing now (its cell id, else a hash of its source; and the id of this
    execution request), or None outside a Jupyter kernel. IPython is never imported here: only looked up."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    try:
        parent = kernel.get_parent("shell")  # ipykernel >= 6
    except Exception:  # older ipykernel, or a kernel-like shell without it
        parent = getattr(shell, "parent_header", None)
    if not isinstance(parent, dict) or not parent:
        return None
    meta, content = parent.get("metadata") or {}, parent.get("content") or {}
    cell = meta.get("cellId") or "source:" + hashlib.sha1(str(content.get("code", "")).encode()).hexdigest()
    return str(cell), str((parent.get("header") or {}).get("msg_id", ""))


def pages_shared() -> bool:
    """Do this kernel's outputs share one page (so that a later output can use what an earlier one defined)?"""
    return "google.colab" not in sys.modules and os.environ.get(ENV, "once").strip().lower() != "every"


def notebook_html(fragment: str) -> str:
    """The HTML a notebook output gets for ``fragment`` (a view's HTML, bundle inlined): the bundle once per kernel
    session (see the module docstring), the whole fragment outside a kernel."""
    where = kernel_cell()
    if where is None or not pages_shared() or BUNDLE_OPEN not in fragment:
        return dedupe_bundles(fragment)
    cell, run = where
    if _SESSION.cell is None or (cell == _SESSION.cell and run != _SESSION.run):
        _SESSION.cell, _SESSION.run = cell, run
        return dedupe_bundles(fragment)
    return strip_bundles(fragment)


def _bundles(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every bundle script in ``text`` (the bundle holds no ``</script>``: circuitsvis strips
    it)."""
    out, at = [], text.find(BUNDLE_OPEN)
    while at >= 0:
        end = text.index("</script>", at) + len("</script>")
        out.append((at, end))
        at = text.find(BUNDLE_OPEN, end)
    return out


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    parts, last = [], 0
    for start, end in spans:
        parts.append(text[last:start])
        last = end
    return "".join(parts) + text[last:]


def dedupe_bundles(text: str) -> str:
    """``text`` with every circuitsvis bundle after the first one removed (the first defines ``CircuitsVis`` for
    all)."""
    return _cut(text, _bundles(text)[1:])


def strip_bundles(text: str) -> str:
    """``text`` without any circuitsvis bundle: its views wait for one that another output of the page defines."""
    return _cut(text, _bundles(text))
