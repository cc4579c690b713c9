"""The tutorials as notebooks: every ``tutorials/NN_*.py`` executed once in a real Jupyter kernel (nbclient +
ipykernel) on the embedded SmolLM2, and its saved ``.ipynb`` checked against that execution: the same cells (the
saved notebook is the jupytext pairing of the source, text for text) and the same outputs (stream names, mime types
of every display: no stale or missing output), views included, with the circuitsvis bundle once per notebook.

This is the only place the tutorials run in the suite. Tutorial 02 trains its lens in quick mode here
(``MI_TUTORIAL_QUICK=1``); the saved notebook holds the full run (same cells and outputs, other numbers).
"""

from __future__ import annotations

import os

import pytest

from notebooks import (BUNDLE, FORMAT, INSTALL_CELL, bundles, circuitsvis_views, execute, structure, tutorials,
                       views)

# What each tutorial writes into its working directory, with a lower bound on each file's size (bytes).
WRITES = {
    "01": {"logit_lens.html": 100_000},
    "02": {"tuned_lens_eval.html": 1000},
    "03": {"dla.html": 100_000},
    "04": {"patchscope.html": 1000, "patchscope_sweep.html": 1000},
    "05": {"report.html": 500_000, "attention.html": 1},
    "06": {"compare.html": 10_000, "selfie.html": 1},
    "07": {"ioi_resid_pre.html": 10_000, "ioi_circuit.html": 10_000, "ioi_report_ablated.html": 100_000},
    "08": {"feature_contexts.html": 10_000},
}


def _tools():
    """nbformat and jupytext (the docs extra), or a skip naming the fix (a failure with ``CI=true``)."""
    try:
        import ipykernel  # noqa: F401
        import jupytext
        import nbclient  # noqa: F401
        import nbformat
    except ImportError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the notebooks cannot run: {err}")
        pytest.skip(f"{err.name} is not installed: pip install -e '.[docs]' (scripts/setup.sh --test does)")
    return nbformat, jupytext


def _only(cell):
    """A notebook of one cell (to count its views)."""
    import nbformat

    return nbformat.v4.new_notebook(cells=[cell])


def test_every_tutorial_has_a_notebook():
    sources = tutorials()
    assert len(sources) >= 6, sources
    missing = [py.name for py in sources if not py.with_suffix(".ipynb").is_file()]
    assert not missing, f"no saved notebook for {missing}: run bash scripts/notebooks.sh"


@pytest.mark.slow
@pytest.mark.parametrize("py", tutorials(), ids=lambda p: p.stem)
def test_the_saved_notebook_is_a_fresh_execution_of_its_source(py, tmp_path, monkeypatch):
    nbformat, jupytext = _tools()
    ipynb = py.with_suffix(".ipynb")
    fix = f"regenerate it: bash scripts/notebooks.sh {py.name[:2]}"
    assert ipynb.is_file(), f"{ipynb.name} is missing: {fix}"
    saved = nbformat.read(ipynb, as_version=4)
    assert jupytext.writes(saved, fmt=FORMAT) == py.read_text(), f"{ipynb.name} does not pair with {py.name}: {fix}"
    code = [c.source for c in saved.cells if c.cell_type == "code"]
    assert code and code[0] == INSTALL_CELL, f"{py.name}'s first code cell must install what Colab needs: {fix}"

    monkeypatch.setenv("MI_TUTORIAL_QUICK", "1")
    fresh = execute(py, cwd=tmp_path)  # a failing cell fails here, with its traceback

    want, got = structure(saved), structure(fresh)
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g == w, f"cell {i} of {ipynb.name}: saved {w[2]}, fresh execution {g[2]}: {fix}"
    assert views(saved) >= 1, f"{ipynb.name} shows no view (res.show() as a cell's last line)"
    once = 1 if circuitsvis_views(saved) else 0
    assert bundles(saved) == bundles(fresh) == once, "the circuitsvis bundle must come once per notebook"
    if once:
        first = next(c for c in saved.cells if c.cell_type == "code" and circuitsvis_views(_only(c)))
        assert BUNDLE in "".join(str(o.get("data", {}).get("text/html", "")) for o in first.outputs), \
            "the first circuitsvis view of the notebook carries the bundle"
    for name, size in WRITES.get(py.name[:2], {}).items():
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size >= size, name
