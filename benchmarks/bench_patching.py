"""Benchmark: activation patching on the IOI pair with SmolLM2-135M, mi_lenses vs TransformerLens, side by side.

Clean "When Mary and John went to the store, John gave a drink to", corrupted with the names swapped, answer
" Mary", wrong " John"; the metric is the normalised logit difference (0 = corrupted, 1 = clean), the same function
for every method. Measured in one process, interleaved (TransformerLens, then ours, per grid):

* the exact ``resid_pre`` grid (30 layers x 14 positions): TransformerLens's ``patching.get_act_patch_resid_pre``
  (one forward pass per cell) vs ``mi_lenses.activation_patching(..., what="resid_pre")`` (batched block replay);
* the exact layer x head grid (30 x 9, every position): ``patching.get_act_patch_attn_head_out_all_pos`` vs
  ``what="head_out"``;
* attribution patching of both grids (``method="attribution"``: one forward and one backward pass), and TL 4.3's
  ``tools.analysis.attribution_patching.attribution_patch`` (node granularity) for reference;
* equality: max |ours - TransformerLens| of each exact grid; the rank correlation (Spearman) of attribution with
  exact on each grid.

**Rank correlation with exact** (``--rank-only`` runs only this part): on a factual pair of 10 tokens each,
clean "The Eiffel Tower is located in the city of" (answer " Paris") and corrupted "The Colosseum is located in the
city of" (wrong " Rome"), the head grid (``what="head_out"``, every position) is estimated by ``method="attribution"``,
``"eap_ig"`` (``--eap-ig-steps`` 16: the input embeddings interpolated) and the per-site ``"ig"`` (``--ig-steps`` 10:
each layer's own head outputs interpolated, one batched pass per layer), and each estimate's Spearman correlation
with ``method="exact"`` is reported over the heads of three probe layers (``--probe-layers``, together and each
alone) and over the whole 30 x 9 grid. Each method runs once on the probe layers and once on the whole grid (both
timed); the probe-layer values must equal the whole grid's rows (checked). entoscope is not installed here: its
rank correlations are only those reported in issue 28, not measured by this script.

Ours is timed ``--repeats`` times (best kept; the machine is shared), TransformerLens once per grid (its loops take a
minute). The CPU, its instruction sets and the load average are printed and stored with the numbers in
``benchmarks/results/patching.json``. Targets: exact >= 8x faster than TransformerLens on both grids, attribution
>= 100x faster than exact patching.

Usage (from the repo root)::

    python benchmarks/bench_patching.py               # ~3 minutes on 2 cores
    python benchmarks/bench_patching.py --repeats 1   # quicker
    python benchmarks/bench_patching.py --rank-only   # only the rank correlations (merged into patching.json)
    python benchmarks/bench_patching.py --smoke       # seconds: the rank part on one probe layer, few IG steps
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When John and Mary went to the store, Mary gave a drink to"
TARGETS = {"exact_vs_tl_min": 8.0, "attribution_vs_exact_min": 100.0}
FACT_CLEAN, FACT_CORRUPTED = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
FACT_ANSWER, FACT_WRONG = " Paris", " Rome"
PROBE_LAYERS = (5, 15, 25)


def _bench_ll():
    spec = importlib.util.spec_from_file_location("bench_logit_lens", Path(__file__).with_name("bench_logit_lens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two tensors (flattened, NaN-free)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rank_correlations(model, probe_layers, ig_steps: int, eap_ig_steps: int, whole: bool = True) -> dict:
    """Spearman of attribution, eap_ig and per-site ig with exact on the factual pair's head grid: over the probe
    layers (together and each alone) and, with ``whole``, over every layer."""
    import mi_lenses

    ct, xt = model.to_tokens(FACT_CLEAN), model.to_tokens(FACT_CORRUPTED)
    if ct.shape != xt.shape:
        raise SystemExit(f"the factual pair must tokenize to equal lengths, got {ct.shape[1]} and {xt.shape[1]}")
    probe = list(probe_layers)
    methods = {"exact": {}, "attribution": {}, "eap_ig": {"ig_steps": eap_ig_steps}, "ig": {"ig_steps": ig_steps}}

    def patch(method, layers):
        return mi_lenses.activation_patching(model, FACT_CLEAN, FACT_CORRUPTED, answer=FACT_ANSWER, wrong=FACT_WRONG,
                                             what="head_out", method=method, layers=layers, progress=False,
                                             **methods[method])

    patch("attribution", probe)  # warm-up
    out: dict = {"clean": FACT_CLEAN, "corrupted": FACT_CORRUPTED, "answer": FACT_ANSWER, "wrong": FACT_WRONG,
                 "n_tokens": int(ct.shape[1]), "probe_layers": probe, "ig_steps": ig_steps,
                 "eap_ig_steps": eap_ig_steps, "seconds": {}, "spearman_vs_exact": {},
                 "entoscope": "not installed: its numbers are those reported in issue 28, not measured here"}
    vals: dict = {}
    for scope, layers in (("probe", probe), ("whole", None))[: 2 if whole else 1]:
        for m in methods:
            t, res = timed(lambda: patch(m, layers))
            vals[scope, m] = res.values
            out["seconds"][f"{m}_{scope}"] = t
    if whole:
        idx = torch.tensor([p % model.cfg.n_layers for p in probe])
        out["probe_vs_whole_rows_max_abs_diff"] = {m: float((vals["probe", m] - vals["whole", m][idx]).abs().max())
                                                   for m in methods}
    ex = vals["probe", "exact"]
    for m in ("attribution", "eap_ig", "ig"):
        r = {"probe_layers": spearman(vals["probe", m], ex),
             **{f"layer_{p}": spearman(vals["probe", m][i], ex[i]) for i, p in enumerate(probe)}}
        if whole:
            r["whole_grid"] = spearman(vals["whole", m], vals["whole", "exact"])
        out["spearman_vs_exact"][m] = r
    shape = list(vals["whole", "exact"].shape) if whole else list(ex.shape)
    out["grid_shape"] = shape
    print(f"rank correlation with exact, head_out grid {tuple(shape)} on the factual pair ({out['n_tokens']} tokens; "
          f"probe layers {probe}):")
    print(f"  {'method':<12}{'probe layers':>13}" + "".join(f"{'L' + str(p):>8}" for p in probe)
          + (f"{'whole grid':>12}" if whole else "") + f"{'time probe':>12}" + (f"{'time whole':>12}" if whole else ""))
    for m in ("attribution", "eap_ig", "ig"):
        r = out["spearman_vs_exact"][m]
        label = m + (f" ({methods[m]['ig_steps']})" if methods[m] else "")
        print(f"  {label:<12}{r['probe_layers']:>+13.3f}" + "".join(f"{r[f'layer_{p}']:>+8.3f}" for p in probe)
              + (f"{r['whole_grid']:>+12.3f}" if whole else "") + f"{out['seconds'][m + '_probe']:>11.3f}s"
              + (f"{out['seconds'][m + '_whole']:>11.3f}s" if whole else ""))
    print(f"  exact takes {out['seconds']['exact_probe']:.3f} s on the probe layers"
          + (f", {out['seconds']['exact_whole']:.3f} s on the whole grid" if whole else "")
          + "; entoscope: not installed (see issue 28 for its reported numbers)")
    if whole:
        print(f"  probe-layer runs vs the whole grid's rows, max |diff|: {out['probe_vs_whole_rows_max_abs_diff']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each of ours (best kept)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/patching.json; with "
                                                "--smoke a temporary file)")
    ap.add_argument("--rank-only", action="store_true", help="run only the rank correlations with exact on the "
                                                             "factual pair (merged into an existing results file)")
    ap.add_argument("--no-rank", action="store_true", help="skip the rank correlations (the IOI comparison only)")
    ap.add_argument("--probe-layers", type=int, nargs="+", default=list(PROBE_LAYERS))
    ap.add_argument("--ig-steps", type=int, default=10, help="points of the per-site method='ig'")
    ap.add_argument("--eap-ig-steps", type=int, default=16, help="points of method='eap_ig'")
    ap.add_argument("--smoke", action="store_true", help="seconds: only the rank part, one probe layer, no whole "
                                                         "grid, 2 IG points")
    args = ap.parse_args()
    if args.smoke:
        import tempfile

        args.rank_only, args.probe_layers, args.ig_steps, args.eap_ig_steps = True, args.probe_layers[:1], 2, 2
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="bench_patching_")) / "patching.json")
    args.out = args.out or str(REPO / "benchmarks" / "results" / "patching.json")

    import mi_lenses
    from transformer_lens import patching
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    ll = _bench_ll()
    cpu = ll.cpu_info()
    print(f"CPU: {ll.describe_cpu(cpu)}; torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f}")
    load0 = os.getloadavg()
    model = mi_lenses.load_model()
    if args.rank_only:
        rank = rank_correlations(model, args.probe_layers, args.ig_steps, args.eap_ig_steps, whole=not args.smoke)
        path = Path(args.out)
        results = json.loads(path.read_text()) if path.is_file() else {}
        results["rank_correlation"] = {**rank, "cpu": cpu, "torch_threads": torch.get_num_threads(),
                                       "load_average": {"start": load0[0], "end": os.getloadavg()[0]}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path} (rank_correlation)")
        return
    ct, xt = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    a, w = model.to_single_token(" Mary"), model.to_single_token(" John")
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(ct)
        corrupted_logits = model(xt)

    def ld(logits):
        return (logits[:, -1, a] - logits[:, -1, w]).mean()

    c, x = float(ld(clean_logits)), float(ld(corrupted_logits))

    def metric(logits):
        return (ld(logits) - x) / (c - x)

    kw = dict(answer=" Mary", wrong=" John", progress=False)
    ours = lambda what, method="exact": mi_lenses.activation_patching(  # noqa: E731
        model, CLEAN, CORRUPTED, what=what, method=method, **kw)
    ours("resid_pre", "attribution")  # warm-up (decoder, first passes)
    results: dict = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "clean_logit_diff": c,
                     "corrupted_logit_diff": x, "grids": {}}
    for name, what, tl_fn in (("resid_pre", "resid_pre", patching.get_act_patch_resid_pre),
                              ("heads", "head_out", patching.get_act_patch_attn_head_out_all_pos)):
        with contextlib.redirect_stderr(io.StringIO()):
            t_tl, ref = timed(lambda: tl_fn(model, xt, clean_cache, metric))
        t_ex, ex = timed(lambda: ours(what), args.repeats)
        t_at, at = timed(lambda: ours(what, "attribution"), args.repeats)
        err = float((ex.values - ref.cpu()).abs().max())
        rho = spearman(at.values, ex.values)
        g = {"shape": list(ex.values.shape), "cells": ex.values.numel(), "tl_exact_s": t_tl, "ours_exact_s": t_ex,
             "ours_attribution_s": t_at, "exact_speedup_vs_tl": t_tl / t_ex, "attribution_vs_ours_exact": t_ex / t_at,
             "attribution_vs_tl_exact": t_tl / t_at, "max_abs_diff_vs_tl": err, "spearman_attribution_exact": rho,
             "engine": ex.engine, "cells_run": ex.cells_run, "cells_skipped": ex.cells_skipped, "passes": ex.passes,
             "top_exact": ex.top(5)}
        results["grids"][name] = g
        print(f"{name:>9} {tuple(ex.values.shape)}: TL exact {t_tl:6.2f} s | ours exact {t_ex:5.2f} s "
              f"({t_tl / t_ex:4.1f}x, max diff {err:.1e}, {ex.cells_run} cells in {ex.passes} pass(es), "
              f"{ex.cells_skipped} identical skipped) | ours attribution {t_at:5.3f} s ({t_ex / t_at:5.1f}x vs ours "
              f"exact, {t_tl / t_at:6.1f}x vs TL exact; Spearman with exact {rho:+.3f})")
    t_tl_at, _ = timed(lambda: attribution_patch(model, ct, xt, metric))
    results["tl_attribution_patch_s"] = t_tl_at
    print(f"TransformerLens 4.3 attribution_patch (node granularity): {t_tl_at:.3f} s")
    if not args.no_rank:
        results["rank_correlation"] = rank_correlations(model, args.probe_layers, args.ig_steps, args.eap_ig_steps)
    results["load_average"] = {"start": load0[0], "end": os.getloadavg()[0]}
    results["targets"] = TARGETS
    grids = results["grids"].values()
    results["met"] = {
        "exact_vs_tl": all(g["exact_speedup_vs_tl"] >= TARGETS["exact_vs_tl_min"] for g in grids),
        "attribution_vs_tl_exact": all(g["attribution_vs_tl_exact"] >= TARGETS["attribution_vs_exact_min"]
                                       for g in grids),
        "attribution_vs_ours_exact": all(g["attribution_vs_ours_exact"] >= TARGETS["attribution_vs_exact_min"]
                                         for g in grids),
    }
    print(f"load average: {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; targets met: "
          f"{results['met']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
