"""Options records, written once: a frozen dataclass whose fields are declared with :func:`option` (default, help and
the ``argparse`` settings of its flag) is the one place an entry point's options live. :func:`with_options` gives the
entry point one explicit keyword-only parameter per field (``help()`` and ``inspect.signature`` show them with their
types and defaults, ``{options}`` in its docstring becomes their help), and the command line derives its flags,
choices and defaults from the same fields (:func:`mi_lenses.commands.add_dataclass_options`). The records:
:class:`~mi_lenses.lenses.options.LensOptions` and the patching records in :mod:`mi_lenses.patching.options`.

Example:
    >>> @dataclass(frozen=True)
    ... class Demo(Options):
    ...     top_k: int = option(5, "items listed", cli={"type": int})
    >>> @with_options(Demo)
    ... def run(prompt: str, options: Demo | None = None) -> int:
    ...     return options.top_k
    >>> run("x"), run("x", top_k=3), run("x", options=Demo(top_k=2)), run("x", options=Demo(top_k=2), top_k=7)
    (5, 3, 2, 7)
    >>> list(inspect.signature(run).parameters), inspect.signature(run).parameters["top_k"].kind.name
    (['prompt', 'top_k', 'options'], 'KEYWORD_ONLY')
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from mi_lenses.errors import LensInputError

F = TypeVar("F", bound=Callable[..., Any])


def option(default: Any, help: str, *, cli: dict[str, Any] | None = None) -> Any:
    """A field of an options record: its default, its help (the entry point's docstring and ``--help`` show it) and,
    with ``cli``, the ``argparse`` settings of its flag (``--name-with-dashes`` unless ``cli["flag"]``); without
    ``cli``, no flag."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class Options:
    """The base of every options record: frozen, so one record serves many calls (``opts.replace(top_k=10)``)."""

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> Any:
        """Check what needs no model (each record adds its checks); returns the record."""
        return self

    @classmethod
    def docs(cls) -> str:
        """One line per option (name, default, help): the ``{options}`` of an entry point's Args section."""
        return "\n".join(f"        {f.name} (default ``{f.default!r}``): {f.metadata['help']}."
                         for f in dataclasses.fields(cls))


def with_options(cls: type[Options]) -> Callable[[F], F]:
    """Give the decorated function (whose last parameter is ``options: cls | None = None``) one keyword-only parameter
    per field of ``cls``, placed before ``options``, and ``{options}`` in its docstring the fields' help; a call merges
    the keywords it passes over ``options`` (or the defaults) into the one record the function receives."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def decorate(fn: F) -> F:
        types = typing.get_type_hints(cls)  # resolved at decoration, once the record's module is complete
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[-1].name != "options":
            raise TypeError(f"{fn.__qualname__} must end with an `options` parameter to take {cls.__name__}")
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                       annotation=types[f.name]) for f in dataclasses.fields(cls)]
        last = params[-1].replace(kind=inspect.Parameter.KEYWORD_ONLY)
        full = sig.replace(parameters=[*params[:-1], *generated, last])

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = full.bind(*args, **kwargs)  # a TypeError names an unknown keyword, as a written signature would
            given = {k: bound.arguments.pop(k) for k in names if k in bound.arguments}
            base = bound.arguments.get("options") or cls()
            if not isinstance(base, cls):
                raise LensInputError(f"options must be a mi_lenses {cls.__name__}, got {type(base).__name__}.")
            bound.arguments["options"] = base.replace(**given) if given else base
            return fn(*bound.args, **bound.kwargs)

        wrapper.__signature__ = full  # type: ignore[attr-defined]
        wrapper.__options__ = cls  # type: ignore[attr-defined]  (the API reference reads it: scripts/griffe_lens_options.py)
        wrapper.__annotations__ = {**fn.__annotations__, **{n: types[n] for n in names}}
        if fn.__doc__ and "{options}" in fn.__doc__:
            wrapper.__doc__ = fn.__doc__.replace("{options}", cls.docs().strip())
        return wrapper  # type: ignore[return-value]

    return decorate
