"""Real result: the Future Lens on the embedded SmolLM2-135M: precision@k per layer and N (Pal et al. 2023).

For N in ``--ahead`` (0 = the next token), a linear Future Lens is fitted on ``--fit-tokens`` tokens of the fit text
(least squares from ``h_l[t]`` to the final residual at ``t + N``) and, for the rows in ``--prompt-rows``, a
learned-prompt Future Lens is trained for ``--prompt-steps`` Adam steps (its untrained start, the paper's fixed
prompt, is evaluated too). All are read by ``compare_lenses`` on ``--max-tokens`` held-out tokens: precision@1/5/10
of the model's own top-1 at ``t + N``, KL and surprisal, per row. Prints the CPU, the command and the wall times;
writes ``--json``.

Usage (repo root)::

    python benchmarks/future_lens.py --fit $WIKITEXT/valid.txt --data $WIKITEXT/test.txt
    python benchmarks/future_lens.py --fit text.txt --data text.txt --fit-tokens 2048 --max-tokens 256   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_logit_lens import describe_cpu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", default=str(REPO / "mi_lenses" / "data" / "shakespeare_train.txt"),
                    help="text to fit the lenses on (default: the shipped training text)")
    ap.add_argument("--data", default=str(REPO / "mi_lenses" / "data" / "shakespeare_eval.txt"),
                    help="held-out text to evaluate on (default: the shipped held-out text)")
    ap.add_argument("--ahead", default="0,1,2", help="N values, comma list (default 0,1,2)")
    ap.add_argument("--fit-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--prompt-rows", default="", help="rows for the learned prompt, comma list (default none)")
    ap.add_argument("--prompt-steps", type=int, default=60)
    ap.add_argument("--prompt-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "future_lens.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import mi_lenses

    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, threads {args.threads}")
    print("command:", " ".join(sys.argv))
    model = mi_lenses.load_model()
    aheads = [int(a) for a in args.ahead.split(",")]
    prompt_rows = [int(r) for r in args.prompt_rows.split(",") if r.strip()]
    out: dict = {"command": " ".join(sys.argv), "fit_tokens": args.fit_tokens, "seconds": {}, "results": {}}
    for n in aheads:
        lenses = {}
        t0 = time.perf_counter()
        lenses[f"linear N={n}"] = mi_lenses.fit_future_lens(model, args.fit, ahead=n, max_tokens=args.fit_tokens)
        out["seconds"][f"fit linear N={n}"] = round(time.perf_counter() - t0, 1)
        lenses[f"identity N={n}"] = mi_lenses.FutureLens.identity(model, ahead=n)  # the logit lens read N further
        if prompt_rows:
            t0 = time.perf_counter()
            lenses[f"learned prompt N={n}"] = mi_lenses.fit_future_prompt(
                model, args.fit, ahead=n, rows=prompt_rows, steps=args.prompt_steps, batch_size=args.prompt_batch,
                max_tokens=args.fit_tokens)
            out["seconds"][f"train prompt N={n}"] = round(time.perf_counter() - t0, 1)
            lenses[f"fixed prompt N={n}"] = mi_lenses.fit_future_prompt(model, args.fit, ahead=n, rows=prompt_rows,
                                                                        steps=0, max_tokens=256)
        t0 = time.perf_counter()
        cmp = mi_lenses.compare_lenses(model, args.data, lenses, max_tokens=args.max_tokens, point="resid_pre",
                                       precision_at=(1, 5, 10))
        out["seconds"][f"evaluate N={n}"] = round(time.perf_counter() - t0, 1)
        out["layers"] = cmp.layers
        out["results"].update(cmp.to_dict()["lenses"])
        print(cmp.to_markdown(metrics=("prec_at_1", "prec_at_10")))
    out["seconds_total"] = round(sum(out["seconds"].values()), 1)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}; seconds: {out['seconds']}")


if __name__ == "__main__":
    main()
