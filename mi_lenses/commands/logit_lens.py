"""``mi-lenses logit-lens "PROMPT"``: decode every layer's residual stream of a prompt.

Example::

    mi-lenses logit-lens "The capital of France is" --target " Paris" --html lens.html --json lens.json
    mi-lenses logit-lens "The capital of France is" --lens smol_lens     # decode through a tuned lens
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, load, write_outputs
from mi_lenses.errors import LensInputError


def register(sub, parents: Parents) -> None:
    ll = sub.add_parser("logit-lens", parents=[parents.model, parents.outputs],
                        help="decode every layer's residual stream of a prompt")
    ll.add_argument("prompt", help="the prompt text")
    ll.add_argument("--top-k", type=int, default=5, help="tokens kept per layer and position (default 5)")
    ll.add_argument("--target", action="append", default=None,
                    help="a token (exactly one, mind the leading space) whose rank is tracked; repeatable")
    ll.add_argument("--point", default="resid_pre", choices=["resid_pre", "resid_mid", "resid_post"])
    ll.add_argument("--value", default="prob", choices=["prob", "rank"], help="what the table cells show")
    ll.add_argument("--lens", default=None,
                    help="a tuned-lens folder (mi_lenses or tuned-lens format) to decode through instead of the "
                         "logit lens")
    ll.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mi_lenses.lenses.logit_lens import logit_lens
    from mi_lenses.lenses.tuned.lens import tuned_lens

    if args.top_k < 1:
        raise LensInputError(f"--top-k must be at least 1, got {args.top_k}.")
    t0 = time.perf_counter()
    # the logit lens decodes through the model's own final norm, so raw and folded weights give the same numbers;
    # a tuned lens was trained on one residual basis: keep the default (compatibility mode) for it
    model = load(args, compatibility_mode=bool(args.lens))
    t1 = time.perf_counter()
    if args.lens:
        res = tuned_lens(model, args.prompt, lens=args.lens, top_k=args.top_k, targets=args.target, point=args.point)
    else:
        res = logit_lens(model, args.prompt, top_k=args.top_k, targets=args.target, point=args.point)
    t2 = time.perf_counter()
    res.print(value=args.value)
    print(f"model loaded in {t1 - t0:.1f} s, lens in {t2 - t1:.2f} s; final row verified against the model's logits.")
    write_outputs(args, res)
    return 0
