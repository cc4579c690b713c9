"""The result protocol: every mi_lenses result is a dataclass with the same outputs.

============================  ==========================================================================
``res.show(batch=0)``         circuitsvis ``RenderedHTML`` for a notebook (offline: no CDN, no network probe)
``res.to_html(path, batch)``  a standalone offline HTML page (returned; written atomically when ``path``)
``res.print(batch=0)``        a rich table in the terminal (``res.table()`` returns it)
``res.to_dict(batch=0)``      JSON-ready dict (NaN and padding become ``null``); ``res.to_json(path)`` writes it
``res.to_dataframe()``        tidy pandas frame, one row per unit, padding excluded
============================  ==========================================================================

A result computed while the user's own hooks were active on the model records them in ``active_hooks`` (set by
the entry point, see :mod:`mi_lenses.models.interventions`): the page and the notebook view open with a note naming
them, the terminal table is followed by one, and the JSON holds them under ``"hooks"``.

``batch`` selects a prompt of a batched result (results of one prompt accept only 0). Dimension names are the same
everywhere: ``batch`` for prompts, ``layer`` for residual rows / source layers. A subclass implements
``to_dict``, ``to_dataframe``, ``table`` and ``fragment`` (the page body); extra keyword options of those (e.g.
``value=`` of a lens table) pass through ``show``/``print``/``to_html``/``to_json``.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is")
    >>> isinstance(res, Result), res.to_json()[:1], "<!DOCTYPE html>" in res.to_html()
    (True, '{', True)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
from rich.console import Console

from mi_lenses.atomic import write_atomic
from mi_lenses.indexing import resolve_index
from mi_lenses.viz.html import hooks_note, offline_html, page

LN2 = math.log(2.0)  # nats per bit: every ``*_bits`` value is the stored nats divided by this


class Result:
    """Base class of every result (see the module docstring)."""

    active_hooks: tuple[str, ...] = ()  # the user's hooks active during the computation (set by the entry point)

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

    # ------------------------------------------------------------------------------------------ implemented per type
    def to_dict(self, *, batch: int = 0, **options: Any) -> dict[str, Any]:
        raise NotImplementedError

    def to_dataframe(self):
        raise NotImplementedError

    def table(self, *, batch: int = 0, **options: Any) -> Any:
        raise NotImplementedError

    def fragment(self, *, batch: int = 0, **options: Any) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ shared
    def show(self, *, batch: int = 0, **options: Any):
        """Render in a notebook: an offline circuitsvis ``RenderedHTML``."""
        return offline_html(hooks_note(self.active_hooks) + self.fragment(batch=batch, **options))

    def print(self, *, batch: int = 0, width: int | None = None, **options: Any) -> None:
        """Print :meth:`table` to the terminal."""
        console = Console(width=width)
        console.print(self.table(batch=batch, **options))
        if self.active_hooks:
            console.print(f"computed under your hooks: {', '.join(self.active_hooks)}", style="dim")

    def to_html(self, path: str | os.PathLike | None = None, *, batch: int = 0, **options: Any) -> str:
        """A standalone offline HTML page (circuitsvis bundle inlined); written atomically to ``path`` if given."""
        text = page(self.title, hooks_note(self.active_hooks) + self.fragment(batch=batch, **options))
        if path is not None:
            write_atomic(path, text)
        return text

    def to_json(self, path: str | os.PathLike | None = None, *, batch: int = 0, **options: Any) -> str:
        """:meth:`to_dict` as JSON text; written atomically to ``path`` if given."""
        data = self.to_dict(batch=batch, **options)
        if self.active_hooks:
            data = {**data, "hooks": list(self.active_hooks)}
        return write_json(path, data)


UNSET: Any = object()  # default of a deprecated keyword, to tell "not passed" from None


def renamed(value: Any, old_value: Any, old: str, new: str) -> Any:
    """``old_value`` (with a ``DeprecationWarning`` naming ``new``) when the deprecated keyword ``old`` was passed,
    else ``value``."""
    if old_value is UNSET:
        return value

    warnings.warn(f"the {old}= keyword is deprecated: use {new}= (same meaning).", DeprecationWarning, stacklevel=3)
    return old_value


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
