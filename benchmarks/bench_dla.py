"""Benchmark: every neuron's direct effect at every position, mi_lenses vs TransformerLens 4.3 stack_neuron_results.

SmolLM2-135M (30 layers x 1536 neurons, d_model 576), ``--seqs`` x ``--seq-len`` WikiText-2 test tokens, one fixed
direction (the logit of ``--token``), the final norm's scale frozen per position. All methods read one shared
activation cache (``mlp.hook_post`` of every layer, the final residual stream and ``ln_final.hook_scale``) and
produce the same ``[layers x neurons, batch, pos]`` numbers:

* ``ours``:      ``mi_lenses.attribution.neuron_attribution(model, cache, answer=TOKEN).values``
* ``tl_proj``:   ``cache.stack_neuron_results(L, apply_ln=True, project_output_onto=W_U[:, TOKEN])``
* ``tl_plain``:  ``cache.stack_neuron_results(L, apply_ln=True) @ W_U[:, TOKEN]`` — the full
  ``[neurons, batch, pos, d_model]`` stack (106 MB per token position for SmolLM2), so it only runs at a reduced size
  (``--plain-seqs`` x ``--plain-len``); ours and tl_proj are measured at that size too, for the ratios.

Every method runs in a fresh subprocess (model load, cache, warm-up on a tiny input, then ``--repeats`` measured
calls: median wall time, max peak memory). Peak extra memory per call: ``gc.collect()`` + ``malloc_trim(0)``, VmHWM
reset via ``/proc/self/clear_refs``, baseline VmRSS, call, VmHWM - baseline (the approach of ``bench_logit_lens.py``,
whose helpers are reused; the trim means every call pays the page faults of its fresh output). CPU utilisation =
cpu seconds / (wall seconds x torch threads), so contention from other processes shows. The outputs of all methods
are compared (max |difference| is reported).

Usage (from the repo root)::

    python benchmarks/bench_dla.py                    # 8 x 128 tokens; plain TL at 1 x 16
    python benchmarks/bench_dla.py --seqs 2 --seq-len 32 --plain-len 8   # quick
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
DEFAULT_DATA = "mi_lenses/data/shakespeare_eval.txt"  # shipped; --data for WikiText
TARGETS = {"mem_ratio_vs_plain_min": 50.0, "time_ratio_vs_proj_max": 1.0}


def _bench_ll():
    spec = importlib.util.spec_from_file_location("bench_logit_lens", Path(__file__).with_name("bench_logit_lens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ worker
def worker(name: str, size: str, cfg: dict, out_dir: Path) -> dict:
    import torch

    import mi_lenses
    from mi_lenses.attribution import neuron_attribution

    ll = _bench_ll()
    t0 = time.perf_counter()
    model = mi_lenses.load_model()
    load_s = time.perf_counter() - t0
    seqs, seq_len = (cfg["seqs"], cfg["seq_len"]) if size == "full" else (cfg["plain_seqs"], cfg["plain_len"])
    tokens = ll.load_tokens(model.tokenizer, Path(cfg["data"]), cfg["seqs"], cfg["seq_len"])[:seqs, :seq_len]
    L = model.cfg.n_layers
    finals = ("ln_final.hook_scale", f"blocks.{L - 1}.hook_resid_post")
    keep = lambda n: n.endswith("mlp.hook_post") or n in finals  # noqa: E731
    tok = model.to_single_token(cfg["token"])
    direction = model.W_U[:, tok].detach()

    def op(cache):
        if name == "ours":
            return lambda: neuron_attribution(model, cache, answer=tok)  # .values: [L, B, P, N]
        if name == "tl_proj":
            return lambda: cache.stack_neuron_results(L, apply_ln=True, project_output_onto=direction)  # [L*N, B, P]
        if name == "tl_plain":
            return lambda: cache.stack_neuron_results(L, apply_ln=True) @ direction
        raise SystemExit(f"unknown method {name}")

    with torch.no_grad():
        _, wcache = model.run_with_cache(tokens[:1, :4], names_filter=keep)
        op(wcache)()  # warm-up: first-call setup outside the measurement
        del wcache
        _, cache = model.run_with_cache(tokens, names_filter=keep)
        out, stats = ll.timed_repeats(op(cache), cfg["repeats"])
    if name == "ours":
        out = out.values  # a NeuronAttribution: [L, B, P, N]
        out = out.permute(0, 3, 1, 2).reshape(-1, *out.shape[1:3])  # [L*N, B, P], TL's layout
    torch.save(out.contiguous(), out_dir / f"{name}_{size}.pt")
    return {"method": name, "size": size, "seqs": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "output_shape": list(out.shape), "model_load_s": load_s, **stats}


def run_worker(name: str, size: str, cfg: dict, out_dir: Path, timeout: float) -> dict:
    res_file = out_dir / f"{name}_{size}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-size", size,
           "--worker-config", str(out_dir / "config.json"), "--worker-out", str(out_dir)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0 or not res_file.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {name}/{size} failed with exit code {proc.returncode}")
    out = json.loads(res_file.read_text())
    print(f"  [{name} @ {size}: {out['seqs']} x {out['seq_len']}] {out['wall_s']:.3f} s, "
          f"{out['extra_peak_bytes'] / 2**20:.1f} MiB extra, cpu util {out['cpu_util']:.2f} "
          f"(process {time.perf_counter() - t:.0f} s)", flush=True)
    return out


def max_diff(out_dir: Path, a: str, b: str) -> float:
    import torch

    x, y = torch.load(out_dir / f"{a}.pt"), torch.load(out_dir / f"{b}.pt")
    return float((x - y).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--plain-seqs", type=int, default=1, help="batch for TL's plain (d_model-wide) stack")
    ap.add_argument("--plain-len", type=int, default=16, help="positions for TL's plain stack (106 MB each)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method (median wall; max extra memory)")
    ap.add_argument("--token", default=" the")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dla.json"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        cfg = json.loads(Path(args.worker_config).read_text())
        out_dir = Path(args.worker_out)
        info = worker(args.worker, args.worker_size, cfg, out_dir)
        (out_dir / f"{args.worker}_{args.worker_size}.json").write_text(json.dumps(info))
        return

    data = (REPO / args.data).resolve() if not os.path.isabs(args.data) else Path(args.data)
    cfg = {"seqs": args.seqs, "seq_len": args.seq_len, "plain_seqs": args.plain_seqs, "plain_len": args.plain_len,
           "repeats": args.repeats, "token": args.token, "data": str(data)}
    with tempfile.TemporaryDirectory(prefix="bench_dla_") as tmp:
        out_dir = Path(tmp)
        (out_dir / "config.json").write_text(json.dumps(cfg))
        cpu = _bench_ll().cpu_info()
        print(f"CPU {_bench_ll().describe_cpu(cpu)}")
        print(f"SmolLM2, every neuron at every position; full {args.seqs} x {args.seq_len}, plain TL at "
              f"{args.plain_seqs} x {args.plain_len}", flush=True)
        runs = {}
        for name, size in (("ours", "small"), ("tl_proj", "small"), ("tl_plain", "small"),
                           ("ours", "full"), ("tl_proj", "full")):
            runs[f"{name}_{size}"] = run_worker(name, size, cfg, out_dir, args.timeout)
        diffs = {
            "ours_vs_tl_proj_full": max_diff(out_dir, "ours_full", "tl_proj_full"),
            "ours_vs_tl_proj_small": max_diff(out_dir, "ours_small", "tl_proj_small"),
            "ours_vs_tl_plain_small": max_diff(out_dir, "ours_small", "tl_plain_small"),
        }

    def ratio(a: str, b: str, key: str) -> float:
        return runs[b][key] / max(runs[a][key], 1)

    ratios = {
        "small_mem_tl_plain_over_ours": ratio("ours_small", "tl_plain_small", "extra_peak_bytes"),
        "small_time_tl_plain_over_ours": runs["tl_plain_small"]["wall_s"] / runs["ours_small"]["wall_s"],
        "small_mem_tl_proj_over_ours": ratio("ours_small", "tl_proj_small", "extra_peak_bytes"),
        "small_time_tl_proj_over_ours": runs["tl_proj_small"]["wall_s"] / runs["ours_small"]["wall_s"],
        "full_mem_tl_proj_over_ours": ratio("ours_full", "tl_proj_full", "extra_peak_bytes"),
        "full_time_tl_proj_over_ours": runs["tl_proj_full"]["wall_s"] / runs["ours_full"]["wall_s"],
        # the plain stack at the full size, from its measured bytes per position (it grows linearly in batch x pos)
        "full_mem_tl_plain_projected_bytes": runs["tl_plain_small"]["extra_peak_bytes"]
        * (args.seqs * args.seq_len) / (args.plain_seqs * args.plain_len),
    }
    ratios["full_mem_tl_plain_projected_over_ours"] = (
        ratios["full_mem_tl_plain_projected_bytes"] / max(runs["ours_full"]["extra_peak_bytes"], 1))
    result = {
        "benchmark": "dla_neurons",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "cpu": cpu},
        "config": cfg,
        "targets": TARGETS,
        "runs": runs,
        "max_abs_diff": diffs,
        "ratios": ratios,
        "targets_met": {
            "mem_ratio_vs_plain": ratios["small_mem_tl_plain_over_ours"] >= TARGETS["mem_ratio_vs_plain_min"],
            "no_slower_than_proj_full": ratios["full_time_tl_proj_over_ours"] >= TARGETS["time_ratio_vs_proj_max"],
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, args.out)

    mib = lambda b: b / 2**20  # noqa: E731
    print("\n| size | method | wall s | extra peak MiB | cpu util |\n| --- | --- | --- | --- | --- |")
    for key, r in runs.items():
        print(f"| {r['seqs']} x {r['seq_len']} | {r['method']} | {r['wall_s']:.3f} | "
              f"{mib(r['extra_peak_bytes']):.1f} | {r['cpu_util']:.2f} |")
    print("\nratios:", json.dumps({k: round(v, 2) for k, v in ratios.items()}))
    print("max |diff|:", diffs)
    print("targets met:", result["targets_met"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
