"""A/B benchmark of two revisions of mi_lenses on the same machine, in one run: did a change slow anything down?

Each revision is checked out into a temporary ``git worktree`` and imported in its own subprocess; the two run the same
workloads on the embedded SmolLM2 and the same tokens, interleaved (A B A B ...). The best (minimum) and median
wall and CPU times are reported with the ratios B / A: on a shared machine the minimum is the least noisy estimate.
Workloads (each a call of the public API, timed after one warm-up call):

* ``logit_lens``: all rows x all positions of ``--seqs`` x ``--seq-len`` tokens from a cache (top-5, ranks, KL,
  entropy);
* ``dla``: direct logit attribution of one prompt's last token (heads, MLPs, neurons, sources), its forward pass
  included;
* ``tuned_step``: one KL step of tuned-lens training over every layer (``--seq-len`` x 4 tokens);
* ``sweep``: an identity-Patchscope ``l* = l`` sweep over 8 source positions.

Usage::

    python benchmarks/compare_revisions.py HEAD~1 HEAD          # prints a table, writes benchmarks/results/ab.json

Text comes from ``mi_lenses/data`` when present, else this repository's README (never from outside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_logit_lens import cpu_info

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("logit_lens", "dla", "tuned_step", "sweep")

WORKER = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
# an editable install's meta-path finder would win over sys.path: drop it so this revision's code is imported
sys.meta_path = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")) + str(f)]
import mi_lenses
assert mi_lenses.__file__.startswith(sys.argv[1]), mi_lenses.__file__
from mi_lenses.models.view import ModelView
cfg = json.loads(sys.argv[2])
torch.set_num_threads(cfg["threads"])
model = mi_lenses.load_model()
tok = model.tokenizer
ids = tok(open(cfg["text"]).read(), add_special_tokens=False)["input_ids"]
n = cfg["seqs"] * cfg["seq_len"]
tokens = torch.tensor((ids * (n // len(ids) + 1))[:n]).view(cfg["seqs"], cfg["seq_len"])
with torch.no_grad():
    logits, cache = model.run_with_cache(tokens)

def logit_lens():
    mi_lenses.logit_lens(model, tokens, cache=cache, logits=logits, top_k=5, check=False)

def dla():
    mi_lenses.direct_logit_attribution(model, tokens[:1], cache=None, answer=" the")

from mi_lenses.lenses.tuned.train import _Objective
lens = mi_lenses.TunedLens.from_model(model)
obj = _Objective(ModelView(model))
batch = tokens[:4]
def tuned_step():
    hs = obj.hidden(batch)
    target = obj.final(hs[-1])
    for i in range(lens.n_layers):
        obj.layer_step(lens, i, hs[i], target, 1.0 / batch.numel())

def sweep():
    mi_lenses.patchscopes.sweep(model, tokens[:1, :16], positions=list(range(8, 16)), target_layers="same",
                                progress=False)

fns = dict(logit_lens=logit_lens, dla=dla, tuned_step=tuned_step, sweep=sweep)
name = cfg["workload"]
fns[name]()  # warm-up
t = []
for _ in range(cfg["repeats"]):
    w0, c0 = time.perf_counter(), time.process_time()
    fns[name]()
    t.append([time.perf_counter() - w0, time.process_time() - c0])
print(json.dumps(t))
'''


def text_file() -> Path:
    shipped = sorted((REPO / "mi_lenses" / "data").glob("*.txt")) if (REPO / "mi_lenses" / "data").is_dir() else []
    return shipped[0] if shipped else REPO / "README.md"


def worktree(rev: str, root: Path) -> Path:
    path = root / rev.replace("/", "_").replace("~", "-").replace("^", "-")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="baseline revision (e.g. HEAD~1)")
    ap.add_argument("b", nargs="?", default="WORKTREE", help="revision to compare (default: the working tree)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds (each a fresh process)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "ab.json"))
    args = ap.parse_args()

    info = cpu_info()
    print(f"CPU: {info['model']} ({info['cores']} cores; {' '.join(info['flags'])}); threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        try:
            for label, rev in (("A", args.a), ("B", args.b)):
                roots[label] = REPO if rev == "WORKTREE" else worktree(rev, Path(tmp))
            results: dict = {}
            for name in args.workloads.split(","):
                cfg = dict(workload=name, threads=args.threads, seqs=args.seqs, seq_len=args.seq_len,
                           repeats=args.repeats, text=str(text_file()))
                times = {"A": [], "B": []}
                for _ in range(args.rounds):
                    for label in ("A", "B"):
                        out = subprocess.run([sys.executable, "-c", WORKER, str(roots[label]), json.dumps(cfg)],
                                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                        if out.returncode:
                            raise SystemExit(f"{label} {name} failed:\n{out.stderr[-3000:]}")
                        times[label] += json.loads(out.stdout.strip().splitlines()[-1])
                row = {"A_all": times["A"], "B_all": times["B"]}
                for stat, f in (("min", min), ("median", statistics.median)):
                    for k, what in ((0, "wall"), (1, "cpu")):
                        a, b = f(t[k] for t in times["A"]), f(t[k] for t in times["B"])
                        row[f"{stat}_{what}"] = {"A_s": a, "B_s": b, "B_over_A": b / a}
                results[name] = row
                m, c = row["min_wall"], row["min_cpu"]
                print(f"{name:>11}: best wall A {m['A_s']:7.3f} s  B {m['B_s']:7.3f} s  B/A {m['B_over_A']:5.2f}   "
                      f"best CPU B/A {c['B_over_A']:5.2f}   median wall B/A {row['median_wall']['B_over_A']:5.2f}")
        finally:
            for label, path in roots.items():
                if path != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                                   capture_output=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"a": args.a, "b": args.b, "cpu": info, "threads": args.threads,
                                           "seqs": args.seqs, "seq_len": args.seq_len, "results": results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
