"""Benchmark: training a TopK dictionary with mi_lenses vs EleutherAI sparsify 1.3.3's ``Trainer``, side by side.

Both trainers train the same dictionary on the same model, layer, tokens and width, one after the other in one run:

* **model**: the embedded SmolLM2-135M. Ours trains on ``mi_lenses.load_model(compatibility_mode=False)`` (the raw
  ``TransformerBridge``, whose ``blocks.N.hook_resid_post`` / ``blocks.N.mlp.hook_in`` / ``mlp.hook_out`` hold
  exactly the Hugging Face modules' values; the script checks this and records the max difference); sparsify trains
  on the Hugging Face ``LlamaForCausalLM`` of the same converted folder (``AutoModelForCausalLM``), as its users do.
* **dictionary**: ``--kind sae`` reads and reconstructs the block's output (``blocks.L.hook_resid_post`` = sparsify's
  ``layers.L``); ``--kind transcoder`` maps the MLP's input to its output (``blocks.L.mlp.hook_in -> mlp.hook_out`` =
  sparsify's ``layers.L.mlp`` with ``transcode=True``, no skip connection); ``--kind both`` runs the two.
  ``--n-features`` latents, TopK ``--k``.
* **tokens**: the shipped training text ``mi_lenses.data.TRAIN_TEXT`` packed once by ``mi_lenses.data.load_tokens``
  into ``[n, --seq-len]`` sequences (``--tokens`` in all), saved to a file that both workers read: both see the same
  ids in the same order, ``--batch-size`` sequences per step, each token once.
* **recipe**: the same on both sides: Adam (torch defaults) at a *constant* ``lr`` (default
  ``2e-4 / sqrt(n_features / 2**14)``, sparsify's own Adam default), AuxK with ``auxk_alpha = 1/32`` and
  ``k_aux`` = half the width, a latent dead after ``dead_tokens`` silent tokens (a quarter of the run, ours' default,
  passed to sparsify as ``dead_feature_threshold``), SAE decoder rows kept at unit norm. sparsify is run with
  ``optimizer="adam"``, ``lr_warmup_steps=0`` and its learning-rate schedulers removed (its Adam otherwise warms up
  over 1000 steps and decays linearly to 0), as ``tests/test_features_training.py`` drives it (where the two
  trainers end at the same weights). sparsify's *default* recipe differs: ``optimizer="signum"`` (SignSGD with
  schedule-free momentum, lr ``5e-3 / sqrt(n / 2**14)``), ``auxk_alpha=0``, ``dead_feature_threshold=10M``; not
  measured here.
* **every position**: both train on every token, the first of each sequence included (ours with ``exclude_first=0``;
  its default leaves the attention sink out, which sparsify cannot).
* **what else differs** (each side as its users get it): sparsify runs the whole model per batch (``self.model(x)``,
  all 30 blocks and the 49152-way unembedding) with autograd recording and trains in a forward hook; ours runs the
  model without gradients and stops once the deepest requested hook has fired. sparsify initialises with its own
  seed and RNG use, so the two runs start from different (identically distributed) weights. Ours checkpoints never
  (``checkpoint_every=0``), sparsify only at the end (``save_every`` beyond the run); both write their final
  dictionary inside the timed region. sparsify's saved SAE decoder is the one before its next renormalisation (not
  exactly unit rows); it is evaluated as saved.

**How it measures.** Each side trains in a fresh subprocess (``--threads`` torch threads, ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` set alike), after loading its model and the tokens (not timed). *Training time* is the wall time
of the whole call (ours: ``train_dictionary``; sparsify: ``Trainer(...)`` plus ``fit()``), forward passes, setup and
saving included; **tokens/s** = tokens trained / that time. *Update time* is the part spent in the dictionary itself,
timed by wrapping (ours: ``_Coder.initialise`` and ``_Coder.step``: forward, backward, Adam and renormalisation;
sparsify: ``SparseCoder.forward``, ``Tensor.backward`` and the optimizer step); the rest is the model's forward
passes and bookkeeping. CPU utilisation = process CPU seconds / (wall seconds x threads): well below 1 means the
machine was busy. Then one evaluator, in the parent process, measures both saved dictionaries on held-out text:
``mi_lenses.evaluate_dictionary`` on ``mi_lenses.data.EVAL_TEXT`` (``--eval-tokens``), each loaded from its folder
with ``mi_lenses.load_dictionary`` (sparsify's hook folder ``layers.L`` / ``layers.L.mlp``): FVU, L0, dead fraction,
delta CE and loss recovered. Goal (issue 28): ours >= 1.5x sparsify's tokens/s at equal or better held-out FVU.

The CPU, its vector instruction sets, the load average and the versions are printed and stored with the numbers in
``benchmarks/results/dictionary.json``; everything printed, the workers' output included, also goes to
``benchmarks/results/dictionary.log``.

Usage (from the repo root)::

    python benchmarks/bench_dictionary.py                  # both kinds, 32768 tokens each, 4096 latents, k 32
    python benchmarks/bench_dictionary.py --kind sae --tokens 65536
    python benchmarks/bench_dictionary.py --smoke          # seconds: tiny settings, results to a temporary folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TARGETS = {"tokens_per_s_vs_sparsify_min": 1.5, "fvu": "ours <= sparsify (held out)"}


def _bench_ll():
    spec = importlib.util.spec_from_file_location("bench_logit_lens", Path(__file__).with_name("bench_logit_lens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_folder() -> Path:
    """The Hugging Face folder of the embedded SmolLM2 (converted from its GGUF once, cached)."""
    from mi_lenses.models.loading import _converted_gguf, cache_root, embedded_gguf_path

    return _converted_gguf(embedded_gguf_path(), cache_root())[0]


def hookpoint(kind: str, layer: int) -> str:
    return f"layers.{layer}" if kind == "sae" else f"layers.{layer}.mlp"


def lr_of(args) -> float:
    return args.lr if args.lr is not None else 2e-4 / (args.n_features / 2 ** 14) ** 0.5


def dead_tokens_of(args, n_tokens: int) -> int:
    return args.dead_tokens if args.dead_tokens is not None else max(1, min(n_tokens // 4, 10_000_000))


class Timer:
    """Sums the wall time spent inside wrapped functions (not re-entrant-safe on purpose: nested calls count once)."""

    def __init__(self):
        self.total, self.calls, self.depth = 0.0, 0, 0

    def wrap(self, fn):
        timer = self

        def wrapped(*a, **k):
            if timer.depth:
                return fn(*a, **k)
            timer.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timer.total += time.perf_counter() - t0
                timer.calls += 1
                timer.depth -= 1

        return wrapped


# ---------------------------------------------------------------------------------------------- workers
def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    tokens = torch.load(run / "tokens.pt", weights_only=True)
    n_tokens = tokens.numel()
    common = dict(kind=args.kind, layer=args.layer, n_features=args.n_features, k=args.k, lr=lr_of(args),
                  auxk_alpha=args.auxk_alpha, dead_tokens=dead_tokens_of(args, n_tokens), seq_len=args.seq_len,
                  batch_size=args.batch_size, tokens=n_tokens)
    timer = Timer()
    t_load = time.perf_counter()
    if args.worker == "ours":
        import mi_lenses
        from mi_lenses.features import train as train_mod

        model = mi_lenses.load_model(compatibility_mode=False)
        t_load = time.perf_counter() - t_load
        train_mod._Coder.step = timer.wrap(train_mod._Coder.step)
        train_mod._Coder.initialise = timer.wrap(train_mod._Coder.initialise)
        out = run / "ours"
        c0, t0 = time.process_time(), time.perf_counter()
        d = mi_lenses.train_dictionary(model, tokens, out=out, kind=args.kind, layers=[args.layer],
                                       n_features=args.n_features, k=args.k, lr=common["lr"], max_tokens=n_tokens, exclude_first=0,
                                       auxk_alpha=args.auxk_alpha, dead_tokens=common["dead_tokens"],
                                       seq_len=args.seq_len, batch_size=args.batch_size, checkpoint_every=0,
                                       seed=args.seed, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tr = d.meta["training"]
        extra = {"folder": str(out), "steps": tr.get("steps"), "train_tokens": tr.get("train_tokens"),
                 "final_train_fvu": tr.get("final_fvu"), "setup_s": None, "fit_s": wall}
    else:
        from sparsify.config import SparseCoderConfig, TrainConfig
        from sparsify.sparse_coder import SparseCoder
        from sparsify.trainer import Trainer
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=torch.float32)
        hf.eval()
        t_load = time.perf_counter() - t_load
        SparseCoder.forward = timer.wrap(SparseCoder.forward)
        torch.Tensor.backward = timer.wrap(torch.Tensor.backward)
        pre = {}

        def step_pre(opt, a, k):
            pre["t"] = time.perf_counter()

        def step_post(opt, a, k):
            timer.total += time.perf_counter() - pre.pop("t", time.perf_counter())

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(step_pre)
        register_optimizer_step_post_hook(step_post)
        point = hookpoint(args.kind, args.layer)
        tc = args.kind == "transcoder"
        steps = tokens.shape[0] // args.batch_size
        cfg = TrainConfig(SparseCoderConfig(num_latents=args.n_features, k=args.k, transcode=tc, skip_connection=False),
                          batch_size=args.batch_size, optimizer="adam", lr=common["lr"], lr_warmup_steps=0,
                          auxk_alpha=args.auxk_alpha, dead_feature_threshold=common["dead_tokens"],
                          hookpoints=[point], init_seeds=[args.seed], save_every=steps + 10, log_to_wandb=False,
                          save_dir=str(run / "sparsify"), run_name="run")
        data = [{"input_ids": r} for r in tokens[: steps * args.batch_size]]
        c0, t0 = time.process_time(), time.perf_counter()
        trainer = Trainer(cfg, data, hf)
        trainer.lr_schedulers = []  # a constant learning rate, as ours (warm-up 0, no linear decay)
        t_setup = time.perf_counter() - t0
        trainer.fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = run / "sparsify" / "run" / point
        extra = {"folder": str(out), "steps": trainer.global_step, "train_tokens": steps * args.batch_size * args.seq_len,
                 "final_train_fvu": None, "setup_s": t_setup, "fit_s": wall - t_setup,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()}
    trained = extra["train_tokens"] or n_tokens
    res = {"side": args.worker, **common, **extra, "model_load_s": t_load, "train_s": wall, "cpu_s": cpu,
           "cpu_util": cpu / (wall * args.threads), "tokens_per_s": trained / wall, "update_s": timer.total,
           "update_calls": timer.calls, "rest_s": wall - timer.total, "torch_threads": torch.get_num_threads()}
    (run / f"{args.worker}.json").write_text(json.dumps(res, indent=1))
    print(f"[{args.worker}] {trained} tokens in {wall:.2f} s ({trained / wall:.0f} tokens/s; dictionary update "
          f"{timer.total:.2f} s; cpu util {res['cpu_util']:.2f})", flush=True)


# ---------------------------------------------------------------------------------------------- parent
class Log:
    def __init__(self, path: Path | None):
        self.f = open(path, "w") if path else None

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def run_worker(side: str, kind: str, run: Path, args, log: Log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--run-dir", str(run), "--kind", kind]
    for name in ("layer", "n_features", "k", "threads", "seq_len", "batch_size", "auxk_alpha", "seed", "lr",
                 "dead_tokens"):
        v = getattr(args, name)
        if v is not None:
            cmd += [f"--{name.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in (p.stdout + p.stderr).splitlines():
        if line.strip() and not line.startswith("Training:"):
            log(f"    {side}: {line}")
    if p.returncode:
        raise SystemExit(f"the {side} worker failed (exit {p.returncode}); its output is above")
    return json.loads((run / f"{side}.json").read_text())


def check_hooks(model, kind: str, layer: int, tokens) -> float:
    """Max |bridge hook - Hugging Face module value| on a few sequences: both trainers read the same activations."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=torch.float32).eval()
    got = {}
    mod = hf.model.layers[layer] if kind == "sae" else hf.model.layers[layer].mlp
    h = mod.register_forward_hook(lambda m, i, o: got.update(i=i[0], o=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
        h.remove()
        names = ([f"blocks.{layer}.hook_resid_post"] if kind == "sae"
                 else [f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.mlp.hook_out"])
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    refs = [got["o"]] if kind == "sae" else [got["i"], got["o"]]
    return max(float((cache[n] - r).abs().max()) for n, r in zip(names, refs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens per dictionary (each seen once)")
    ap.add_argument("--layer", type=int, default=12, help="the block (SmolLM2-135M has 30)")
    ap.add_argument("--n-features", type=int, default=4096, help="latents (width)")
    ap.add_argument("--k", type=int, default=32, help="active latents per token (TopK)")
    ap.add_argument("--kind", choices=["sae", "transcoder", "both"], default="both")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each worker (default: all cores)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step, both sides")
    ap.add_argument("--lr", type=float, default=None, help="Adam lr, both sides (default 2e-4 / sqrt(n / 2^14))")
    ap.add_argument("--auxk-alpha", type=float, default=1 / 32)
    ap.add_argument("--dead-tokens", type=int, default=None, help="dead after this many silent tokens (default: "
                                                                   "a quarter of the run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of EVAL_TEXT for the FVU")
    ap.add_argument("--order", choices=["sparsify-first", "ours-first"], default="sparsify-first")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (256 tokens, 256 latents, 1 thread unless "
                                                         "--threads), results to a temporary folder")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/dictionary.json)")
    ap.add_argument("--log", default=None, help="log file (default: the JSON's path with .log)")
    ap.add_argument("--keep", default=None, help="keep the tokens and trained dictionaries in this folder")
    ap.add_argument("--worker", choices=["ours", "sparsify"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)
    if args.smoke:
        args.tokens, args.seq_len, args.batch_size, args.n_features, args.k, args.eval_tokens = 256, 16, 4, 256, 8, 128
        args.threads = 1 if "--threads" not in sys.argv else args.threads  # a busy machine: no OpenMP barrier waits
    tmp = tempfile.mkdtemp(prefix="bench_dictionary_")
    out = Path(args.out) if args.out else (Path(tmp) / "dictionary.json" if args.smoke else RESULTS / "dictionary.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Log(Path(args.log) if args.log else out.with_suffix(".log"))

    import torch

    import mi_lenses
    from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT, load_tokens

    torch.set_num_threads(args.threads)
    ll = _bench_ll()
    cpu = ll.cpu_info()
    load0 = os.getloadavg()
    import sparsify
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformer_lens": _dist_version("transformer-lens"),
                "sparsify": getattr(sparsify, "__version__", None) or _dist_version("eai-sparsify"),
                "mi_lenses": _dist_version("mi_lenses") or _dist_version("mi-lenses")}
    log(f"CPU: {ll.describe_cpu(cpu)}; kernels {torch.backends.cpu.get_cpu_capability()}; {args.threads} torch "
        f"threads per worker; load average {load0[0]:.2f}")
    log(f"versions: {versions}")
    model = mi_lenses.load_model(compatibility_mode=False)
    tokens = load_tokens(TRAIN_TEXT, model, args.seq_len, max_tokens=args.tokens, seed=args.seed)
    n_seq = (tokens.shape[0] // args.batch_size) * args.batch_size
    if n_seq == 0:
        raise SystemExit(f"{TRAIN_TEXT.name} gave {tokens.shape[0]} sequences, fewer than one batch")
    tokens = tokens[:n_seq].contiguous()
    if tokens.numel() < args.tokens:
        log(f"note: {TRAIN_TEXT.name} holds {tokens.numel()} tokens of the {args.tokens} asked for at seq_len "
            f"{args.seq_len}: training on {tokens.numel()}")
    kinds = ["sae", "transcoder"] if args.kind == "both" else [args.kind]
    results = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": versions,
               "settings": {"tokens": tokens.numel(), "layer": args.layer, "n_features": args.n_features, "k": args.k,
                            "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": n_seq // args.batch_size,
                            "lr": lr_of(args), "auxk_alpha": args.auxk_alpha,
                            "dead_tokens": dead_tokens_of(args, tokens.numel()), "threads": args.threads,
                            "eval_tokens": args.eval_tokens, "optimizer": "adam, constant lr, both sides",
                            "train_text": TRAIN_TEXT.name, "eval_text": EVAL_TEXT.name, "smoke": args.smoke},
               "targets": TARGETS, "kinds": {}}
    log(f"settings: {json.dumps(results['settings'])}")
    for kind in kinds:
        run = Path(args.keep or tmp) / kind
        run.mkdir(parents=True, exist_ok=True)
        torch.save(tokens, run / "tokens.pt")
        err = check_hooks(model, kind, args.layer, tokens[:2])
        log(f"[{kind}] layer {args.layer} ({hookpoint(kind, args.layer)}): bridge hooks vs the HF module, max |diff| "
            f"{err:.2e}")
        order = ["sparsify", "ours"] if args.order == "sparsify-first" else ["ours", "sparsify"]
        sides = {side: run_worker(side, kind, run, args, log) for side in order}
        for side, r in sides.items():
            d = mi_lenses.load_dictionary(r["folder"])
            ev = mi_lenses.evaluate_dictionary(model, d, EVAL_TEXT, max_tokens=args.eval_tokens,
                                               seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
            r["eval"] = {key: float(getattr(ev, key)[0]) for key in ("fvu", "l0", "dead_fraction", "delta_ce_bits",
                                                                      "loss_recovered", "spliced_ce_bits")}
            r["eval"].update(n_tokens=ev.n_tokens, clean_ce_bits=ev.clean_ce_bits)
            r["hook"] = d.hook
        o, s = sides["ours"], sides["sparsify"]
        cmp = {"tokens_per_s_ratio": o["tokens_per_s"] / s["tokens_per_s"],
               "update_time_ratio": s["update_s"] / o["update_s"] if o["update_s"] else None,
               "fvu_ours": o["eval"]["fvu"], "fvu_sparsify": s["eval"]["fvu"],
               "fvu_ratio": o["eval"]["fvu"] / s["eval"]["fvu"] if s["eval"]["fvu"] else None}
        cmp["met"] = {"tokens_per_s": cmp["tokens_per_s_ratio"] >= TARGETS["tokens_per_s_vs_sparsify_min"],
                      "fvu": o["eval"]["fvu"] <= s["eval"]["fvu"]}
        results["kinds"][kind] = {"hook_check_max_abs_diff": err, "ours": o, "sparsify": s, "comparison": cmp}
        log(f"[{kind}] {'side':<9} {'tokens/s':>9} {'train s':>8} {'update s':>9} {'rest s':>7} {'cpu util':>8} "
            f"{'held-out FVU':>12} {'L0':>6} {'dead':>6} {'dCE bits':>8}")
        for side in ("ours", "sparsify"):
            r, e = sides[side], sides[side]["eval"]
            log(f"[{kind}] {side:<9} {r['tokens_per_s']:9.0f} {r['train_s']:8.2f} {r['update_s']:9.2f} "
                f"{r['rest_s']:7.2f} {r['cpu_util']:8.2f} {e['fvu']:12.4f} {_f(e.get('l0'), 6, 1)} "
                f"{_f(e.get('dead_fraction'), 6, 3)} {_f(e.get('delta_ce_bits'), 8, 4)}")
        log(f"[{kind}] ours / sparsify tokens/s: {cmp['tokens_per_s_ratio']:.2f}x (goal >= "
            f"{TARGETS['tokens_per_s_vs_sparsify_min']}x); update time sparsify / ours: "
            f"{_f(cmp['update_time_ratio'], 0, 2)}x; held-out FVU ours {cmp['fvu_ours']:.4f} vs sparsify "
            f"{cmp['fvu_sparsify']:.4f}; met: {cmp['met']}")
    results["load_average"] = {"start": load0[0], "end": os.getloadavg()[0]}
    log(f"load average: {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    out.write_text(json.dumps(results, indent=1))
    log(f"wrote {out} and {log.f.name if log.f else '-'}")


def _f(v, width: int, prec: int) -> str:
    return f"{v:{width}.{prec}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
