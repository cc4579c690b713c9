"""``mi-lenses tuned-lens train|eval``: train a tuned lens on a corpus, evaluate it against the logit lens.

Example::

    mi-lenses tuned-lens train --data ../shared/data/wikitext-2/valid.txt --out smol_lens
    mi-lenses tuned-lens eval --lens smol_lens --data ../shared/data/wikitext-2/test.txt --json eval.json
    torchrun --nproc_per_node=2 -m mi_lenses.cli tuned-lens train --data corpus/ --out lens   # data parallel
"""

from __future__ import annotations

import argparse
import os
import time

from mi_lenses.commands import write_outputs
from mi_lenses.errors import LensInputError


def register(sub) -> None:
    from mi_lenses.lenses.tuned.train import TrainConfig

    d = TrainConfig()
    tl = sub.add_parser("tuned-lens", help="train or evaluate a tuned lens")
    tsub = tl.add_subparsers(dest="tuned_command", required=True)

    tr = tsub.add_parser("train", help="train a tuned lens (KL to the model's output, paper recipe)")
    tr.add_argument("--model", default=None, help="GGUF file, HF folder or hub name (default: embedded SmolLM2)")
    tr.add_argument("--data", required=True,
                    help="text file or folder, a cached `datasets` name NAME[:CONFIG][@SPLIT], or 'model[:N]' to "
                         "sample N tokens from the model")
    tr.add_argument("--out", required=True, help="output folder (the lens; checkpoints in OUT/checkpoint)")
    tr.add_argument("--steps", type=int, default=d.steps, help=f"KL steps (default {d.steps})")
    tr.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step,
                    help=f"tokens per optimizer step, over all processes (default {d.tokens_per_step})")
    tr.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    tr.add_argument("--micro-batch", type=int, default=d.micro_batch,
                    help=f"sequences per forward pass; gradients accumulate over the rest (default {d.micro_batch})")
    tr.add_argument("--lr", type=float, default=d.lr, help=f"effective learning rate (default {d.lr})")
    tr.add_argument("--warm-start-tokens", type=int, default=d.warm_start_tokens,
                    help=f"tokens for the least-squares warm start; 0 = start at the logit lens "
                         f"(default {d.warm_start_tokens})")
    tr.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint every N steps (0 = never; default 10)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tr.add_argument("--bf16", action="store_true",
                    help="bf16 unembedding matmuls: only for GPUs/CPUs with fast bf16 (20-30x slower on AVX2)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu")
    tr.set_defaults(func=run_train)

    ev = tsub.add_parser("eval", help="per-layer KL / CE / entropy of a tuned lens and the logit lens")
    ev.add_argument("--lens", required=True, help="lens folder (mi_lenses or tuned-lens format)")
    ev.add_argument("--model", default=None, help="GGUF file, HF folder or hub name (default: embedded SmolLM2)")
    ev.add_argument("--data", required=True, help="held-out text (same kinds as for train)")
    ev.add_argument("--max-tokens", type=int, default=16384, help="evaluate on at most N tokens (default 16384)")
    ev.add_argument("--seq-len", type=int, default=128)
    ev.add_argument("--json", default=None, help="write the per-layer statistics as JSON here")
    ev.add_argument("--html", default=None, help="write a standalone offline page with the curves here")
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from mi_lenses.lenses.tuned.train import TrainConfig, train_lens
    from mi_lenses.models.loading import load_model

    cfg = TrainConfig(
        steps=args.steps, tokens_per_step=args.tokens_per_step, seq_len=args.seq_len, micro_batch=args.micro_batch,
        lr=args.lr, warm_start_tokens=args.warm_start_tokens, checkpoint_every=args.checkpoint_every,
        bf16=args.bf16, seed=args.seed,
    )
    cfg.validate()
    t0 = time.perf_counter()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = load_model(args.model, device=device)
    lens = train_lens(model, args.data, out=args.out, config=cfg, resume=args.resume)
    info = lens.meta["training"]
    print(
        f"trained in {time.perf_counter() - t0:.0f} s (warm start {info['warm_start_s']:.0f} s on "
        f"{info['warm_start_tokens']} tokens, {info['steps']} KL steps, {info['tokens_per_s'] or 0:.0f} tokens/s); "
        f"wrote {args.out}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from mi_lenses.lenses.tuned.evaluate import evaluate_lens
    from mi_lenses.lenses.tuned.io import load_lens
    from mi_lenses.models.loading import load_model

    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise LensInputError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len}).")
    model = load_model(args.model, device=args.device)
    lens = load_lens(args.lens, model)
    ev = evaluate_lens(lens, model, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len)
    print(ev.table())
    write_outputs(args, ev)
    return 0
