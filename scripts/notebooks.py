"""Execute every tutorial (``tutorials/NN_*.py``) in a fresh Jupyter kernel on the embedded SmolLM2 and save it with
its outputs as ``tutorials/NN_*.ipynb`` (paired with the source by jupytext; see ``tests/notebooks.py``). A tutorial
without the install cell gets it first (``tests/notebooks.py``'s ``INSTALL_CELL``).

    .venv/bin/python scripts/notebooks.py            # every tutorial
    .venv/bin/python scripts/notebooks.py 07 02      # those whose name starts so
    .venv/bin/python scripts/notebooks.py --check    # execute, compare with the saved notebooks, write nothing
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import notebooks  # noqa: E402  (the tests' notebook tooling)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="tutorials whose file name starts with one of these (default: all)")
    ap.add_argument("--check", action="store_true", help="compare with the saved notebooks instead of writing")
    args = ap.parse_args(argv)
    chosen = [py for py in notebooks.tutorials() if not args.names or py.name.startswith(tuple(args.names))]
    if not chosen:
        ap.error(f"no tutorial matches {args.names}")
    stale = []
    for py in chosen:
        if not args.check and notebooks.add_install_cell(py):
            print(f"{py.name}: added the install cell")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="mi-lenses-tutorial-") as cwd:
            nb = notebooks.execute(py, cwd=Path(cwd))
        ipynb = py.with_suffix(".ipynb")
        text = f"{time.monotonic() - start:.0f} s, {notebooks.views(nb)} views, {notebooks.bundles(nb)} bundle(s)"
        if args.check:
            import nbformat  # the docs extra

            same = ipynb.is_file() and notebooks.structure(nbformat.read(ipynb, 4)) == notebooks.structure(nb)
            stale += [] if same else [ipynb.name]
            print(f"{ipynb.name}: {'matches' if same else 'STALE'} ({text})")
        else:
            notebooks.write(nb, ipynb)
            print(f"{ipynb.name}: {ipynb.stat().st_size / 1e6:.2f} MB ({text})")
    if stale:
        print("regenerate with: bash scripts/notebooks.sh " + " ".join(s[:2] for s in stale))
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
