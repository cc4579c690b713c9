"""The result protocol: every mi_lenses result is a dataclass with the same outputs.

============================  ==========================================================================
``res.show(batch=0)``         circuitsvis ``RenderedHTML`` for a notebook (offline: no CDN, no network probe)
``res.to_html(path, batch)``  a standalone offline HTML page (returned; written atomically when ``path``)
``res.print(batch=0)``        a rich table in the terminal (``res.table()`` returns it)
``res.to_dict(batch=0)``      JSON-ready dict (NaN and padding become ``null``); ``res.to_json(path)`` writes it
``res.to_dataframe()``        tidy pandas frame, one row per unit, padding excluded
``repr(res)``                 one line: the type, the model, the prompts or shape, the key numbers (no tensors)
============================  ==========================================================================

A result computed while the user's own hooks were active on the model records them in ``active_hooks`` (set by
the entry point, see :mod:`mi_lenses.models.interventions`): the page and the notebook view open with a note naming
them, the terminal table is followed by one, and the JSON holds them under ``"hooks"``.

``batch`` selects a prompt of a batched result (results of one prompt accept only 0). Dimension names are the same
everywhere: ``batch`` for prompts, ``layer`` for residual rows / source layers, ``top_k`` for the number of items a
view lists.

**View options.** A result type declares the options of its views once, in ``view_options`` (option name ->
default), e.g. ``DLAResult.view_options == {"top_k": 10, "head": None, "what": "components"}``. Each of ``to_dict``,
``table``, ``fragment`` and ``to_dataframe`` takes the options that apply to it, under the declared names and with
the declared defaults; ``show``, ``print``, ``to_html`` and ``to_json`` accept every declared option on every result
type and hand each view the ones it takes (a name the type does not declare is a ``TypeError`` listing those it
does). A ranking method ``top`` (where a type has one) takes ``top_k`` with the declared default too.

**Checked when a class is defined** (like penzai's ``Layer.__init_subclass__``): a subclass implements ``to_dict``,
``to_dataframe``, ``table``, ``fragment`` and ``_summary`` (the one line of its ``repr``); ``to_dict``, ``table``
and ``fragment`` take ``batch=0`` (keyword-only); every other argument of a view is a declared option with its
declared default, and every declared option is taken by some view; the shared ``show``/``print``/``to_html``/
``to_json`` are not overridden. Otherwise the ``class`` statement raises ``TypeError``.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is")
    >>> json.loads(res.to_json()) == res.to_dict(), "<!DOCTYPE html>" in res.to_html()
    (True, True)
    >>> repr(res).startswith("<LensResult logit lens on ") and "\\n" not in repr(res)
    True
    >>> class Broken(Result):
    ...     view_options = {"top_k": 10}
    ...     def to_dict(self, *, batch=0, top_k=20): ...
    ...     def to_dataframe(self): ...
    ...     def table(self, *, batch=0, top_k=10): ...
    ...     def fragment(self, *, batch=0): ...
    ...     def _summary(self): ...
    Traceback (most recent call last):
    ...
    TypeError: Broken.to_dict() defaults top_k=20, but Broken.view_options declares top_k=10: one default per option.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch
from rich.console import Console

from mi_lenses.atomic import write_atomic
from mi_lenses.indexing import resolve_index
from mi_lenses.viz.html import hooks_note, offline_html, page

LN2 = math.log(2.0)  # nats per bit: every ``*_bits`` value is the stored nats divided by this

VIEWS = ("to_dict", "to_dataframe", "table", "fragment")  # every result type implements these ...
PER_PROMPT_VIEWS = ("to_dict", "table", "fragment")  # ... these of one prompt, ``batch=0`` (the frame holds all)
SHARED = ("show", "print", "to_html", "to_json")  # Result's own: they route the declared options to the views


class Result:
    """Base of every result: ``show``, ``print``, ``to_html``, ``to_json`` and a one-line ``repr`` are shared;
    ``to_dict``, ``to_dataframe``, ``table`` and ``fragment`` (the page body) are written per type.

    ``view_options`` maps each option of the type's views to its default (``DLAResult``: ``{"top_k": 10, "head":
    None, "what": "components"}``); the shared methods accept every declared option and hand each view the ones it
    takes. A subclass is checked when it is defined (:func:`check_protocol`): a missing view, an undeclared option,
    another default or a ``batch`` that is not ``batch=0`` is a ``TypeError`` at the ``class`` statement.
    """

    active_hooks: tuple[str, ...] = ()  # the user's hooks active during the computation (set by the entry point)
    view_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # option name -> default (module docstring)
    _takes: ClassVar[Mapping[str, frozenset[str]]] = MappingProxyType({})  # view -> the declared options it takes

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._takes = MappingProxyType(check_protocol(cls))
        cls.view_options = MappingProxyType(dict(cls.view_options))
        if "__repr__" not in cls.__dict__:
            # set on the class itself before @dataclass runs, which would otherwise write a repr of every field
            # (every tensor printed); a subclass that writes its own __repr__ keeps it
            cls.__repr__ = Result.__repr__  # type: ignore[method-assign]

    @property
    def n_batch(self) -> int:
        """Number of prompts in the result."""
        return 1

    @property
    def title(self) -> str:
        return type(self).__name__

    def check_batch(self, batch: int) -> int:
        """``batch`` as an index into the prompts (negative from the end), or a clear error."""
        return resolve_index(batch, self.n_batch, "batch", f"this result holds {self.n_batch} prompt(s)")

    def __repr__(self) -> str:
        """One line: ``<Type what on 'model': prompts or shape, key numbers>``, no tensors."""
        return f"<{type(self).__name__} {self._summary()}>".replace("\n", " ")  # strings in it are repr()s

    # ------------------------------------------------------------------------------------------ implemented per type
    # (declared here for readers and type checkers; check_protocol refuses a subclass that does not implement them)
    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def to_dataframe(self) -> Any:
        raise NotImplementedError

    def table(self, *, batch: int = 0) -> Any:
        raise NotImplementedError

    def fragment(self, *, batch: int = 0) -> str:
        raise NotImplementedError

    def _summary(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ shared
    def show(self, *, batch: int = 0, **options: Any):
        """Render in a notebook: an offline circuitsvis ``RenderedHTML`` (``options``: see ``view_options``)."""
        return offline_html(hooks_note(self.active_hooks) + self._view("fragment", batch, options))

    def print(self, *, batch: int = 0, width: int | None = None, **options: Any) -> None:
        """Print :meth:`table` to the terminal (``options``: see ``view_options``)."""
        console = Console(width=width)
        console.print(self._view("table", batch, options))
        if self.active_hooks:
            console.print(f"computed under your hooks: {', '.join(self.active_hooks)}", style="dim")

    def to_html(self, path: str | os.PathLike | None = None, *, batch: int = 0, **options: Any) -> str:
        """A standalone offline HTML page (circuitsvis bundle inlined); written atomically to ``path`` if given
        (``options``: see ``view_options``)."""
        text = page(self.title, hooks_note(self.active_hooks) + self._view("fragment", batch, options))
        if path is not None:
            write_atomic(path, text)
        return text

    def to_json(self, path: str | os.PathLike | None = None, *, batch: int = 0, **options: Any) -> str:
        """:meth:`to_dict` as JSON text; written atomically to ``path`` if given (``options``: see
        ``view_options``)."""
        data = self._view("to_dict", batch, options)
        if self.active_hooks:
            data = {**data, "hooks": list(self.active_hooks)}
        return write_json(path, data)

    def _view(self, name: str, batch: Any, options: dict[str, Any]) -> Any:
        """View ``name`` of prompt ``batch`` with the declared ``options`` it takes (an undeclared one: TypeError)."""
        unknown = [k for k in options if k not in self.view_options]
        if unknown:
            declared = ", ".join(f"{k}={v!r}" for k, v in self.view_options.items()) or "none"
            raise TypeError(f"{type(self).__name__} has no view option {', '.join(map(repr, unknown))}; its options "
                            f"(with their defaults): {declared}.")
        takes = self._takes[name]
        return getattr(self, name)(batch=batch, **{k: v for k, v in options.items() if k in takes})


def check_protocol(cls: type) -> dict[str, frozenset[str]]:
    """The protocol check of a :class:`Result` subclass when it is defined (see the module docstring): raise
    ``TypeError`` naming what breaks it; return, per view (and ``top``), the declared options it takes."""
    where = cls.__name__
    declared = cls.view_options
    if not isinstance(declared, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in declared):
        raise TypeError(f"{where}.view_options must map option names to their defaults, got {declared!r}.")
    if "batch" in declared:
        raise TypeError(f"{where}.view_options declares batch: it is every view's own argument, not an option.")
    for name in SHARED:
        if name in cls.__dict__:
            raise TypeError(f"{where} overrides {name}(): the shared views are Result's; declare the options of "
                            f"to_dict/table/fragment in {where}.view_options instead.")
    takes: dict[str, frozenset[str]] = {}
    for view in VIEWS + ("_summary", "top"):
        fn = inspect.getattr_static(cls, view, None)
        if view == "top" and fn is None:
            continue
        if fn is None or fn is Result.__dict__.get(view):
            raise TypeError(f"{where} does not implement {view}(): every result implements "
                            f"{', '.join(VIEWS)} and _summary (the one line of its repr; see mi_lenses.results).")
        params = list(inspect.signature(fn).parameters.values())[1:]  # without self
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{where}.{view}() takes {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}: "
                                f"declare its options by name in {where}.view_options.")
        if view in PER_PROMPT_VIEWS:
            batch = next((p for p in params if p.name == "batch"), None)
            if batch is None or batch.kind is not batch.KEYWORD_ONLY or not _same(batch.default, 0):
                raise TypeError(f"{where}.{view}() must take batch=0 (keyword-only): the prompt it shows.")
        own = [p for p in params if p.name != "batch"]
        for p in own:
            if p.name not in declared:
                if view == "top":
                    continue  # top's own arguments (what to rank, by what)
                options = ", ".join(declared) or "none"
                raise TypeError(f"{where}.{view}() takes {p.name}=, which {where}.view_options does not declare "
                                f"(declared: {options}): declare it there with its default, or use a declared name.")
            if p.default is p.empty or not _same(p.default, declared[p.name]):
                got = f"takes {p.name} without a default" if p.default is p.empty else \
                    f"defaults {p.name}={p.default!r}"
                raise TypeError(f"{where}.{view}() {got}, but {where}.view_options declares "
                                f"{p.name}={declared[p.name]!r}: one default per option.")
        takes[view] = frozenset(p.name for p in own if p.name in declared)
    if "top" in takes and "top_k" not in takes["top"]:
        raise TypeError(f"{where}.top() must take top_k= (declared in {where}.view_options): the number of items it "
                        "returns.")
    unused = [k for k in declared if not any(k in t for t in takes.values())]
    if unused:
        raise TypeError(f"{where}.view_options declares {', '.join(unused)}, which no view takes.")
    return takes


def _same(a: Any, b: Any) -> bool:
    """Equal defaults of the same type (``1``, ``1.0`` and ``True`` differ)."""
    return type(a) is type(b) and a == b


def plural(n: int, noun: str) -> str:
    """``"1 prompt"``, ``"3 prompts"``: counts in a result's ``repr``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def jsonable(value: Any, digits: int | None = 6) -> Any:
    """Plain JSON data from tensors, numpy values, lists and dicts: floats rounded to ``digits`` places (``None``:
    not rounded), NaN and infinities as ``None`` (JSON has neither).

    >>> jsonable({"kl": torch.tensor([0.1234567, float("nan")]), "n": torch.tensor(3)})
    {'kl': [0.123457, None], 'n': 3}
    """
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (list, tuple, str)):
        value = value.tolist()  # numpy
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return (value if digits is None else round(value, digits)) if math.isfinite(value) else None
    return value


def dataframe(data: Any) -> Any:
    """A pandas ``DataFrame`` of records (a list of dicts) or columns (a dict of lists): what every
    ``to_dataframe()`` returns."""
    import pandas as pd  # deferred: pandas costs ~0.6 s of start-up, and only to_dataframe() needs it

    return pd.DataFrame(data)


def write_json(path: str | os.PathLike | None, data: Any, digits: int | None = None) -> str:
    """``data`` as indented JSON text (through :func:`jsonable`, rounding floats to ``digits`` places if given);
    written atomically to ``path`` if given."""
    text = json.dumps(jsonable(data, digits), indent=1, ensure_ascii=False)
    if path is not None:
        write_atomic(path, text)
    return text
