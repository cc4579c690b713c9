"""``mi-lenses graph PROMPT``: the attribution graph of a prompt through transcoders, its strongest paths into each
logit in the terminal, the interactive page and circuit-tracer's graph JSON.

Example::

    mi-lenses graph "The capital of France is"                      # the embedded model, its default transcoders
    mi-lenses graph "The capital of France is" --transcoders tc/ --out graph.html --json graph.json

``--json`` writes circuit-tracer's format (``metadata``, ``nodes``, ``links``: its frontend and Neuronpedia open it),
pruned at ``--node-threshold`` / ``--edge-threshold``; ``--out`` (or ``--html``) writes the page.
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, add_output, load, write_output, write_outputs
from mi_lenses.features import load_dictionary
from mi_lenses.graphs import attribution_graph


def register(sub, parents: Parents) -> None:
    g = sub.add_parser("graph", parents=[parents.model, parents.outputs],
                       help="attribution graph of a prompt through transcoders (circuit tracing)")
    g.add_argument("prompt", help="the prompt")
    g.add_argument("--transcoders", default=None,
                   help="transcoder folder, one per block (mi_lenses, circuit-tracer, sparsify layers.N.mlp folders); "
                        "default: the default transcoders of the model (trained and cached on first use)")
    add_output(g, "--out", default=None, help="write the interactive page here (as --html)")
    g.add_argument("--answer", nargs="+", default=None, help="logit nodes: these tokens instead of the most probable")
    g.add_argument("--max-n-logits", type=int, default=10, help="at most this many logit nodes (default 10)")
    g.add_argument("--desired-logit-prob", type=float, default=0.95,
                   help="add logit nodes until their probabilities reach this (default 0.95)")
    g.add_argument("--max-feature-nodes", type=int, default=4096,
                   help="the node budget: features expanded, most influential first (default 4096)")
    g.add_argument("--batch-size", type=int, default=32, help="targets per backward pass (default 32)")
    g.add_argument("--node-threshold", type=float, default=0.8,
                   help="pruning: keep the nodes holding this share of the influence (default 0.8)")
    g.add_argument("--edge-threshold", type=float, default=0.98,
                   help="pruning: keep the edges holding this share of the influence (default 0.98)")
    g.add_argument("--top-k", type=int, default=5, help="paths listed per logit (default 5)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    transcoders = None if args.transcoders is None else load_dictionary(args.transcoders)  # before the model
    t0 = time.perf_counter()
    model = load(args)
    if transcoders is None:
        transcoders = load_dictionary(model=model, progress=args.progress)
    t1 = time.perf_counter()
    g = attribution_graph(model, args.prompt, transcoders, answer=args.answer, max_n_logits=args.max_n_logits,
                          desired_logit_prob=args.desired_logit_prob, max_feature_nodes=args.max_feature_nodes,
                          batch_size=args.batch_size, beyond_context=args.beyond_context, progress=args.progress)
    t2 = time.perf_counter()
    pruned = g.prune(args.node_threshold, args.edge_threshold)
    pruned.print(top_k=args.top_k)
    replacement, completeness = g.scores()
    print(f"{g.layout.n_features} of {g.n_active} active features expanded, {len(pruned.nodes)} nodes kept; "
          f"replacement score {replacement:.3f}, completeness {completeness:.3f}; model and transcoders in "
          f"{t1 - t0:.1f} s, graph in {t2 - t1:.1f} s.")
    write_outputs(args, pruned)
    write_output(args.out, lambda p: pruned.to_html(p))
    return 0
