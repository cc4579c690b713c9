"""``mi-lenses tuned-lens train|eval``: train a tuned lens on a corpus, evaluate it against the logit lens.

Example::

    mi-lenses tuned-lens train --out smol_lens                 # on the shipped public-domain text (--data for yours)
    mi-lenses tuned-lens eval --lens smol_lens --json eval.json  # on the shipped held-out text
    torchrun --nproc_per_node=2 -m mi_lenses.cli tuned-lens train --data corpus/ --out lens   # data parallel
"""

from __future__ import annotations

import argparse
import os
import time

from mi_lenses.commands import (
    Parents,
    add_dataclass_options,
    add_output,
    dataclass_from_args,
    load,
    write_outputs,
)
from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import load_lens
from mi_lenses.lenses.compare import DEFAULT_MAX_TOKENS
from mi_lenses.lenses.tuned.evaluate import evaluate_lens
from mi_lenses.lenses.tuned.train import TrainConfig, train_lens


def register(sub, parents: Parents) -> None:
    tl = sub.add_parser("tuned-lens", help="train or evaluate a tuned lens")
    tsub = tl.add_subparsers(dest="tuned_command", required=True)

    tr = tsub.add_parser("train", parents=[parents.model],
                         help="train a tuned lens (KL to the model's output, paper recipe)")
    tr.add_argument("--data", default=str(TRAIN_TEXT),
                    help="text file or folder, a cached `datasets` name NAME[:CONFIG][@SPLIT], or 'model[:N]' to "
                         "sample N tokens from the model (default: the public-domain text shipped with mi_lenses)")
    add_output(tr, "--out", folder=True, required=True,
               help="output folder (the lens; checkpoints in OUT/checkpoint)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_dataclass_options(tr, TrainConfig)
    tr.set_defaults(func=run_train)

    ev = tsub.add_parser("eval", parents=[parents.model, parents.outputs],
                         help="per-layer KL / CE / entropy of a tuned lens and the logit lens")
    ev.add_argument("--lens", required=True, help="lens folder (mi_lenses or tuned-lens format)")
    ev.add_argument("--data", default=str(EVAL_TEXT),
                    help="held-out text, same kinds as for train (default: the shipped held-out text)")
    ev.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help=f"evaluate on at most N tokens (default {DEFAULT_MAX_TOKENS})")
    ev.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ev.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(TrainConfig, args)
    cfg.validate()
    t0 = time.perf_counter()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = load(args, device=device)
    lens = train_lens(model, args.data, out=args.out, config=cfg, resume=args.resume)
    info = lens.meta["training"]
    print(
        f"trained in {time.perf_counter() - t0:.0f} s (warm start {info['warm_start_s']:.0f} s on "
        f"{info['warm_start_tokens']} tokens, {info['steps']} KL steps, {info['tokens_per_s'] or 0:.0f} tokens/s); "
        f"wrote {args.out}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise LensInputError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len}).")
    model = load(args)
    lens = load_lens(args.lens, model)
    ev = evaluate_lens(lens, model, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len)
    ev.print()
    write_outputs(args, ev)
    return 0
