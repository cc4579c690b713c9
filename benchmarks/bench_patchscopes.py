"""Benchmark: batched Patchscope sweeps and KV-cached patched generation on the embedded SmolLM2-135M (30 blocks).

(a) **30 x 30 identity sweep** (source "The Eiffel Tower is located in the city of", last position; every (l, l*)
    pair = 900 patched rows):
    * batched: ``mi_lenses.patchscopes.sweep`` (chunks of ``--chunk`` rows, one forward pass each, one hook per target
      layer, the unpatched target prefix computed once with the KV cache);
    * per-pair loop: the source states computed once, then one hooked forward pass of the target prompt per pair,
      as a user would write it with ``model.hooks``. With ``--pairs N < 900`` a seeded random subset of N pairs is
      timed and the time is extrapolated linearly to 900 pairs (the per-pair cost does not depend on the pair);
      the subset's precision@1/top-1 are checked against the batched sweep.
(b) **20-token patched generation** with the description preset (source "Diana, Princess of Wales", l = l* = 8),
    greedy, patch in the prompt pass: the generation loop ``patched_generate(..., use_kv_cache=True)`` vs
    ``use_kv_cache=False`` (the ratio the target refers to), and end to end ``patchscope(...)`` (which adds the same
    source pass and next-token readout to both); identical tokens required in all four runs.

Every measurement prints wall time and CPU utilisation = process CPU seconds / (wall x torch threads); values well
below 1 mean other processes competed for the cores. One run; ratios in the same run.

Usage (repo root)::

    python benchmarks/bench_patchscopes.py                  # 90 random pairs timed for the loop (extrapolated)
    python benchmarks/bench_patchscopes.py --pairs 900      # the full per-pair loop
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from bench_logit_lens import cpu_info, describe_cpu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGETS = {"sweep_speedup_min": 10.0, "kv_speedup_min": 3.0}


class Timer:
    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.util = self.cpu / (self.wall * self.threads)

    def __str__(self) -> str:
        return f"{self.wall:8.2f} s  (CPU utilisation {self.util:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=90, help="pairs timed in the per-pair loop (900 = all)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "patchscopes.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import mi_lenses
    from mi_lenses.patchscopes import Source, patchscope, presets, sweep
    from mi_lenses.patchscopes.run import patch_hooks, patched_generate, source_states
    from mi_lenses.patchscopes.spec import resolve_target
    from mi_lenses.atomic import write_atomic

    model = mi_lenses.load_model()
    view = mi_lenses.ModelView(model)
    L = view.n_layers
    prompt = "The Eiffel Tower is located in the city of"
    target = presets.identity()
    results: dict = {"model": view.name, "threads": threads, "layers": L, "cpu": cpu_info()}
    print(f"CPU {describe_cpu(results['cpu'])}; kernels {torch.backends.cpu.get_cpu_capability()}; threads {threads}")

    # ------------------------------------------------------------------ (a) sweep
    with torch.no_grad():  # warm-up
        sweep(model, prompt, target, source_layers=[0], target_layers=[0], positions=[-1], progress=False)
    with Timer(threads) as t_batched:
        sw = sweep(model, prompt, target, positions=[-1], chunk=args.chunk, progress=False)
    print(f"(a) batched 30 x 30 sweep ({L * L} rows, chunk {args.chunk}): {t_batched}")

    pairs = [(l, l2) for l in range(L) for l2 in range(L)]
    n = min(args.pairs, len(pairs))
    subset = sorted(random.Random(0).sample(pairs, n)) if n < len(pairs) else pairs
    rt = resolve_target(target, view)
    src_tokens = view.to_tokens(prompt)
    with Timer(threads) as t_loop:
        states, logits = source_states(view, view.batch(src_tokens), range(L))
        pred = int(logits[0, -1].argmax())
        loop_top1 = {}
        with torch.no_grad():
            for l, l2 in subset:
                vec = states[l][0, -1][None]
                hooks = patch_hooks(view, torch.tensor([l2]), vec, rt.positions)
                with model.hooks(fwd_hooks=hooks):
                    out = model(rt.tokens)
                loop_top1[(l, l2)] = int(out[0, -1].argmax())
    per_pair = t_loop.wall / n
    loop_900 = per_pair * len(pairs)
    agree = sum(loop_top1[(l, l2)] == int(sw.top1_ids[l, l2, 0]) for l, l2 in subset)
    prec_agree = sum((loop_top1[(l, l2)] == pred) == bool(sw.prec_at_1[l, l2, 0]) for l, l2 in subset)
    speedup = loop_900 / t_batched.wall
    note = "measured" if n == len(pairs) else f"extrapolated from {n} random pairs (seed 0)"
    print(f"    per-pair loop: {t_loop} for {n} pairs -> {per_pair * 1e3:.0f} ms/pair, {loop_900:.1f} s for 900 "
          f"({note})")
    print(f"    top-1 agreement loop vs sweep: {agree}/{n}; precision@1 agreement {prec_agree}/{n}")
    print(f"    speed-up batched vs loop: {speedup:.1f}x (target >= {TARGETS['sweep_speedup_min']:.0f}x): "
          f"{'PASS' if speedup >= TARGETS['sweep_speedup_min'] else 'FAIL'}")
    results["sweep"] = {
        "rows": len(pairs), "chunk": args.chunk, "batched_s": t_batched.wall, "batched_cpu_util": t_batched.util,
        "loop_pairs_timed": n, "loop_s_timed": t_loop.wall, "loop_cpu_util": t_loop.util,
        "loop_s_per_pair": per_pair, "loop_s_900": loop_900, "loop_900_is": note, "speedup": speedup,
        "top1_agreement": f"{agree}/{n}", "prec_agreement": f"{prec_agree}/{n}",
        "prec_at_1_diagonal": sw.prec_at_1_mean.diagonal().tolist(),
    }

    # ------------------------------------------------------------------ (b) generation
    src = Source("Diana, Princess of Wales", layers=8)
    desc = presets.description()
    rt_d = resolve_target(desc, view)
    T = rt_d.tokens.shape[1]
    states, _ = source_states(view, view.batch(view.to_tokens(src.prompt)), range(L))
    patched_generate(rt_d, torch.tensor([8]), states[8][0, -1][None], 2)  # warm-up
    results["generation"] = {"new_tokens": args.new_tokens, "target_prompt_tokens": T}
    print(f"(b) {args.new_tokens}-token patched generation, description preset (target prompt {T} tokens), "
          f"source 'Diana, Princess of Wales':")
    gen_ok = True
    for name, src_layers in (("1 row (l = l* = 8)", [8]), ("10 rows (l = l* = 0, 3, ..., 27)", list(range(0, L, 3)))):
        layers = torch.tensor(src_layers)
        vec = torch.stack([states[l][0, -1] for l in src_layers])
        with Timer(threads) as t_kv:
            a = patched_generate(rt_d, layers, vec, args.new_tokens, use_kv_cache=True)
        with Timer(threads) as t_full:
            b = patched_generate(rt_d, layers, vec, args.new_tokens, use_kv_cache=False)
        same = torch.equal(a, b)
        kv_speedup = t_full.wall / t_kv.wall
        ok = kv_speedup >= TARGETS["kv_speedup_min"] and same
        gen_ok = gen_ok and same
        print(f"    {name}: KV cache {t_kv}; no cache {t_full}; identical tokens {same}; speed-up {kv_speedup:.1f}x "
              f"(target >= {TARGETS['kv_speedup_min']:.0f}x): {'PASS' if ok else 'FAIL'}")
        results["generation"][f"rows_{len(src_layers)}"] = {
            "kv_s": t_kv.wall, "kv_cpu_util": t_kv.util, "no_cache_s": t_full.wall, "no_cache_cpu_util": t_full.util,
            "speedup": kv_speedup, "identical_tokens": same,
        }
    # anchor: TransformerLens's own generate() with a seq_len-gated patch hook (prompt pass only), cached
    (i_star,) = rt_d.positions
    vec8 = states[8][0, -1]

    def gated(resid, hook):
        if resid.shape[1] > i_star:
            resid[:, i_star] = vec8
        return resid

    with Timer(threads) as t_tl:
        with model.hooks(fwd_hooks=[(view.hook_name("resid_post", 8), gated)]):
            tl_out = model.generate(rt_d.tokens, max_new_tokens=args.new_tokens, do_sample=False, stop_at_eos=False,
                                    verbose=False, use_past_kv_cache=True, return_type="tokens")
    tl_same = torch.equal(tl_out[0, T:].cpu(), patched_generate(rt_d, torch.tensor([8]), vec8[None],
                                                                   args.new_tokens)[0])
    print(f"    anchor, TL generate(use_past_kv_cache=True) + gated hook, 1 row: {t_tl}; same tokens as ours: "
          f"{tl_same}; ours (KV) / TL = {results['generation']['rows_1']['kv_s'] / t_tl.wall:.2f}")
    results["generation"]["tl_generate_kv_s"] = t_tl.wall
    results["generation"]["tl_generate_cpu_util"] = t_tl.util
    results["generation"]["tl_generate_same_tokens"] = tl_same
    with Timer(threads) as t_e2e_kv:  # end to end: + source pass and next-token readout
        e2e = patchscope(model, src, desc, max_new_tokens=args.new_tokens, stop_at_eos=False)
    with Timer(threads) as t_e2e_full:
        e2e_full = patchscope(model, src, desc, max_new_tokens=args.new_tokens, stop_at_eos=False, use_kv_cache=False)
    same = torch.equal(e2e.generated_ids, e2e_full.generated_ids)
    print(f"    end to end patchscope(), 1 row, incl. source pass + readout: KV cache {t_e2e_kv}; no cache "
          f"{t_e2e_full}; identical tokens {same}; {t_e2e_full.wall / t_e2e_kv.wall:.1f}x")
    print(f"    generated: {e2e.generated[0]!r}")
    results["generation"].update({
        "end_to_end_kv_s": t_e2e_kv.wall, "end_to_end_no_cache_s": t_e2e_full.wall,
        "end_to_end_speedup": t_e2e_full.wall / t_e2e_kv.wall, "identical_tokens": same and gen_ok,
        "text": e2e.generated[0],
    })
    results["targets"] = TARGETS
    results["command"] = "python benchmarks/bench_patchscopes.py " + " ".join(sys.argv[1:])
    write_atomic(args.json, json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
