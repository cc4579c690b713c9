"""The shape of the package, checked: no import cycle between subpackages, no mi_lenses import hidden in a function,
third-party imports deferred only for heavy or optional dependencies (and saying why), HTML only in ``viz/``, the
lens options written once, and the ``Lens`` protocol checked when a class is defined."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import mi_lenses
from mi_lenses.lenses.options import LensOptions
from tolerance import EPS

PACKAGE = Path(mi_lenses.__file__).parent
# heavy or optional dependencies a function may import on first use (with a comment saying why)
DEFERRED = {"pandas", "transformers", "transformer_lens", "diffusers", "datasets", "gguf", "tqdm"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _function_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a mi_lenses module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mi_lenses"


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _unit(".".join(rel.parts))
        if src == "__init__" or path == PACKAGE / "__init__.py":
            continue  # the package's front door imports everything
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mi_lenses."):
                dst = _unit(node.module)
                if dst != src:
                    graph.setdefault(src, set()).add(dst)
    # depth-first search for a cycle
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_mi_lenses_import_inside_a_function():
    offenders = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path, tree in _modules()
                 for node in _function_imports(tree)
                 if (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name or "").startswith(
                     "mi_lenses")]
    assert not offenders, f"imports of mi_lenses modules inside functions (hoist them): {offenders}"


def test_deferred_imports_are_heavy_dependencies_and_say_why():
    bad = []
    for path, tree in _modules():
        lines = path.read_text().splitlines()
        for node in _function_imports(tree):
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            top = (name or "").split(".")[0]
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if top not in DEFERRED:
                bad.append(f"{where} imports {name} inside a function: import it at the top")
                continue
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not said:
                bad.append(f"{where} defers {name} without a comment saying why")
    assert not bad, "\n".join(bad)


def test_html_is_written_only_in_viz():
    offenders = []
    for path, tree in _modules():
        if "viz" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
                    tag in node.value for tag in ("<table", "<div", "<svg", "<tr>", "<td", "<span", "<img", "<p ")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"HTML written outside mi_lenses/viz: {offenders}"


# ------------------------------------------------------------------------------------------------ the lens options
def test_every_lens_entry_point_has_every_option_once():
    """The options are LensOptions' fields, in its order and with its defaults, on every entry point; each
    function's own source spells none of them."""
    fields = [(f.name, f.default) for f in dataclasses.fields(LensOptions)]
    for fn, drop in ((mi_lenses.run_lens, {"lens"}), (mi_lenses.logit_lens, set()), (mi_lenses.tuned_lens, {"lens"}),
                     (mi_lenses.Lens.__call__, {"self"})):
        params = inspect.signature(fn).parameters
        options = [(n, p.default) for n, p in params.items() if n in dict(fields)]
        assert options == fields, fn.__qualname__
        assert list(params)[-1] == "options"
        source = inspect.getsource(inspect.unwrap(fn))
        assert "position_chunk" not in source and "vocab_tile" not in source, f"{fn.__qualname__} spells options"
    doc = inspect.getdoc(mi_lenses.run_lens)
    assert all(f"{name} (default" in doc for name, _ in fields), "run_lens's docstring lists every option"


def test_options_merge_and_refuse_unknown_keywords(llama_raw):
    m = llama_raw.model
    opts = LensOptions(top_k=2, positions=[-1])
    a = mi_lenses.logit_lens(m, "The capital", options=opts)
    b = mi_lenses.logit_lens(m, "The capital", options=opts, top_k=3)
    assert a.top_ids.shape[-1] == 2 and b.top_ids.shape[-1] == 3 and a.positions == b.positions
    assert len(a.positions) == 1  # positions=[-1] kept from the record
    with pytest.raises(TypeError, match="top_kk"):
        mi_lenses.logit_lens(m, "The capital", top_kk=3)
    with pytest.raises(mi_lenses.LensInputError, match="LensOptions"):
        mi_lenses.logit_lens(m, "The capital", options={"top_k": 3})


def test_command_line_flags_come_from_the_options():
    from mi_lenses.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command").choices["logit-lens"]
    flags = {f for a in sub._actions for f in a.option_strings}
    for f in dataclasses.fields(LensOptions):
        cli = f.metadata["cli"]
        if cli is not None:
            assert cli.get("flag", "--" + f.name.replace("_", "-")) in flags
            action = next(a for a in sub._actions if a.dest == f.name)
            assert action.default == f.default and f.metadata["help"] in action.help


# ------------------------------------------------------------------------------------------------ the Lens protocol
def test_a_lens_that_breaks_the_protocol_fails_when_defined():
    with pytest.raises(TypeError, match="ahead must be an int >= 0"):
        class Bad(mi_lenses.Lens):  # noqa: F841
            ahead = 1.5

            def transform(self, hidden, row):
                return hidden
    with pytest.raises(TypeError, match="transform must take"):
        class NoRow(mi_lenses.Lens):  # noqa: F841
            def transform(self, hidden):
                return hidden
    with pytest.raises(TypeError, match="maps_final must be a bool"):
        class Flag(mi_lenses.Lens):  # noqa: F841
            maps_final = "yes"

            def transform(self, hidden, row):
                return hidden

    class NoTransform(mi_lenses.Lens):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoTransform()


def test_a_property_ahead_is_checked_when_bound(llama_raw):
    class Ahead(mi_lenses.Lens):
        @property
        def ahead(self):
            return -2

        def transform(self, hidden, row):
            return hidden

    with pytest.raises(mi_lenses.LensInputError, match="ahead"):
        Ahead()(llama_raw.model, "The capital")


def test_every_affine_lens_shares_one_bind_and_one_file_format(llama_raw, tmp_path):
    """The tuned lens (residual form) and a row-map lens (full form) of the same maps decode alike, are refused by
    another model alike, and round-trip through the one native format."""
    m = llama_raw.model
    g = torch.Generator().manual_seed(0)
    tuned = mi_lenses.TunedLens.from_model(m)
    with torch.no_grad():
        tuned.weight.normal_(0, 0.05, generator=g)
        tuned.bias.normal_(0, 0.05, generator=g)
    full = mi_lenses.RowMapLens.from_lens(tuned)  # rows 0..L-1 (a row-map lens has no implicit final row)
    rows = list(range(m.cfg.n_layers))
    a, b = tuned(m, "The capital of France", layers=rows), full(m, "The capital of France", layers=rows)
    assert torch.equal(a.top_ids, b.top_ids) and torch.allclose(a.kl, b.kl, atol=128 * EPS)
    for lens in (tuned, full):
        lens.save(tmp_path / lens.kind)
        back = mi_lenses.load_lens(tmp_path / lens.kind, m)
        assert type(back) is type(lens)
        assert all(torch.equal(back.stored(r)[0], lens.stored(r)[0].detach()) for r in lens.stored_rows())
    assert type(mi_lenses.AffineLens.bind).__name__ == "function"
    assert all(cls.bind is mi_lenses.AffineLens.bind for cls in (mi_lenses.TunedLens, mi_lenses.RowMapLens,
                                                                 mi_lenses.JacobianLens, mi_lenses.FutureLens,
                                                                 mi_lenses.AttributeLens))
