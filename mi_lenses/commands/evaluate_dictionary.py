"""``mi-lenses evaluate-dictionary``: FVU, L0, dead features and the cross-entropy with a dictionary spliced in.

Example::

    mi-lenses evaluate-dictionary --dictionary sae12 --json eval.json     # on the shipped held-out text

The evaluation flags (``--max-tokens``, ``--seq-len``, ``--batch-size``, ``--no-progress``) are the fields of
:class:`~mi_lenses.features.options.DictionaryEvaluationOptions`.
"""

from __future__ import annotations

import argparse

from mi_lenses.commands import Parents, add_dataclass_options, dataclass_from_args, load, write_outputs
from mi_lenses.data import EVAL_TEXT
from mi_lenses.errors import LensInputError
from mi_lenses.features.evaluate import evaluate_dictionary
from mi_lenses.features.options import DictionaryEvaluationOptions


def register(sub, parents: Parents) -> None:
    ev = sub.add_parser("evaluate-dictionary", parents=[parents.model, parents.outputs],
                        help="FVU, L0, dead features and loss recovered of a dictionary on held-out text")
    ev.add_argument("--dictionary", required=True,
                    help="dictionary folder (mi_lenses, SAELens, sparsify hook folder or circuit-tracer)")
    ev.add_argument("--data", default=str(EVAL_TEXT),
                    help="held-out text, same kinds as for train-dictionary (default: the shipped held-out text)")
    add_dataclass_options(ev, DictionaryEvaluationOptions)
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(DictionaryEvaluationOptions, args).validate(flags=True)  # before loading the model
    if options.max_tokens is not None and options.max_tokens < options.seq_len:
        raise LensInputError(f"--max-tokens ({options.max_tokens}) must be at least --seq-len ({options.seq_len}).")
    model = load(args)
    ev = evaluate_dictionary(model, args.dictionary, args.data, options=options)
    ev.print()
    write_outputs(args, ev)
    return 0
