"""One module per ``mi-lenses`` subcommand.

Each module defines ``register(sub)``: it adds its subparser to ``sub`` (an ``argparse`` subparsers object) and sets
``func=run`` on it, where ``run(args) -> int`` does the work. ``mi_lenses.cli`` discovers the modules in this package,
so adding a command never touches another command's file. Errors derived from ``mi_lenses.errors.MiLensesError`` are
printed as one line and exit with status 2.
"""

from typing import Any


def write_outputs(args: Any, result: Any, **kwargs: Any) -> None:
    """Write ``result.to_dict(**kwargs)`` to ``--json`` and ``result.to_html(path, **kwargs)`` to ``--html``, if given."""
    import json

    from mi_lenses.atomic import write_atomic

    if getattr(args, "json", None):
        write_atomic(args.json, json.dumps(result.to_dict(**kwargs), indent=1))
        print(f"wrote {args.json}")
    if getattr(args, "html", None):
        result.to_html(args.html, **kwargs)
        print(f"wrote {args.html}")
