"""Benchmark: attribution graphs, mi_lenses vs circuit-tracer 0.5.0 side by side, and ours on long prompts.

**Part 1, against circuit-tracer** (in one run, one after the other, each side in a fresh subprocess with the same
torch threads): the same model, transcoders, prompt and settings.

* model: the embedded SmolLM2-135M, unprocessed on both sides (circuit-tracer: its ``TransformerLensReplacementModel``
  built from the converted Hugging Face folder with ``fold_ln=False``, in ``.venv-ct`` by ``tests/oracle_circuit_tracer.py``;
  ours: ``load_model(compatibility_mode=False)``, the raw ``TransformerBridge``);
* transcoders: the weights of the embedded model's default transcoders (``load_dictionary(model=...)``: 30 skip
  transcoders, 2048 features, TopK 32) read at ``mlp.hook_in`` and written at ``mlp.hook_out`` on both sides. They were
  trained on the compatibility-mode model, so here they are only a realistic load (the same on both sides), not a
  faithful replacement of the raw model;
* prompt: the first ``--compare-tokens`` tokens of the shipped held-out text; ``max_feature_nodes=--budget``,
  ``batch_size=--batch-size`` on both sides (circuit-tracer's default 512 copies of the prompt per backward pass is a
  GPU setting), at most 10 logits to 0.95.

*Time* is the wall time of the graph call alone (circuit-tracer: ``attribute``; ours: ``attribution_graph`` with
``check=False``; our ``verify()`` is timed separately). *Peak memory* is the largest resident set seen during that call
(sampled every 5 ms), less the resident set just before it: what the graph itself costs on top of the loaded model.
The two adjacency matrices are compared (max absolute difference) where the active features agree (circuit-tracer's
TopK keeps negative pre-activations, ours does not; the default transcoders rarely have any among the top 32).

**Part 2, scaling** of ours on the embedded model (compatibility mode, as ``load_model()`` gives it) with its default
transcoders: graphs of ``--lengths`` tokens at ``--scaling-budget`` feature nodes: time, ``verify()`` time, peak
memory above the loaded model, active features and nodes.

The CPU, its vector instruction sets and the versions are printed and stored with the numbers in
``benchmarks/results/graph.json`` (the log in ``graph.log``). Goals (issue 29): >= 2x circuit-tracer's speed and
<= 0.5x its peak memory on this CPU; a 512-token graph within 24 GiB.

Usage (from the repo root; ``bash scripts/setup.sh --ct`` makes circuit-tracer's environment)::

    python benchmarks/bench_graph.py                        # both parts
    python benchmarks/bench_graph.py --lengths 16,64 --skip-compare
    python benchmarks/bench_graph.py --smoke                # seconds: 12 tokens, budget 64, results to /tmp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CT_PYTHON = REPO / ".venv-ct" / "bin" / "python"
TARGETS = {"speed_vs_circuit_tracer_min": 2.0, "peak_memory_vs_circuit_tracer_max": 0.5, "gib_at_512_tokens_max": 24}


def _bench_ll():
    spec = importlib.util.spec_from_file_location("bench_logit_lens", Path(__file__).with_name("bench_logit_lens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _oracle():
    """``tests/oracle_circuit_tracer.py`` (its ``RssSampler``: both sides measure memory with the same code)."""
    spec = importlib.util.spec_from_file_location("oracle_circuit_tracer", REPO / "tests" / "oracle_circuit_tracer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Log:
    def __init__(self, path: Path | None):
        self.f = open(path, "w") if path else None  # noqa: SIM115  (open for the whole run)

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def prompt_tokens(model, n: int):
    from mi_lenses.data import EVAL_TEXT

    return model.to_tokens(EVAL_TEXT.read_text(encoding="utf-8")[: 20 * n])[:, :n]


# ---------------------------------------------------------------------------------------------- workers
def worker_ours(args) -> None:
    """Our graph of the spec's prompt (part 1: raw model, the spec's transcoders) or of the first ``--length`` tokens
    (part 2: the default model and transcoders); prints one ``RESULT`` JSON line, saves the adjacency for part 1."""
    import torch

    import mi_lenses
    from mi_lenses import Dictionary, DictionarySet

    torch.set_num_threads(args.threads)
    if args.spec:
        spec = torch.load(Path(args.spec) / "spec.pt", weights_only=False)
        model = mi_lenses.load_model(compatibility_mode=False)
        ts = DictionarySet([Dictionary(t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"],
                                       hook=f"blocks.{i}.{spec['feature_input_hook']}",
                                       hook_out=f"blocks.{i}.{spec['feature_output_hook']}", activation="topk",
                                       k=int(t["k"]), W_skip=t["W_skip"]) for i, t in enumerate(spec["transcoders"])])
        tokens, budget, batch = spec["tokens"][None], spec["max_feature_nodes"], spec["batch_size"]
    else:
        model = mi_lenses.load_model()
        ts = mi_lenses.load_dictionary(model=model, progress=False)
        tokens, budget, batch = prompt_tokens(model, args.length), args.scaling_budget, args.batch_size
    mi_lenses.attribution_graph(model, tokens[:, :8], ts, max_feature_nodes=8, progress=False, check=False)  # warm
    t0 = time.perf_counter()
    oracle = _oracle()
    before = oracle.rss_mb()
    with oracle.RssSampler() as mem:
        g = mi_lenses.attribution_graph(model, tokens, ts, max_feature_nodes=budget, batch_size=batch,
                                        progress=False, check=False)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    g.verify()
    verify_s = time.perf_counter() - t1
    out = {"seconds": seconds, "verify_seconds": verify_s, "rss_before_mb": before, "peak_rss_during_mb": mem.peak,
           "n_tokens": int(tokens.shape[1]), "n_active": g.n_active, "feature_nodes": g.layout.n_features,
           "nodes": g.layout.n_nodes, "logits": g.layout.n_logits, "threads": torch.get_num_threads()}
    if args.spec:
        torch.save({"adjacency_matrix": g.adjacency, "active": torch.stack([g.nodes_table.layer, g.nodes_table.pos,
                                                                            g.nodes_table.feature], 1)},
                   Path(args.spec) / "ours.pt")
    print("RESULT " + json.dumps(out), flush=True)


def run(cmd: list[str], args, log: Log) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    line = next((l for l in p.stdout.splitlines() if l.startswith(("RESULT ", "RESULTS "))), None)
    if p.returncode or line is None:
        log(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(line.split(" ", 1)[1])


def ours_cmd(args, **kw) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--scaling-budget", str(args.scaling_budget)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return cmd


# ---------------------------------------------------------------------------------------------- part 1
def write_spec(folder: Path, args) -> None:
    import torch

    import mi_lenses
    from mi_lenses.models.loading import _converted_gguf, cache_root, embedded_gguf_path

    model = mi_lenses.load_model()
    ts = mi_lenses.load_dictionary(model=model, progress=False)
    (folder / "model").symlink_to(_converted_gguf(embedded_gguf_path(), cache_root())[0])
    tokens = prompt_tokens(model, args.compare_tokens)[0]
    torch.save({"tokens": tokens, "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
                "transcoders": [{"W_enc": d.W_enc.T.contiguous(), "b_enc": d.b_enc, "W_dec": d.W_dec,
                                 "b_dec": d.b_dec, "W_skip": d.W_skip, "k": d.k} for d in ts.dictionaries],
                "max_feature_nodes": args.budget, "batch_size": args.batch_size, "max_n_logits": 10,
                "desired_logit_prob": 0.95}, folder / "spec.pt")


def compare(args, log: Log) -> dict:
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench_graph_"))
    write_spec(folder, args)
    theirs = run([str(CT_PYTHON), str(REPO / "tests" / "oracle_circuit_tracer.py"), str(folder),
                  str(folder / "ct.pt")], args, log)
    ours = run(ours_cmd(args, spec=folder), args, log)
    ref, mine = torch.load(folder / "ct.pt", weights_only=False), torch.load(folder / "ours.pt", weights_only=False)
    sel = ref["active_features"][ref["selected_features"]]
    same_nodes = ref["adjacency_matrix"].shape == mine["adjacency_matrix"].shape and torch.equal(
        sel.long(), mine["active"][: len(sel)].long())
    diff = float((ref["adjacency_matrix"] - mine["adjacency_matrix"]).abs().max()) if same_nodes else None
    mem = {s: r["peak_rss_during_mb"] - r["rss_before_mb"] for s, r in (("ours", ours), ("circuit_tracer", theirs))}
    res = {"tokens": args.compare_tokens, "budget": args.budget, "batch_size": args.batch_size,
           "ours": ours, "circuit_tracer": {k: v for k, v in theirs.items() if k != "versions"},
           "circuit_tracer_versions": theirs.get("versions"), "same_nodes": same_nodes, "adjacency_max_abs_diff": diff,
           "speedup": theirs["seconds"] / ours["seconds"], "peak_memory_ratio": mem["ours"] / max(mem["circuit_tracer"], 1e-9),
           "peak_memory_above_model_mb": mem}
    log(f"vs circuit-tracer, {args.compare_tokens} tokens, budget {args.budget}, batch {args.batch_size}:")
    log(f"  time  ours {ours['seconds']:.1f} s (+ verify {ours['verify_seconds']:.1f} s), circuit-tracer "
        f"{theirs['seconds']:.1f} s: {res['speedup']:.2f}x")
    log(f"  peak memory above the model: ours {mem['ours']:.0f} MiB, circuit-tracer {mem['circuit_tracer']:.0f} MiB: "
        f"ratio {res['peak_memory_ratio']:.2f}")
    log(f"  same nodes: {same_nodes}; adjacency max |diff| {diff}")
    return res


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=512, help="max_feature_nodes against circuit-tracer")
    ap.add_argument("--batch-size", type=int, default=32, help="targets per backward pass, both sides")
    ap.add_argument("--lengths", default="16,64,256,512", help="prompt lengths of the scaling part")
    ap.add_argument("--scaling-budget", type=int, default=1024, help="max_feature_nodes of the scaling part")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each worker (default: all cores)")
    ap.add_argument("--skip-compare", action="store_true", help="only the scaling part")
    ap.add_argument("--smoke", action="store_true", help="12 tokens, budget 64, results to a temporary folder")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/graph.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker_ours(args)
    if args.smoke:
        args.compare_tokens, args.budget, args.lengths, args.scaling_budget = 12, 64, "12", 64
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "graph.json" if args.smoke
                                           else RESULTS / "graph.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Log(out.with_suffix(".log"))
    import torch

    import mi_lenses

    ll = _bench_ll()
    cpu = ll.cpu_info()
    log(f"CPU: {ll.describe_cpu(cpu)}; kernels {torch.backends.cpu.get_cpu_capability()}; {args.threads} torch "
        f"threads per worker; torch {torch.__version__}, mi_lenses {mi_lenses.__version__}")
    results: dict = {"cpu": cpu, "threads": args.threads, "targets": TARGETS}
    if not args.skip_compare:
        if not CT_PYTHON.exists():
            raise SystemExit(".venv-ct is missing: bash scripts/setup.sh --ct makes circuit-tracer's environment")
        results["vs_circuit_tracer"] = compare(args, log)
    scaling = []
    for n in [int(x) for x in args.lengths.split(",")]:
        r = run(ours_cmd(args, length=n), args, log)
        r["peak_above_model_mb"] = r["peak_rss_during_mb"] - r["rss_before_mb"]
        scaling.append(r)
        log(f"ours, {n} tokens, budget {args.scaling_budget}: {r['seconds']:.1f} s (+ verify {r['verify_seconds']:.1f} "
            f"s), peak {r['peak_rss_during_mb'] / 1024:.2f} GiB ({r['peak_above_model_mb']:.0f} MiB above the model), "
            f"{r['n_active']} active features, {r['nodes']} nodes")
    results["scaling"] = scaling
    out.write_text(json.dumps(results, indent=1))
    log(f"results: {out}")


if __name__ == "__main__":
    main()
