"""One module per ``mi-lenses`` subcommand.

Each module defines ``register(sub)``: it adds its subparser to ``sub`` (an ``argparse`` subparsers object) and sets
``func=run`` on it, where ``run(args) -> int`` does the work. ``mi_lenses.cli`` discovers the modules in this package,
so adding a command never touches another command's file. Errors derived from ``mi_lenses.errors.MiLensesError`` are
printed as one line and exit with status 2.
"""
