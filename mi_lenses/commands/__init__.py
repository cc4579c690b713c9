"""One module per ``mi-lenses`` subcommand, built on shared parent parsers.

Each module defines ``register(sub, parents)``: it adds its subparser to ``sub`` (an ``argparse`` subparsers object),
inheriting the shared flags from ``parents`` (:class:`Parents`), and sets ``func=run`` where ``run(args) -> int`` does
the work. ``mi_lenses.cli`` discovers the modules in this package, so adding a command never touches another command's
file. Errors derived from ``mi_lenses.errors.MiLensesError`` are printed as one line and exit with status 2.

Flags of options records (:class:`~mi_lenses.lenses.options.LensOptions`, ``TrainConfig``) are derived from their
fields (:func:`add_dataclass_options`), and every output path is declared with :func:`add_output`, so
``mi_lenses.cli`` checks that it can be written before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable

from mi_lenses.atomic import STDOUT, check_output
from mi_lenses.models.loading import load_model


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
    model.add_argument("--beyond-context", action="store_true",
                       help="accept prompts longer than the model's context (cfg.n_ctx; refused by default)")
    outputs = argparse.ArgumentParser(add_help=False)
    add_output(outputs, "--json", default=None, help="also write the result as JSON here (- for standard output)")
    add_output(outputs, "--html", default=None,
               help="also write a standalone offline HTML page here (- for standard output)")
    return Parents(model, outputs)


def add_output(parser: argparse.ArgumentParser, flag: str, *, folder: bool = False, **kwargs: Any) -> None:
    """Add an output-path flag; ``mi_lenses.cli`` checks that the path can be written (a file, or with ``folder`` a
    folder of files) before the command runs."""
    action = parser.add_argument(flag, **kwargs)
    parser.set_defaults(output_paths={**(parser.get_default("output_paths") or {}), action.dest: folder})


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of the command can be written (else a ``LensInputError`` naming the flag and the fix)."""
    for dest, folder in (getattr(args, "output_paths", None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            check_output(value, "--" + dest.replace("_", "-"), folder=folder)


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` whose ``metadata["cli"]`` is not False/None, default and help
    taken from the field, so the command line and the Python API cannot drift. ``metadata["cli"]`` may be a dict of
    ``argparse`` settings (``flag``, ``type``, ``choices``, ``action``, ``help`` for a switch that says it in its own
    words, as ``--no-progress``); otherwise booleans become switches and the type comes from the annotation."""
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli", True)
        if cli is False or cli is None:
            continue
        settings = dict(cli) if isinstance(cli, dict) else {}
        flag = settings.pop("flag", "--" + f.name.replace("_", "-"))
        help_text = settings.pop("help", f.metadata.get("help", ""))  # a switch may say it in its own words
        if f.type in (bool, "bool") and not settings:
            parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_text)
            continue
        if not settings:
            settings["type"] = {"int": int, "float": float, "str": str}.get(
                f.type if isinstance(f.type, str) else f.type.__name__)
        switch = settings.get("action") in ("store_true", "store_false")  # its help says what it does
        shown = "" if f.default is None or switch else f" (default {f.default})"
        parser.add_argument(flag, dest=f.name, default=f.default, help=f"{help_text}{shown}", **settings)


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of ``cls`` from the flags :func:`add_dataclass_options` added."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def load(args: argparse.Namespace, name: str | None = None, device: str | None = None,
         compatibility_mode: bool | str = "auto") -> Any:
    """The model named by ``--model`` (or ``name``) on ``--device`` (or ``device``), as ``load_model`` gives it by
    default; ``compatibility_mode=False`` skips folding the norms (0.6 s for SmolLM2) where a command's numbers do
    not depend on it."""
    return load_model(name if name is not None else args.model, device=device or args.device,
                      compatibility_mode=compatibility_mode)


def streams(args: argparse.Namespace) -> bool:
    """Whether an output path of the command is ``-`` (standard output)."""
    return any(getattr(args, dest, None) == STDOUT for dest in (getattr(args, "output_paths", None) or {}))


def write_output(path: str | None, write: Callable[[str | None], str]) -> None:
    """``write(path)`` (a result's ``to_json`` / ``to_html``, atomic) and a line saying so; with ``path`` ``-`` the
    text ``write(None)`` returns goes to standard output instead."""
    if not path:
        return
    if path == STDOUT:
        sys.__stdout__.write(write(None).rstrip("\n") + "\n")
        sys.__stdout__.flush()
        return
    write(path)
    print(f"wrote {path}")


def write_outputs(args: argparse.Namespace, result: Any, **options: Any) -> None:
    """``result.to_json(--json)`` and ``result.to_html(--html)``, if given (atomically, or to standard output)."""
    write_output(getattr(args, "json", None), lambda p: result.to_json(p, **options))
    write_output(getattr(args, "html", None), lambda p: result.to_html(p, **options))
