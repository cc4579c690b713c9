"""``mi-lenses patchscope``: patch a hidden state of a source prompt into a target prompt and read/generate.

Example::

    mi-lenses patchscope --source-prompt "Diana, Princess of Wales" --source-layer 12 --target description \\
        --max-new-tokens 12 --json ps.json --html ps.html
    mi-lenses patchscope --source-prompt "The Eiffel Tower is in Paris" --source-layer all --sweep --json sweep.json

``--json`` writes ``{"source_token", "generated", "top_tokens", ...}``; with ``--sweep``
``{"source_layers", "target_layers", "prec_at_1"[l][l2], "surprisal"[l][l2], ...}`` (surprisal in bits, means over
the source positions; ``null`` where a pair was not run).
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, load, write_outputs
from mi_lenses.errors import LensInputError
from mi_lenses.patchscopes import AffineMap, Source, Target, patchscope, presets, sweep

PRESET_NAMES = ("identity", "identity_q", "description", "attribute", "multi_hop", "future_lens", "selfie")


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("patchscope", parents=[parents.model, parents.outputs],
                       help="patch a hidden state into a target prompt (Patchscopes) and read it out")
    p.add_argument("--source-prompt", required=True, help="the source prompt S")
    p.add_argument("--source-layer", default=None,
                   help="source layer l (output of block l; negative from the end). With --sweep: 'all' (default), "
                        "one layer or a comma list")
    p.add_argument("--source-position", type=int, default=None,
                   help="source position i (default: the last token; with --sweep: every position)")
    p.add_argument("--target", default="identity",
                   help=f"a preset ({', '.join(PRESET_NAMES)}) or a target prompt with a placeholder "
                        f"(see --placeholder); default identity")
    p.add_argument("--placeholder", default="?", help="placeholder of a custom target prompt (default '?')")
    p.add_argument("--target-layer", default=None,
                   help="target layer l* (default: l). With --sweep: 'all' (default), 'same' or a comma list")
    p.add_argument("--target-position", type=int, default=None, help="target position i* (default: the placeholder)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: the preset's suggestion; 0 = next-token readout only)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--patch-every-step", action="store_true",
                   help="also patch every generated token (default: prompt only)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="every (l, l*) pair over the source positions: heat maps")
    p.add_argument("--target-model", default=None, help="target model M* (default: the source model)")
    p.add_argument("--map", default=None, help="affine map f (.safetensors from AffineMap.save) for M -> M*")
    p.set_defaults(func=run)


def _layers(text: str | None, what: str, allow_same: bool = False):
    """'all' -> None, 'same' -> 'same', '3' or '0,5,-1' -> [ints]."""
    if text is None or text == "all":
        return None
    if allow_same and text == "same":
        return "same"
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LensInputError(
            f"{what} must be an int, a comma list of ints or 'all'{' or same' if allow_same else ''}, got {text!r}."
        ) from None


def _target(args):

    if args.target in presets.PRESETS:
        tgt = presets.PRESETS[args.target]()
    elif args.target.strip() == "":
        raise LensInputError("--target is empty: name a preset or give a prompt with a placeholder.")
    else:
        tgt = Target(args.target, placeholder=args.placeholder, name="custom")
    changes = {}
    if args.target_position is not None:
        changes["positions"] = args.target_position
    return tgt.replace(**changes) if changes else tgt


def run(args: argparse.Namespace) -> int:

    if args.top_k < 1:
        raise LensInputError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise LensInputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}.")
    if not args.sweep and args.source_layer is None:
        raise LensInputError("--source-layer is required (an int; negative counts from the end).")
    target = _target(args)
    t0 = time.perf_counter()
    model = load(args)
    changes = {}
    if args.target_model:
        changes["model"] = load(args, args.target_model)
    if args.map:
        changes["map"] = AffineMap.load(args.map)
    target = target.replace(**changes) if changes else target
    t1 = time.perf_counter()

    if args.sweep:
        res = sweep(model, args.source_prompt, target, source_layers=_layers(args.source_layer, "--source-layer"),
                    target_layers=_layers(args.target_layer, "--target-layer", allow_same=True),
                    positions=None if args.source_position is None else [args.source_position])
        res.print()
    else:
        layers = _layers(args.source_layer, "--source-layer")
        if layers is None or len(layers) != 1:
            raise LensInputError("--source-layer takes one layer without --sweep.")
        tl = _layers(args.target_layer, "--target-layer")
        if tl is not None:
            if len(tl) != 1:
                raise LensInputError("--target-layer takes one layer without --sweep.")
            target = target.replace(layer=tl[0])
        pos = -1 if args.source_position is None else args.source_position
        res = patchscope(model, Source(args.source_prompt, layers=layers[0], position=pos), target, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, seed=args.seed,
                         patch_every_step=args.patch_every_step)
        res.print()
    t2 = time.perf_counter()
    print(f"model(s) loaded in {t1 - t0:.1f} s, patchscope in {t2 - t1:.2f} s.")
    write_outputs(args, res)
    return 0
