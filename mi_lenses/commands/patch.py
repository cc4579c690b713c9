"""``mi-lenses patch CLEAN CORRUPTED --answer TOKEN``: activation patching (exact, attribution or EAP-IG) between a
clean and a corrupted prompt, or with ``--edges N`` edge attribution and a circuit of the top ``N`` edges with its
faithfulness.

Example::

    mi-lenses patch "When Mary and John went to the store, John gave a drink to" \\
        "When John and Mary went to the store, Mary gave a drink to" --answer " Mary" --wrong " John" \\
        --what head_out --method exact --html ioi_heads.html --json ioi_heads.json
    mi-lenses patch "..." "..." --answer " Mary" --wrong " John" --edges 40 --html circuit.html
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, load, write_outputs
from mi_lenses.errors import LensInputError
from mi_lenses.patching import activation_patching, edge_attribution, faithfulness
from mi_lenses.patching.sites import BYS, WHATS


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("patch", parents=[parents.model, parents.outputs],
                       help="activation patching (exact, attribution, EAP-IG) or a circuit of the top edges")
    p.add_argument("clean", help="the clean prompt")
    p.add_argument("corrupted", help="the corrupted prompt (the same number of tokens, or see --position-map)")
    p.add_argument("--position-map", default=None, metavar="C:K,...",
                   help="prompts of different lengths: the clean positions and the corrupted positions they "
                        "correspond to, e.g. '0:0,5:6,-1:-1' (the last positions at least)")
    p.add_argument("--answer", required=True, help="the metric's answer token (exactly one token; mind the space)")
    p.add_argument("--wrong", default=None, help="the metric is the normalised logit[answer] - logit[wrong]")
    p.add_argument("--what", default="resid_pre", help=f"the activation patched: {', '.join(WHATS)} (default "
                   "resid_pre)")
    p.add_argument("--by", default=None, help=f"the grid after the layer: {', '.join(BYS)} (default per --what)")
    p.add_argument("--method", default="exact", help="exact (default), attribution or eap_ig")
    p.add_argument("--ig-steps", type=int, default=None, help="integration steps of eap_ig (default 16)")
    p.add_argument("--direction", default="denoise", help="denoise (clean into corrupted; default) or noise")
    p.add_argument("--edges", type=int, default=None,
                   help="instead: edge attribution, and the circuit of the top N edges with its faithfulness")
    p.add_argument("--ablation", default="resample", help="ablation outside the circuit: resample, zero or mean")
    p.add_argument("--top-k", type=int, default=10, help="largest cells listed, or a circuit's edges (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def position_map(text: str | None) -> list[tuple[int, int]] | None:
    """``--position-map "0:0,5:6"`` as the ``[(clean, corrupted), ...]`` pairs of ``activation_patching``.

    >>> position_map("0:0, 5:6,-1:-1")
    [(0, 0), (5, 6), (-1, -1)]
    """
    if text is None:
        return None
    try:
        return [(int(c), int(k)) for c, k in (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError:
        raise LensInputError(f"--position-map takes clean:corrupted pairs of ints separated by commas, e.g. "
                             f"'0:0,5:6,-1:-1'; got {text!r}.") from None


def run(args: argparse.Namespace) -> int:
    pairs = position_map(args.position_map)
    if args.top_k < 1:
        raise LensInputError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.edges is not None and args.edges < 0:
        raise LensInputError(f"--edges must be at least 0, got {args.edges}.")
    t0 = time.perf_counter()
    model = load(args)
    t1 = time.perf_counter()
    if args.edges is not None:
        if pairs is not None:
            raise LensInputError("--edges compares the runs position by position and takes no --position-map: "
                                 "corrupt the prompt without changing its length, or drop --edges for activation "
                                 "patching with --position-map.")
        method = args.method if args.method != "exact" else "attribution"
        edges = edge_attribution(model, args.clean, args.corrupted, answer=args.answer, wrong=args.wrong,
                                 method=method, ig_steps=args.ig_steps, direction=args.direction)
        res = faithfulness(model, edges.circuit(edges=args.edges), ablation=args.ablation)
        res.print(top_k=args.top_k)
        print(f"model loaded in {t1 - t0:.1f} s; {edges.n_edges} edges scored in {edges.seconds:.2f} s; circuit of "
              f"{res.size} edges: faithfulness {res.faithfulness:+.4f} ({res.ablation} ablation).")
        write_outputs(args, res, top_k=args.top_k)
        return 0
    res = activation_patching(model, args.clean, args.corrupted, answer=args.answer, wrong=args.wrong,
                              what=args.what, by=args.by, method=args.method, ig_steps=args.ig_steps,
                              position_map=pairs,
                              direction=args.direction, beyond_context=args.beyond_context,
                              progress=not args.no_progress)
    res.print(top_k=args.top_k)
    print(f"model loaded in {t1 - t0:.1f} s, {res.method} patching of {res.what} in {res.seconds:.2f} s "
          f"({res.engine}); clean {res.clean_value:+.4f}, corrupted {res.corrupted_value:+.4f}.")
    write_outputs(args, res, top_k=args.top_k)
    return 0
