"""A griffe extension (mkdocs.yml: mkdocstrings' python handler, ``extensions``) for the API reference: the lens entry
points show their real signatures, and the docstrings, written for ``help()`` and doctest, read well as Markdown.

- ``mi_lenses.lenses.options.with_lens_options`` generates the keyword-only options of ``logit_lens``, ``tuned_lens``,
  ``run_lens`` and ``Lens.__call__`` at import time, and fills ``{options}`` in their docstrings; griffe reads the
  source, which has neither. For every function decorated with it, this extension inserts one keyword-only parameter
  per ``LensOptions`` field before ``options`` (its annotation as written in ``LensOptions``, its default from the
  imported class) and takes the docstring from the imported function. Every ``LensOptions`` field gets its help
  text as its docstring.
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

OPTIONS = "mi_lenses.lenses.options.LensOptions"
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


def _options(func: griffe.Function) -> list[griffe.Parameter]:
    """One keyword-only parameter per ``LensOptions`` field, annotated as written there, with its default."""
    runtime = griffe.dynamic_import(OPTIONS)
    try:
        static = func.modules_collection[OPTIONS]
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
        if not any(str(d.value).endswith("with_lens_options") for d in func.decorators):
            return
        params = list(func.parameters)
        if "options" not in [p.name for p in params] or any(p.name == "top_k" for p in params):
            return
        at = [p.name for p in params].index("options")
        func.parameters = griffe.Parameters(*params[:at], *_options(func), *params[at:])
        doc = inspect.getdoc(griffe.dynamic_import(func.path))
        if doc and func.docstring is not None:
            # "name (default ``x``): help" would read as a type in Google style; the Default column shows the default
            doc = re.sub(r"^(\s*)(\w+) \(default ``.*?``\): ", r"\1\2: ", doc, flags=re.M)
            func.docstring.value = markdown(doc)

    def on_class(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.path != OPTIONS:
            return
        for field in dataclasses.fields(griffe.dynamic_import(cls.path)):
            attr = cls.members.get(field.name)
            if attr is not None and attr.docstring is None:
                attr.docstring = griffe.Docstring(f"{field.metadata['help']} (default ``{field.default!r}``).",
                                                  parent=attr)
