"""``mi-lenses dla "PROMPT" --answer TOKEN``: direct logit attribution to embeddings, heads, MLPs and neurons.

Example::

    mi-lenses dla "When Mary and John went to the store, John gave a drink to" --answer " Mary" --wrong " John" \\
        --top-k 10 --html dla.html --json dla.json
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.attribution import direct_logit_attribution
from mi_lenses.commands import Parents, load, write_outputs
from mi_lenses.errors import LensInputError


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("dla", parents=[parents.model, parents.outputs],
                       help="direct logit attribution: heads, MLPs, neurons and source positions")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--answer", required=True, help="the token whose logit is attributed (exactly one token; mind "
                   "the leading space)")
    p.add_argument("--wrong", default=None, help="attribute logit[answer] - logit[wrong] instead")
    p.add_argument("--position", type=int, default=-1, help="position attributed (default -1, the last token)")
    p.add_argument("--top-k", type=int, default=10, help="parts, neurons and heads listed (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise LensInputError(f"--top-k must be at least 1, got {args.top_k}.")
    t0 = time.perf_counter()
    model = load(args)
    t1 = time.perf_counter()
    res = direct_logit_attribution(model, args.prompt, answer=args.answer, wrong=args.wrong, position=args.position,
                                   beyond_context=args.beyond_context)
    t2 = time.perf_counter()
    res.print(top_k=args.top_k)
    print(f"model loaded in {t1 - t0:.1f} s, attribution in {t2 - t1:.2f} s; parts verified against the model's "
          f"logits (sum {float(res.total[0]):+.4f}, model {float(res.actual[0]):+.4f}).")
    write_outputs(args, res, top_k=args.top_k)
    return 0
