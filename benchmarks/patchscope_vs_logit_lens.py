"""Real result: next-token precision@1 per layer, identity Patchscope vs the logit lens (Ghandeharioun et al. 2024,
Fig. 2), on the embedded SmolLM2-135M and held-out WikiText-2 test text.

For every source position ``i`` of ``--seqs`` x ``--seq-len`` WikiText tokens and every layer ``l`` (output of block
``l``):

* **identity Patchscope**: the state is patched at ``l* = l`` into the final ``?`` of
  ``"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?"``; hit when the target's top-1 next token equals the model's own
  top-1 prediction at ``i``. Surprisal: ``-log2`` of the target's probability of that token.
* **logit lens**: ``mi_lenses.logit_lens(..., point="resid_post")`` on the same tokens; hit when the lens's top-1 at row
  ``"{l}_post"`` (``"final"`` for the last block) equals the model's top-1 (``final_top1_rank == 0``). Surprisal from
  ``ModelView.decode`` of the same states.

Usage (repo root)::

    python benchmarks/patchscope_vs_logit_lens.py                 # 8 x 48 tokens (384 positions)
    python benchmarks/patchscope_vs_logit_lens.py --seqs 2 --seq-len 32   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def wikitext_tokens(view, path: Path, seqs: int, seq_len: int, skip: int = 0):
    import torch

    text = path.read_text()
    lines = [t.strip() for t in text.splitlines() if len(t.split()) > 30 and not t.strip().startswith("=")]
    out = []
    for line in lines[skip:]:
        ids = view.to_tokens(line)[0]
        if ids.shape[0] >= seq_len:
            out.append(ids[:seq_len])
        if len(out) == seqs:
            break
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--data", default=str(REPO / "mi_lenses" / "data" / "shakespeare_eval.txt"))
    ap.add_argument("--lens", default=None, help="a trained tuned lens (folder) to add as a third column")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "patchscope_vs_logit_lens.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import mi_lenses
    from mi_lenses.patchscopes import presets, sweep
    from mi_lenses.atomic import write_atomic

    model = mi_lenses.load_model()
    view = mi_lenses.ModelView(model)
    L = view.n_layers
    tokens = wikitext_tokens(view, Path(args.data), args.seqs, args.seq_len)
    B, S = tokens.shape
    threads = torch.get_num_threads()
    c0, t0 = time.process_time(), time.perf_counter()

    sw = sweep(model, tokens, presets.identity(), target_layers="same", progress=True, chunk=256)
    t_ps = time.perf_counter() - t0

    t1 = time.perf_counter()
    lens = mi_lenses.logit_lens(model, tokens, point="resid_post", top_k=1)
    names = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        top1 = logits.argmax(-1)  # the model's own prediction
        lens_surprisal = []
        for l in range(L):
            lp = view.decode(cache[names[l]]).log_softmax(-1)
            lens_surprisal.append(-lp.gather(-1, top1[..., None])[..., 0].mean().item() / math.log(2))
    t_ll = time.perf_counter() - t1
    tuned_prec = tuned_surprisal = None
    if args.lens:
        from mi_lenses import load_lens

        tuned = load_lens(args.lens, model)
        rows = {r.hook_name: r for r in view.residual_rows("resid_post")}  # block l's output -> lens index l + 1
        tuned_prec, tuned_surprisal = [], []
        with torch.no_grad():
            for l in range(L):
                h = cache[names[l]].reshape(B * S, -1)
                lp = view.decode(tuned.transform(h, rows[names[l]])).log_softmax(-1).view(B, S, -1)
                tuned_prec.append(float((lp.argmax(-1) == top1).float().mean()))
                tuned_surprisal.append(-lp.gather(-1, top1[..., None])[..., 0].mean().item() / math.log(2))
    cpu = time.process_time() - c0
    wall = time.perf_counter() - t0

    labels = lens.labels  # embed, 0_post .. 28_post, final
    lens_prec = [float((lens.final_top1_rank[labels.index(f"{l}_post" if l < L - 1 else "final")] == 0)
                       .float().mean()) for l in range(L)]
    ps_prec = sw.per_layer().tolist()
    ps_surp = sw.surprisal_bits_mean[:, 0].tolist()
    assert torch.equal(torch.tensor([p for _, p in sw.positions]).view(B, S)[0], torch.arange(S))

    print(f"\nSmolLM2-135M, WikiText-2 test, {B} x {S} = {B * S} source positions; layer l = output of block l")
    print(f"{'layer':>5} | {'Patchscope prec@1':>17} | {'logit lens prec@1':>17} | {'PS surprisal':>12} | "
          f"{'LL surprisal':>12}")
    for l in range(L):
        print(f"{l:>5} | {ps_prec[l]:>17.3f} | {lens_prec[l]:>17.3f} | {ps_surp[l]:>12.2f} | "
              f"{lens_surprisal[l]:>12.2f}"
              + (f" | tuned lens {tuned_prec[l]:.3f} / {tuned_surprisal[l]:.2f} bits" if tuned_prec else ""))
    util = cpu / (wall * threads)
    print(f"\nPatchscope sweep {t_ps:.1f} s ({L * B * S} patched rows), logit lens + decode {t_ll:.1f} s; "
          f"CPU utilisation {util:.2f} ({threads} threads); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    out = {
        "model": view.name, "data": os.path.relpath(args.data, REPO), "seqs": B, "seq_len": S,
        "positions": B * S, "layers": list(range(L)),
        "patchscope_prec_at_1": ps_prec, "logit_lens_prec_at_1": lens_prec,
        "patchscope_surprisal_bits": ps_surp, "logit_lens_surprisal_bits": lens_surprisal,
        "tuned_lens_prec_at_1": tuned_prec, "tuned_lens_surprisal_bits": tuned_surprisal,
        "tuned_lens": os.path.basename(os.path.normpath(args.lens)) if args.lens else None,
        "seconds": {"patchscope_sweep": t_ps, "logit_lens": t_ll}, "cpu_util": util, "threads": threads,
        "command": "python benchmarks/patchscope_vs_logit_lens.py " + " ".join(sys.argv[1:]),
    }
    write_atomic(args.json, json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
