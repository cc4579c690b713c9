"""``mi-lenses logit-lens "PROMPT"``: decode every layer's residual stream of a prompt.

Example::

    mi-lenses logit-lens "The capital of France is" --target " Paris" --html lens.html --json lens.json
    mi-lenses logit-lens "The capital of France is" --lens smol_lens     # decode through a tuned lens

The lens flags (``--top-k``, ``--target``, ``--point``, ``--dtype``) are the fields of
:class:`~mi_lenses.lenses.options.LensOptions`.
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, add_dataclass_options, dataclass_from_args, load, write_outputs
from mi_lenses.lenses.logit_lens import logit_lens
from mi_lenses.lenses.options import LensOptions
from mi_lenses.lenses.tuned.lens import tuned_lens


def register(sub, parents: Parents) -> None:
    ll = sub.add_parser("logit-lens", parents=[parents.model, parents.outputs],
                        help="decode every layer's residual stream of a prompt")
    ll.add_argument("prompt", help="the prompt text")
    add_dataclass_options(ll, LensOptions)
    ll.add_argument("--value", default="prob", choices=["prob", "rank"], help="what the table cells show")
    ll.add_argument("--lens", default=None,
                    help="a tuned-lens folder (mi_lenses or tuned-lens format) to decode through instead of the "
                         "logit lens")
    ll.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(LensOptions, args).validate(flags=True)  # before loading the model
    t0 = time.perf_counter()
    # the logit lens decodes through the model's own final norm, so raw and folded weights give the same numbers;
    # a tuned lens was trained on one residual basis: keep load_model's default for it
    model = load(args, compatibility_mode="auto" if args.lens else False)
    t1 = time.perf_counter()
    if args.lens:
        res = tuned_lens(model, args.prompt, lens=args.lens, options=options)
    else:
        res = logit_lens(model, args.prompt, options=options)
    t2 = time.perf_counter()
    res.print(value=args.value)
    print(f"model loaded in {t1 - t0:.1f} s, lens in {t2 - t1:.2f} s; final row verified against the model's logits.")
    write_outputs(args, res)
    return 0
