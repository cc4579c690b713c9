"""One module per ``mi-lenses`` subcommand, built on shared parent parsers.

Each module defines ``register(sub, parents)``: it adds its subparser to ``sub`` (an ``argparse`` subparsers object),
inheriting the shared flags from ``parents`` (:class:`Parents`), and sets ``func=run`` where ``run(args) -> int`` does
the work. ``mi_lenses.cli`` discovers the modules in this package, so adding a command never touches another command's
file. Errors derived from ``mi_lenses.errors.MiLensesError`` are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parents:
    """The shared flags: ``model`` (``--model``, ``--device``) and ``outputs`` (``--json``, ``--html``)."""

    model: argparse.ArgumentParser
    outputs: argparse.ArgumentParser


def parents() -> Parents:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=None,
                       help="GGUF file, Hugging Face folder or hub name (default: the embedded SmolLM2-135M)")
    model.add_argument("--device", default="cpu", help="torch device (default cpu)")
    outputs = argparse.ArgumentParser(add_help=False)
    outputs.add_argument("--json", default=None, help="also write the result as JSON here")
    outputs.add_argument("--html", default=None, help="also write a standalone offline HTML page here")
    return Parents(model, outputs)


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (with ``metadata["help"]``), default and help taken from the
    field, so the command line and the Python API cannot drift. Booleans become switches."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=f.default, help=f.metadata.get("help"))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=f.default,
                                help=f"{f.metadata.get('help', '')} (default {f.default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of ``cls`` from the flags :func:`add_dataclass_options` added."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def load(args: argparse.Namespace, name: str | None = None, device: str | None = None,
         compatibility_mode: bool = True) -> Any:
    """The model named by ``--model`` (or ``name``) on ``--device`` (or ``device``); ``compatibility_mode=False``
    skips folding the norms (0.6 s for SmolLM2) where a command's numbers do not depend on it."""
    from mi_lenses.models.loading import load_model

    return load_model(name if name is not None else args.model, device=device or args.device,
                      compatibility_mode=compatibility_mode)


def write_outputs(args: argparse.Namespace, result: Any, **options: Any) -> None:
    """``result.to_json(--json)`` and ``result.to_html(--html)``, if given (atomically)."""
    if getattr(args, "json", None):
        result.to_json(args.json, **options)
        print(f"wrote {args.json}")
    if getattr(args, "html", None):
        result.to_html(args.html, **options)
        print(f"wrote {args.html}")
