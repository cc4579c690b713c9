"""``mi-lenses evaluate-dictionary``: FVU, L0, dead features and the cross-entropy with a dictionary spliced in.

Example::

    mi-lenses evaluate-dictionary --dictionary sae12 --json eval.json     # on the shipped held-out text
"""

from __future__ import annotations

import argparse

from mi_lenses.commands import Parents, load, write_outputs
from mi_lenses.data import EVAL_TEXT
from mi_lenses.errors import LensInputError
from mi_lenses.features.evaluate import evaluate_dictionary
from mi_lenses.lenses.compare import DEFAULT_MAX_TOKENS


def register(sub, parents: Parents) -> None:
    ev = sub.add_parser("evaluate-dictionary", parents=[parents.model, parents.outputs],
                        help="FVU, L0, dead features and loss recovered of a dictionary on held-out text")
    ev.add_argument("--dictionary", required=True,
                    help="dictionary folder (mi_lenses, SAELens, sparsify hook folder or circuit-tracer)")
    ev.add_argument("--data", default=str(EVAL_TEXT),
                    help="held-out text, same kinds as for train-dictionary (default: the shipped held-out text)")
    ev.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help=f"evaluate on at most N tokens (default {DEFAULT_MAX_TOKENS})")
    ev.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ev.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise LensInputError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len}).")
    model = load(args)
    ev = evaluate_dictionary(model, args.dictionary, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                             batch_size=args.batch_size, progress=not args.no_progress)
    ev.print()
    write_outputs(args, ev)
    return 0
