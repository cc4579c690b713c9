"""The ``mi-lenses`` command line: one subcommand per module in ``mi_lenses.commands``.

Example::

    mi-lenses logit-lens "The capital of France is" --target " Paris" --html lens.html --json lens.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys

import mi_lenses.commands
from mi_lenses.errors import LensInputError, MiLensesError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-lenses", description="Lens-style interpretability for TransformerLens.")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = mi_lenses.commands.parents()
    for info in sorted(pkgutil.iter_modules(mi_lenses.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"mi_lenses.commands.{info.name}").register(sub, shared)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: its output paths are checked before any model work; a deliberate error is one line on
    standard error (status 2), Ctrl-C one line too (status 130; files already written are whole, none is
    half-written). With an output path ``-`` the command's result goes to standard output and everything it
    prints for a person goes to standard error."""
    try:
        args = _parser().parse_args(_decoded(argv if argv is not None else sys.argv[1:]))
        mi_lenses.commands.check_outputs(args)  # before any model work
        with contextlib.redirect_stdout(sys.stderr if mi_lenses.commands.streams(args) else sys.stdout):
            return args.func(args)
    except MiLensesError as err:
        print(f"mi-lenses: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mi-lenses: interrupted (files already written are whole; nothing is half-written)", file=sys.stderr)
        return 130


def one_line(message: str, limit: int = 400) -> str:
    """``message`` on one line, at most ``limit`` characters (a long value quoted in it is cut in the middle)."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    return text[: limit - 40] + " … " + text[-37:]


def _decoded(argv: list[str]) -> list[str]:
    """The arguments as text: bytes the locale cannot decode (Python keeps them as lone surrogates) are refused by
    name, before any model work."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = arg[err.start : err.end].encode("utf-8", "surrogateescape")
            raise LensInputError(f"argument {i + 1} holds bytes that are not UTF-8 ({bad!r} at character "
                                 f"{err.start}): pass text in UTF-8 (e.g. iconv -t utf-8), or fix the file it was "
                                 "read from.") from None
    return argv


def entry() -> None:
    """The ``mi-lenses`` console script: :func:`main`, then exit at once. Every output is complete by then (files are
    written atomically and closed, the streams flushed here); skipping the interpreter's teardown of torch,
    transformers and TransformerLens saves about 0.5 s per command."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (``mi-lenses ... | head``): nothing left to say
        pass
    os._exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
