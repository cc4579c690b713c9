"""Real result: the attribute lens (linear relational embeddings, Hernandez et al. 2023) on the embedded SmolLM2-135M.

For each relation the LRE is fitted on the first ``--n-train`` subjects (exact Jacobians of the output state at the
last token w.r.t. the subject's last-token state, per row, ``beta`` on W) and its faithfulness is measured on the
other subjects: the LRE's top-1 token from the subject state equals the LM's own top-1 next token. Also reported: the
accuracy of the LRE and of the LM against the first token of the given object. Prints the CPU, the command and the
wall time; writes ``--json``.

Usage (repo root)::

    python benchmarks/attribute_lens.py                  # beta 2.5, 8 training subjects per relation
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

RELATIONS = {
    "country capital": ("The capital city of {} is", [
        ("France", " Paris"), ("Germany", " Berlin"), ("Italy", " Rome"), ("Spain", " Madrid"),
        ("Japan", " Tokyo"), ("Russia", " Moscow"), ("Egypt", " Cairo"), ("Greece", " Athens"),
        ("Austria", " Vienna"), ("Portugal", " Lisbon"), ("Poland", " Warsaw"), ("Ireland", " Dublin"),
        ("Norway", " Oslo"), ("Kenya", " Nairobi"), ("Peru", " Lima"), ("Thailand", " Bangkok"),
        ("Hungary", " Budapest"), ("Finland", " Helsinki"), ("Cuba", " Havana"), ("Denmark", " Copenhagen")]),
    "country language": ("The official language of {} is", [
        ("France", " French"), ("Germany", " German"), ("Italy", " Italian"), ("Spain", " Spanish"),
        ("Japan", " Japanese"), ("Russia", " Russian"), ("Greece", " Greek"), ("Portugal", " Portuguese"),
        ("Poland", " Polish"), ("China", " Chinese"), ("Brazil", " Portuguese"), ("Mexico", " Spanish"),
        ("Austria", " German"), ("Argentina", " Spanish"), ("Turkey", " Turkish"), ("Sweden", " Swedish"),
        ("Norway", " Norwegian"), ("Finland", " Finnish"), ("Hungary", " Hungarian"), ("Egypt", " Arabic")]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--beta", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "attribute_lens.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import mi_lenses

    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, threads {args.threads}")
    print("command:", " ".join(sys.argv))
    model = mi_lenses.load_model()
    out: dict = {"command": " ".join(sys.argv), "beta": args.beta, "n_train": args.n_train, "relations": {}}
    for name, (template, samples) in RELATIONS.items():
        t0 = time.perf_counter()
        lens = mi_lenses.fit_attribute_lens(model, template, samples, n_train=args.n_train, beta=args.beta)
        fit_s = time.perf_counter() - t0
        ev = mi_lenses.evaluate_attribute_lens(lens, model, samples[args.n_train:])
        ev.print()
        out["relations"][name] = {**ev.to_dict(), "fit_seconds": round(fit_s, 1)}
        best = max(range(len(ev.layers)), key=lambda r: ev.faithfulness[r])
        print(f"{name}: best faithfulness {ev.faithfulness[best]:.2f} at {ev.layers[best]}; LM accuracy "
              f"{ev.lm_accuracy:.2f}; fit {fit_s:.0f} s")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
