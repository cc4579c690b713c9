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
from typing import get_args

from mi_lenses.commands import Parents, add_dataclass_options, dataclass_from_args, load, write_outputs
from mi_lenses.errors import LensInputError
from mi_lenses.patching import activation_patching, edge_attribution, faithfulness
from mi_lenses.patching.circuits import Ablation
from mi_lenses.patching.options import ActivationOptions, EdgeOptions


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("patch", parents=[parents.model, parents.outputs],
                       help="activation patching (exact, attribution, EAP-IG) or a circuit of the top edges")
    p.add_argument("clean", help="the clean prompt")
    p.add_argument("corrupted", help="the corrupted prompt (the same number of tokens, or see --position-map)")
    add_dataclass_options(p, ActivationOptions)
    p.add_argument("--edges", type=int, default=None,
                   help="instead: edge attribution (--method attribution or eap_ig; exact means attribution), and the "
                        "circuit of the top N edges with its faithfulness")
    p.add_argument("--ablation", default="resample", choices=get_args(Ablation),
                   help="ablation outside the circuit (default resample)")
    p.add_argument("--top-k", type=int, default=10, help="largest cells listed, or a circuit's edges (default 10)")
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


def options(args: argparse.Namespace) -> ActivationOptions:
    """The flags as the record :func:`~mi_lenses.patching.activation.activation_patching` takes, checked before any
    model is loaded.

    >>> from mi_lenses.cli import _parser
    >>> args = _parser().parse_args(["patch", "a", "b", "--answer", " x", "--mode", "noise", "--position-map", "0:1"])
    >>> opts = options(args)
    >>> opts.mode, opts.position_map, opts.method, opts.progress
    ('noise', [(0, 1)], 'exact', True)
    """
    return dataclass_from_args(ActivationOptions, args, position_map=position_map(args.position_map),
                               beyond_context=args.beyond_context).validate()


def run(args: argparse.Namespace) -> int:
    opts = options(args)
    if args.top_k < 1:
        raise LensInputError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.edges is not None and args.edges < 0:
        raise LensInputError(f"--edges must be at least 0, got {args.edges}.")
    if args.edges is not None and opts.position_map is not None:
        raise LensInputError("--edges compares the runs position by position and takes no --position-map: "
                             "corrupt the prompt without changing its length, or drop --edges for activation "
                             "patching with --position-map.")
    t0 = time.perf_counter()
    model = load(args)
    t1 = time.perf_counter()
    if args.edges is not None:
        return _circuit(model, args, opts, t1 - t0)
    res = activation_patching(model, args.clean, args.corrupted, options=opts)
    res.print(top_k=args.top_k)
    print(f"model loaded in {t1 - t0:.1f} s, {res.method} patching of {res.what} in {res.seconds:.2f} s "
          f"({res.engine}); clean {res.clean_value:+.4f}, corrupted {res.corrupted_value:+.4f}.")
    write_outputs(args, res, top_k=args.top_k)
    return 0


def _circuit(model, args: argparse.Namespace, opts: ActivationOptions, load_seconds: float) -> int:
    """``--edges N``: edge attribution with the shared options, and the circuit of its top ``N`` edges measured."""
    edge_opts = EdgeOptions(answer=opts.answer, wrong=opts.wrong, mode=opts.mode, beyond_context=opts.beyond_context,
                            method=opts.method if opts.method != "exact" else "attribution", ig_steps=opts.ig_steps)
    edges = edge_attribution(model, args.clean, args.corrupted, options=edge_opts)
    res = faithfulness(model, edges.circuit(edges=args.edges), ablation=args.ablation)
    res.print(top_k=args.top_k)
    print(f"model loaded in {load_seconds:.1f} s; {edges.n_edges} edges scored in {edges.seconds:.2f} s; circuit "
          f"of {res.size} edges: faithfulness {res.faithfulness:+.4f} ({res.ablation} ablation).")
    write_outputs(args, res, top_k=args.top_k)
    return 0
