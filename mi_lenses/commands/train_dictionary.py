"""``mi-lenses train-dictionary``: train TopK SAEs or transcoders on a corpus, streamed from the model.

Example::

    mi-lenses train-dictionary --layers 12 --n-features 1024 --k 16 --max-tokens 8192 --out sae12
    mi-lenses train-dictionary --kind transcoder --layers 3 4 --data corpus/ --out tc      # tc/layer_3, tc/layer_4
    torchrun --nproc_per_node=2 -m mi_lenses.cli train-dictionary --layers 12 --out sae12  # data parallel
"""

from __future__ import annotations

import argparse
import os
import time

from mi_lenses.commands import Parents, add_dataclass_options, add_output, dataclass_from_args, load
from mi_lenses.data import TRAIN_TEXT
from mi_lenses.features.train import DictionaryTrainConfig, train_dictionary


def register(sub, parents: Parents) -> None:
    tr = sub.add_parser("train-dictionary", parents=[parents.model],
                        help="train TopK SAEs or transcoders (AuxK loss, sparsify's recipe)")
    tr.add_argument("--data", default=str(TRAIN_TEXT),
                    help="text file or folder, a cached `datasets` name NAME[:CONFIG][@SPLIT], or 'model[:N]' "
                         "(default: the public-domain text shipped with mi_lenses)")
    add_output(tr, "--out", folder=True, required=True,
               help="output folder (one layer: the dictionary; several: OUT/layer_N; checkpoints in OUT/checkpoint)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_dataclass_options(tr, DictionaryTrainConfig)
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DictionaryTrainConfig, args)
    cfg.validate()
    t0 = time.perf_counter()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = load(args, device=device)
    result = train_dictionary(model, args.data, out=args.out, config=cfg, resume=args.resume)
    ds = getattr(result, "dictionaries", [result])
    info = ds[0].meta["training"]
    fvu = ", ".join(f"layer {d.meta['training']['layer']} {d.meta['training']['final_fvu'] or float('nan'):.3f}"
                    for d in ds)
    print(f"trained {len(ds)} {cfg.kind}(s) in {time.perf_counter() - t0:.0f} s ({info['steps']} steps, "
          f"{info['train_tokens']} tokens; last-step FVU {fvu}); wrote {args.out}")
    return 0
