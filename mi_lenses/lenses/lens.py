"""The :class:`Lens` protocol every lens implements, checked when a subclass is defined, and the logit lens.

A lens maps each residual-stream row to a hidden state that is then decoded through the model's own final norm and
unembedding (:class:`~mi_lenses.models.decode.Decoder`): ``transform`` is that map, ``bind`` checks the lens against
a model, ``ahead`` says which position it predicts. The logit lens is the identity map.

Like penzai's ``Layer.__init_subclass__``, a class that breaks the protocol fails when it is *defined*, not on the
first run: ``transform`` must take ``(hidden, row)``, ``bind`` ``(model)``, and ``ahead`` / ``maps_final`` must be an
int >= 0 / a bool (or properties, checked when the lens is bound).

Example:
    >>> class Doubled(Lens):
    ...     name = "doubled"
    ...     def transform(self, hidden, row):
    ...         return 2 * hidden
    >>> lens_by_name("logit").name
    'logit lens'
    >>> class Broken(Lens):
    ...     ahead = -1
    ...     def transform(self, hidden, row):
    ...         return hidden
    Traceback (most recent call last):
    ...
    TypeError: Broken.ahead must be an int >= 0 (or a property), got -1
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable

from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.engine import run_lens
from mi_lenses.lenses.options import LensOptions, with_lens_options
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.view import ResidualRow

_NAMED: dict[str, Callable[[], "Lens"]] = {}


class Lens(ABC):
    """Base of every lens (see the module docstring). Calling a lens runs it through
    :func:`~mi_lenses.lenses.engine.run_lens` with the same options.

    Members a subclass declares:

    * ``transform(hidden, row)``: the map applied to a row's hidden states ``[n, d_model]`` before decoding
      (``row.lens_index`` follows the ``tuned-lens`` package: 0 is the embeddings, ``l`` the input of block ``l``);
    * ``bind(model)``: the lens to run on ``model`` (raise ``LensInputError`` if it does not belong to it);
    * ``ahead``: the lens at position ``t`` predicts the model's distribution at ``t + ahead`` (0: the next token; a
      Future Lens with ``ahead=N`` predicts token ``t + N + 1``). KL, cross-entropy, ranks and surprisal are taken
      against position ``t + ahead``; where a prompt has no such position they are NaN / -1;
    * ``maps_final``: ``transform`` changes the final row too (it is then read like any other row, and the
      model-output identity of ``verify()`` does not apply);
    * ``rows``: the rows (lens indices) a lens can read when not all (the default ``layers``), else None.
    """

    name: str = "lens"
    ahead: int = 0
    maps_final: bool = False
    rows: list[int] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_members(cls)

    @abstractmethod
    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        """The hidden states to decode for ``row``."""

    def bind(self, model: Any) -> "Lens":
        """The lens to run on ``model`` (raise ``LensInputError`` if it does not belong to it)."""
        return self

    @with_lens_options
    def __call__(self, model: Any, prompt: PromptInput | None = None, *, cache: Any = None,
                 logits: Tensor | None = None, attention_mask: Tensor | None = None,
                 options: LensOptions | None = None) -> LensResult:
        """Run this lens on ``model``: see :func:`~mi_lenses.lenses.engine.run_lens` for every option."""
        return run_lens(self, model, prompt, cache=cache, logits=logits, attention_mask=attention_mask,
                        options=options)


def _check_members(cls: type) -> None:
    """The protocol check of a ``Lens`` subclass, when it is defined."""
    where = cls.__name__
    for attr, params in (("transform", ("hidden", "row")), ("bind", ("model",))):
        fn = inspect.getattr_static(cls, attr)
        if not callable(fn):
            raise TypeError(f"{where}.{attr} must be a method taking {params}")
        names = [p.name for p in inspect.signature(fn).parameters.values()][1:]  # without self
        if len(names) < len(params):
            raise TypeError(f"{where}.{attr} must take {params}, it takes {tuple(names)}")
    for attr, ok, what in (("ahead", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                            "an int >= 0"),
                           ("maps_final", lambda v: isinstance(v, bool), "a bool")):
        value = inspect.getattr_static(cls, attr)
        if not isinstance(value, property) and not ok(value):
            raise TypeError(f"{where}.{attr} must be {what} (or a property), got {value!r}")


class LogitLens(Lens):
    """The logit lens (nostalgebraist 2020): decode every residual state as if it were the last one."""

    name = "logit lens"

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        return hidden


def register_lens(name: str, factory: Callable[[], Lens]) -> None:
    """Make ``factory()`` available by ``name`` to :func:`lens_by_name` (the comparison bench's built-in lenses:
    ``"logit"`` here, ``"patchscope"`` and ``"patchscope-q"`` from :mod:`mi_lenses.patchscopes.lens`)."""
    _NAMED[name] = factory


def lens_by_name(name: str) -> Lens:
    """A lens that needs nothing fitted, by name (see :func:`register_lens`)."""
    if name not in _NAMED:
        raise LensInputError(f"{name!r} is not a built-in lens ({', '.join(_NAMED)}): pass the fitted lens itself, "
                             f"e.g. {{'{name}': lens}}.")
    return _NAMED[name]()


register_lens("logit", LogitLens)
