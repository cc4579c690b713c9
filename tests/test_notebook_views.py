"""One circuitsvis bundle per notebook (mi_lenses.viz.notebook): the first view of a kernel session carries it, later
views wait for it, the cell that carried it carries it again when it runs again, Colab gets it in every view, and
``to_html`` pages stay self-contained. Then the real thing: a notebook with six views executed in a Jupyter kernel on
the embedded SmolLM2, saved (at most 3 MB), exported by nbconvert and opened in headless Chromium with no network:
every view renders, also with the bundle's output moved to the end of the page. (Inlined in every view, the same six
views saved to 9.6 MB.)
"""

from __future__ import annotations

import sys
import types

import pytest

import mi_lenses
from conftest import PROMPT
from mi_lenses.viz import notebook

MARK = 'data-mi-lenses="circuitsvis-bundle"'


@pytest.fixture
def kernel(monkeypatch):
    """A fake Jupyter kernel: ``kernel.run(cell)`` starts an execution of ``cell`` (a new request id each time)."""
    notebook.reset()
    state = {"cell": "a", "run": 0}

    class Kernel:
        def run(self, cell: str) -> None:
            state["cell"], state["run"] = cell, state["run"] + 1

    monkeypatch.setattr(notebook, "kernel_cell", lambda: (state["cell"], f"msg-{state['run']}"))
    monkeypatch.delenv(notebook.ENV, raising=False)
    yield Kernel()
    notebook.reset()


def _carries(view) -> bool:
    html = view._repr_html_()
    assert "CircuitsVis.render(" in html  # a view either way
    return html.count(MARK) == 1


def test_the_first_view_of_a_session_carries_the_bundle(kernel, llama_raw):
    res = mi_lenses.logit_lens(llama_raw.model, PROMPT, progress=False)
    kernel.run("a")
    assert _carries(res.show())
    assert not _carries(res.show())  # the same execution: once
    kernel.run("b")
    assert not _carries(res.show())
    light = res.show()._repr_html_()
    assert "window.CircuitsVis" in light and len(light) < len(str(res.show())) / 4
    kernel.run("a")  # the carrier runs again (Run all, or a re-run): it carries again, so the saved notebook has it
    assert _carries(res.show())
    kernel.run("b")
    assert not _carries(res.show())
    notebook.reset()
    assert _carries(res.show())


def test_pages_and_strings_stay_self_contained(kernel, llama_raw):
    res = mi_lenses.logit_lens(llama_raw.model, PROMPT, progress=False)
    kernel.run("a")
    res.show()._repr_html_()
    view = res.show()
    assert not _carries(view)
    assert str(view).count(MARK) == 1 and view.local_src.count(MARK) == 1
    assert res.to_html().count(MARK) == 1 and res.to_html().count("var CircuitsVis=") == 1


def test_colab_and_the_environment_variable_inline_every_view(kernel, llama_raw, monkeypatch):
    res = mi_lenses.logit_lens(llama_raw.model, PROMPT, progress=False)
    kernel.run("a")
    assert _carries(res.show())
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))  # each output its own frame
    assert _carries(res.show()) and _carries(res.show())
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setenv(notebook.ENV, "every")
    assert _carries(res.show())


def test_outside_a_kernel_every_view_is_whole(llama_raw):
    res = mi_lenses.logit_lens(llama_raw.model, PROMPT, progress=False)
    assert notebook.kernel_cell() is None
    assert _carries(res.show()) and _carries(res.show())
    assert repr(res.show()).startswith("<mi_lenses view: ")


def test_the_cell_is_read_from_the_kernel_request(monkeypatch):
    """JupyterLab and VS Code send the cell id in the request's metadata; nbclient does not: then its source."""
    parent = {"header": {"msg_id": "m1"}, "metadata": {"cellId": "c-7"}, "content": {"code": "res.show()"}}

    class Kernel:
        def get_parent(self, channel=None):
            return parent

    shell = types.SimpleNamespace(kernel=Kernel())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert notebook.kernel_cell() == ("c-7", "m1")
    parent["metadata"] = {}
    cell, run = notebook.kernel_cell()
    assert cell.startswith("source:") and run == "m1"
    parent["content"] = {"code": "other()"}
    assert notebook.kernel_cell()[0] != cell
    shell.kernel = None  # a terminal IPython: no kernel, no notebook page
    assert notebook.kernel_cell() is None


# ---------------------------------------------------------------------------------------------- the real notebook
SIX = [  # six circuitsvis views of one notebook (the kinds of result that carry circuitsvis), on the embedded model
    "mi_lenses.logit_lens(model, 'The capital of France is', targets=' Paris').show()",
    "mi_lenses.logit_lens(model, IOI, targets=[' Mary', ' John']).show()",
    "mi_lenses.direct_logit_attribution(model, IOI, answer=' Mary', wrong=' John').show()",
    "att = mi_lenses.attention(model, IOI)\natt.show()",
    "att.qk_terms(23, 3).show()",
    "mi_lenses.TunedLens.from_model(model)(model, 'The Eiffel Tower is in the city of').show()",
]
SETUP = ("import mi_lenses\n\nmodel = mi_lenses.load_model()\n"
         "IOI = 'When Mary and John went to the store, John gave a drink to'")
# nbconvert's template loads require.js and MathJax from a CDN: point both at empty scripts (this test is offline)
EMPTY_JS = "data:text/javascript,"
MOUNTS = "Array.from(document.querySelectorAll('[id^=circuits-vis-]'))"


@pytest.mark.slow
def test_a_six_view_notebook_saves_small_and_renders_everywhere(tmp_path):
    from test_report_browser import require_browser
    from test_tutorials import _tools

    nbformat, _ = _tools()
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    from browser import Browser
    from notebooks import bundles, views

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in [SETUP, *SIX]])
    NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "six.ipynb"
    nbformat.write(nb, path)
    size = path.stat().st_size
    assert views(nb) == 6 and bundles(nb) == 1, (views(nb), bundles(nb))
    assert size <= 3_000_000, f"six views saved to {size / 1e6:.2f} MB"
    carrier = nb.cells[1].outputs[-1].data["text/html"]
    assert MARK in carrier and all(MARK not in c.outputs[-1].data["text/html"] for c in nb.cells[2:])

    exporter = HTMLExporter(require_js_url=EMPTY_JS, mathjax_url=EMPTY_JS)
    reopened = nbformat.read(path, as_version=4)  # what a reader opens: the saved file, no kernel
    moved = nbformat.read(path, as_version=4)
    moved.cells.append(moved.cells.pop(1))  # the bundle's output last: the views before it wait for it
    with Browser(require_browser()) as b:
        for name, book in (("saved", reopened), ("bundle last", moved)):
            html, _ = exporter.from_notebook_node(book)
            page_path = tmp_path / f"{name.replace(' ', '_')}.html"
            page_path.write_text(html)
            assert html.count(MARK) == 1
            page = b.open(page_path)
            assert page.console_errors == [], (name, page.console_errors)
            assert page.network_requests == [], (name, page.network_requests)
            counts = b.evaluate(f"{MOUNTS}.map(d => d.childElementCount)")
            # circuitsvis components: 3 per lens view, DLA 2, attention 2, the q.k terms 1
            assert len(counts) == 3 * 3 + 2 + 2 + 1 and all(counts), (name, counts)
            assert "Top-1 token per layer" in page.text and "Head view" in page.text, name
