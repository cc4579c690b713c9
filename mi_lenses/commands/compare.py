"""``mi-lenses compare``: several lenses on the same held-out tokens with the same metrics, one page of curves.

Example::

    mi-lenses compare --data $WIKITEXT/test.txt --max-tokens 2048 --lens smol_lens \\
        --lenses logit,tuned,patchscope,patchscope-q,jacobian,future --fit-data $WIKITEXT/valid.txt \\
        --json compare.json --html compare.html

``--json`` writes ``{"layers": [...], "lenses": {NAME: {"kl_bits": [...], "ce_bits": [...], "prec_at_1": [...],
"surprisal_bits": [...], "mean_rank": [...]}}, "tokens": N, ...}``. ``tuned`` needs ``--lens DIR``; ``jacobian`` and
``future`` load ``--jacobian-lens DIR`` / ``--future-lens DIR`` or are fitted on ``--fit-data`` first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mi_lenses.commands import Parents, add_output, load, write_outputs
from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import load_lens
from mi_lenses.lenses.compare import DEFAULT_MAX_TOKENS, compare_lenses
from mi_lenses.lenses.compare import LENS_NAMES as LENSES
from mi_lenses.lenses.future import fit_future_lens
from mi_lenses.lenses.jacobian import fit_jacobian_lens


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("compare", parents=[parents.model, parents.outputs],
                       help="compare lenses (logit, tuned, Patchscopes, Jacobian, Future) on the same held-out tokens")
    p.add_argument("--data", default=str(EVAL_TEXT),
                   help="held-out text: a file or folder, a cached `datasets` name, or 'model[:N]' (default: the "
                        "held-out text shipped with mi_lenses)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"evaluate on at most N tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--lenses", default=None,
                   help=f"comma list of {', '.join(LENSES)} (default: logit,patchscope,patchscope-q, plus tuned "
                        "with --lens)")
    p.add_argument("--lens", default=None, help="tuned lens folder (either format) for 'tuned'")
    p.add_argument("--jacobian-lens", default=None, help="Jacobian lens folder (JacobianLens.save) for 'jacobian'")
    p.add_argument("--future-lens", default=None, help="Future Lens folder (FutureLens.save) for 'future'")
    p.add_argument("--fit-data", default=str(TRAIN_TEXT),
                   help="text to fit 'jacobian' / 'future' on when no folder is given (default: the shipped training "
                        "text)")
    p.add_argument("--fit-tokens", type=int, default=16384, help="tokens to fit the Future Lens on (default 16384)")
    p.add_argument("--jacobian-prompts", type=int, default=16,
                   help="prompts to fit the Jacobian lens on (default 16; each costs d_model backward passes)")
    p.add_argument("--jacobian-seq-len", type=int, default=64, help="tokens per Jacobian-fit prompt (default 64)")
    p.add_argument("--ahead", type=int, default=1,
                   help="positions beyond the next token that a fitted Future Lens predicts (default 1)")
    p.add_argument("--precision-at", default="1,5,10", help="the k of every precision@k, comma list (default 1,5,10)")
    p.add_argument("--point", choices=("resid_pre", "resid_post"), default="resid_pre",
                   help="rows: block inputs (default) or block outputs (Patchscope layer l is row l_post)")
    add_output(p, "--save-fitted", folder=True, default=None,
               help="save lenses fitted here into this folder (NAME subfolders)")
    p.set_defaults(func=run)


def _names(args: argparse.Namespace) -> list[str]:
    if args.lenses is None:
        return ["logit", *(["tuned"] if args.lens else []), "patchscope", "patchscope-q"]
    names = [n.strip() for n in args.lenses.split(",") if n.strip()]
    bad = [n for n in names if n not in LENSES]
    if bad or not names:
        raise LensInputError(f"--lenses takes a comma list of {', '.join(LENSES)}; got {args.lenses!r}.")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    names = _names(args)
    try:
        precision_at = [int(k) for k in args.precision_at.split(",") if k.strip()]
    except ValueError:
        raise LensInputError(f"--precision-at takes a comma list of ints, got {args.precision_at!r}.") from None
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise LensInputError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len}).")
    if "tuned" in names and not args.lens:
        raise LensInputError("the tuned lens needs --lens DIR (train one with `mi-lenses tuned-lens train`).")
    for name, folder in (("jacobian", args.jacobian_lens), ("future", args.future_lens)):
        if name in names and not folder and not args.fit_data:
            raise LensInputError(f"'{name}' needs --{name}-lens DIR or --fit-data FILE to fit one on.")
    t0 = time.perf_counter()
    model = load(args)
    lenses = {n: n for n in names}
    fitted = {}
    if "tuned" in names:
        lenses["tuned"] = load_lens(args.lens, model)
    for name, folder in (("jacobian", args.jacobian_lens), ("future", args.future_lens)):
        if name not in names:
            continue
        if folder:
            lenses[name] = load_lens(folder, model)
            continue
        t1 = time.perf_counter()
        if name == "jacobian":
            lens = fit_jacobian_lens(model, args.fit_data, max_tokens=args.jacobian_prompts * args.jacobian_seq_len,
                                     seq_len=args.jacobian_seq_len)
        else:
            lens = fit_future_lens(model, args.fit_data, ahead=args.ahead, max_tokens=args.fit_tokens,
                                   seq_len=args.seq_len)
        print(f"fitted the {lens.name} on {args.fit_data} in {time.perf_counter() - t1:.0f} s")
        lenses[name] = fitted[name] = lens
    if args.save_fitted:
        for name, lens in fitted.items():
            print(f"wrote {lens.save(Path(args.save_fitted) / name)}")
    res = compare_lenses(model, args.data, lenses, max_tokens=args.max_tokens, seq_len=args.seq_len,
                         batch_size=args.batch_size, point=args.point, precision_at=precision_at)
    res.print()
    res.print(metric="kl_bits")
    print(f"compared {len(names)} lenses on {res.n_tokens} tokens in {time.perf_counter() - t0:.0f} s "
          f"(per lens: {', '.join(f'{n} {s:.0f} s' for n, s in res.seconds.items())}).")
    write_outputs(args, res)
    return 0
