"""Regenerate the "Bad input" table (docs/bad_input.md) from the cases of tests/test_bad_input.py: every row is the message
the case printed on the tiny test model, cut at 150 characters (paths of the scratch folder shown as …).

    .venv/bin/python scripts/bad_input_table.py          # rewrites the table in place
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_bad_input as cases  # noqa: E402  (the tests' tables are the source of truth)
from tiny import _Builder, _train_tokenizer  # noqa: E402

from mi_lenses.cli import main  # noqa: E402
from mi_lenses.errors import MiLensesError  # noqa: E402

DOC = ROOT / "docs" / "bad_input.md"
CUT = 150


def _short(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "…").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= CUT else text[:CUT].rstrip() + " …"


def rows() -> list[str]:
    tmp = Path(tempfile.mkdtemp())
    env = cases.Env(_Builder(_train_tokenizer(tmp / "tok")), tmp / "env")
    out = []
    try:
        for name, (call, _) in cases.API.items():
            try:
                call(env)
            except MiLensesError as err:
                out.append(f"| {name} | `{type(err).__name__}`: {_short(str(err), tmp / 'env')} |")
                continue
            raise SystemExit(f"{name}: raised nothing")
        for name, (argv, _) in cases.CLI.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv(env))
            message = err.getvalue().strip().removeprefix("mi-lenses: error: ")
            out.append(f"| {name} | exit {code}: {_short(message, tmp / 'env')} |")
    finally:
        for cleanup in env.cleanups:  # unmount the small full file system
            cleanup()
    return out


if __name__ == "__main__":
    text = DOC.read_text()
    start = text.index("| case | what you get |\n|---|---|\n") + len("| case | what you get |\n|---|---|\n")
    end = re.compile(r"\n(?!\|)").search(text, start).start() + 1
    DOC.write_text(text[:start] + "\n".join(rows()) + "\n" + text[end:])
    print(f"rewrote the bad-input table of {DOC}")
