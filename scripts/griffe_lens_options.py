"""A griffe extension (mkdocs.yml: mkdocstrings' python handler, ``extensions``) for the API reference: the lens entry
points show their real signatures, and the docstrings, written for ``help()`` and doctest, read well as Markdown.

- ``mi_lenses.options.with_options`` (``with_lens_options`` for the lenses) generates the keyword-only options of
  ``logit_lens``, ``tuned_lens``, ``run_lens``, ``Lens.__call__`` and the patching entry points at import time, and
  fills ``{options}`` in their docstrings; griffe reads the source, which has neither. For every function whose
  imported object names its record (``__options__``), this extension inserts one keyword-only parameter per field
  before ``options`` (its annotation as written in the record, its default from the imported class) and takes the
  docstring from the imported function. Every field of an options record gets its help text as its docstring.
- Docstrings: ``Example:`` sections become griffe's ``Examples:`` (their doctests render as code), doctest blocks
  outside a section are fenced (Markdown would read ``res.heads[0, 1, 2]`` as a link reference), and Sphinx roles
  (``:func:`~mi_lenses.x.f```) become code spans.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import griffe

from mi_lenses.options import Options

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")


def fence_doctests(text: str) -> str:
    """``text`` with every unindented doctest block (``>>>`` lines, their continuation and output lines up to a blank
    line) inside a ``pycon`` code fence; blocks in a section (indented) and fenced ones are left as they are."""
    out, inside, fenced = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and not inside and line.startswith(">>>"):
            out.append("```pycon")
            inside = True
        elif inside and not line.strip():
            out.append("```")
            inside = False
        out.append(line)
    if inside:
        out.append("```")
    return "\n".join(out)


def markdown(text: str) -> str:
    """A docstring written for ``help()`` as the Markdown griffe's Google-style parser reads (see the module doc)."""
    text = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", text, flags=re.M)
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return fence_doctests(text)


def _record(path: str) -> type | None:
    """The options record of the imported function at ``path`` (None if it takes none)."""
    try:
        return getattr(griffe.dynamic_import(path), "__options__", None)
    except ImportError:
        return None


def _options(func: griffe.Function, runtime: type) -> list[griffe.Parameter]:
    """One keyword-only parameter per field of the record ``runtime``, annotated as written there, with its default."""
    path = f"{runtime.__module__}.{runtime.__qualname__}"
    try:
        static = func.modules_collection[path]
    except (KeyError, AttributeError):
        static = None
    params = []
    for field in dataclasses.fields(runtime):
        member = static.members.get(field.name) if static is not None else None
        annotation = getattr(member, "annotation", None) or str(field.type)
        params.append(griffe.Parameter(field.name, annotation=annotation, kind=griffe.ParameterKind.keyword_only,
                                       default=repr(field.default)))
    return params


class LensOptionsSignatures(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

    def on_function(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if not any("with_" in str(d.value) and "options" in str(d.value) for d in func.decorators):
            return
        record = _record(func.path)
        params = list(func.parameters)
        names = [p.name for p in params]
        if record is None or "options" not in names or any(f.name in names for f in dataclasses.fields(record)):
            return
        at = names.index("options")
        func.parameters = griffe.Parameters(*params[:at], *_options(func, record), *params[at:])
        doc = inspect.getdoc(griffe.dynamic_import(func.path))
        if doc and func.docstring is not None:
            # "name (default ``x``): help" would read as a type in Google style; the Default column shows the default
            doc = re.sub(r"^(\s*)(\w+) \(default ``.*?``\): ", r"\1\2: ", doc, flags=re.M)
            func.docstring.value = markdown(doc)

    def on_class(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        try:
            runtime = griffe.dynamic_import(cls.path)
        except ImportError:
            return
        if not (isinstance(runtime, type) and issubclass(runtime, Options) and dataclasses.is_dataclass(runtime)):
            return
        for field in dataclasses.fields(runtime):
            attr = cls.members.get(field.name)
            if attr is not None and attr.docstring is None:
                attr.docstring = griffe.Docstring(f"{field.metadata['help']} (default ``{field.default!r}``).",
                                                  parent=attr)
