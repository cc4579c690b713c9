"""Benchmark: mi_lenses.logit_lens vs TransformerLens 4.3's tools.analysis.logit_lens on SmolLM2.

Both sides compute the same statistics for every layer row x position of ``--seqs`` x ``--seq-len`` tokens of
``--data`` (default: the held-out text shipped with mi_lenses),
reading one shared activation cache (so neither pays for the forward pass):

* top-5 token ids,
* rank of the final row's top-1 token at every layer,
* KL(final || layer) and entropy (nats).

(a) ours: ``mi_lenses.logit_lens(model, tokens, cache=cache, logits=logits, top_k=5, check=False)`` (one streamed pass);
    also timed *with* its own forward pass (``cache=None``).
(b) TL:   ``transformer_lens.tools.analysis.logit_lens`` used as a TL user would: ``top_k=5`` for the top-5;
    ``targets=<[batch, pos] final top-1 ids>`` (per-row targets) for the rank; ``return_type="log_probs"`` (full
    vocabulary, ``[layers, batch, pos, vocab]``) from which KL to the final row and entropy are reduced.
(c) the fp32 matmul roofline: measured throughput of ``[N, d_model] @ [d_model, vocab]`` -> the time the unembedding
    FLOPs alone would take; ours is reported as roofline_time / our_time.
(d) ours with ``dtype="bfloat16"`` on a small subset (bf16 matmul has no fast path on AVX2-only CPUs): time ratio and
    error vs fp32 on the same subset.

The CPU's model and instruction sets are printed with the results: a claim holds for the machine it was measured on.
``--isa avx2`` restricts every worker to AVX2 kernels (an AVX2-only CPU, emulated).

Every measured method runs in a fresh subprocess. Inside it, after the model and cache are loaded, each timed call
runs ``gc.collect()`` and glibc ``malloc_trim(0)`` (so free heap memory cannot absorb the call's allocations), resets
the RSS high-water mark (``/proc/self/clear_refs`` <- 5), reads VmRSS as the baseline, runs, and reads VmHWM;
peak extra memory = VmHWM - baseline (max over the repeats). Wall time = median of ``--repeats`` calls after a
warm-up call on a small input. Process CPU time is recorded too, so contention from other processes on the machine
shows up as cpu_util < 1 (cpu seconds / (wall seconds x torch threads)).

Usage (from the repo root)::

    python benchmarks/bench_logit_lens.py                       # spec sizes: 8 x 128 tokens, 3 repeats
    python benchmarks/bench_logit_lens.py --seqs 2 --repeats 1  # quick
    python benchmarks/bench_logit_lens.py --profile             # + torch.profiler breakdown of ours
    python benchmarks/bench_logit_lens.py --isa avx2 --json benchmarks/results/logit_lens_avx2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "mi_lenses/data/shakespeare_eval.txt"  # relative to the repo root (shipped; --data for WikiText)
TARGETS = {"time_ratio_max": 0.5, "mem_ratio_max": 0.25, "roofline_min": 0.70}
# --isa avx2 restricts every kernel of the worker processes to AVX2 (ATen's vectorised ops, MKL's and oneDNN's GEMMs):
# an AVX2-only CPU emulated on this one. The roofline is measured under the same restriction.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_info() -> dict:
    """The CPU's model name, its vector instruction sets (from /proc/cpuinfo) and core count; every benchmark records
    it (``describe_cpu`` prints it)."""
    info = {"model": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                info["flags"] = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    return info


def describe_cpu(info: dict | None = None) -> str:
    """``model [instruction sets], N cores`` on one line."""
    info = info or cpu_info()
    return f"{info['model']} [{' '.join(info['flags'])}], {info['cores']} cores"


# ------------------------------------------------------------------------------------------------ measurement
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn):
    """Run ``fn()`` once with the RSS high-water mark reset first.

    Returns (result, wall_s, cpu_s, extra_peak_bytes, page_faults)."""
    import resource

    gc.collect()
    _malloc_trim()  # hand free heap memory back to the OS, so the call cannot hide allocations in it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    hwm = _status_kb("VmHWM")
    return out, t1 - t0, c1 - c0, (hwm - base) * 1024, r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt


def timed_repeats(fn, repeats: int, after=None) -> tuple[object, dict]:
    """``repeats`` measured calls; keep the first result. Returns (result, stats).

    Peak extra memory is the max over the repeats: in practice the first call, since later calls can reuse heap
    memory the allocator kept from earlier calls (it is then already in the baseline RSS). ``after()`` runs after
    each call, outside the measurement (so the first call is measured in the pristine process)."""
    import torch

    threads = torch.get_num_threads()
    first = None
    walls, cpus, extras, faults = [], [], [], []
    for i in range(repeats):
        out, wall, cpu, extra, flt = measure(fn)
        if after is not None:
            after()
        if i == 0:
            first = out
        del out
        walls.append(wall)
        cpus.append(cpu)
        extras.append(extra)
        faults.append(flt)
    utils = [c / (w * threads) for c, w in zip(cpus, walls)]
    return first, {
        "wall_s": statistics.median(walls),
        "wall_all_s": walls,
        "cpu_s": statistics.median(cpus),
        "cpu_util": statistics.median(utils),
        "cpu_util_all": utils,
        "extra_peak_bytes": max(extras),
        "extra_all_bytes": extras,
        "page_faults_all": faults,
        "threads": threads,
    }


# ------------------------------------------------------------------------------------------------ data + model
def load_tokens(tokenizer, data: Path, seqs: int, seq_len: int):
    """``seqs`` non-overlapping chunks of ``seq_len`` tokens from the start of the text file (no BOS)."""
    import torch

    need = seqs * seq_len
    text = data.read_text(encoding="utf-8").strip()
    n_chars = 8 * need
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or n_chars >= len(text):
            break
        n_chars *= 2
    if len(ids) < need:
        raise SystemExit(f"{data} has only {len(ids)} tokens; need {need}.")
    return torch.tensor(ids[:need], dtype=torch.long).view(seqs, seq_len)


def load_everything(cfg: dict, seqs: int | None = None, positions_only: int | None = None, with_cache: bool = True):
    import mi_lenses

    t0 = time.perf_counter()
    model = mi_lenses.load_model()
    load_s = time.perf_counter() - t0
    tokens = load_tokens(model.tokenizer, Path(cfg["data"]), cfg["seqs"], cfg["seq_len"])
    if seqs is not None:
        tokens = tokens[:seqs]
    if positions_only is not None:
        tokens = tokens[:, :positions_only]
    logits, cache = forward(model, tokens) if with_cache else (None, None)
    return model, tokens, logits, cache, load_s


def forward(model, tokens):
    import torch

    keep = lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_post")  # noqa: E731
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=keep)


# ------------------------------------------------------------------------------------------------ the methods
def ours_op(model, tokens, cache, logits, **kw):
    import mi_lenses

    return lambda: mi_lenses.logit_lens(model, tokens, cache=cache, logits=logits, top_k=5, check=False, **kw)


def ours_fwd_op(model, tokens, **kw):
    import mi_lenses

    return lambda: mi_lenses.logit_lens(model, tokens, top_k=5, check=False, **kw)


def tl_op(model, cache, chunk_size: int, pieces: dict):
    """The same statistics through TL 4.3's logit_lens, as a TL user would compute them."""
    import torch
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    def run():
        t = time.perf_counter()
        # 1. top-5 per (layer, batch, pos)
        top = tl_logit_lens(model, cache=cache, positions=None, top_k=5, chunk_size=chunk_size)
        top_ids = top.readout.top_ids  # [L, B, P, 5]
        t_top = time.perf_counter()
        # 2. rank of the final top-1 token: per-row targets [B, P], broadcast over layers
        final_top1 = top_ids[-1, ..., 0]
        rk = tl_logit_lens(model, cache=cache, positions=None, targets=final_top1, chunk_size=chunk_size)
        ranks = rk.readout.target_ranks[..., 0]  # [L, B, P]
        t_rank = time.perf_counter()
        # 3. full-vocabulary log-probs [L, B, P, V], then KL(final || layer) and entropy as reductions
        lp_res = tl_logit_lens(model, cache=cache, positions=None, return_type="log_probs", chunk_size=chunk_size)
        lp = lp_res.values
        t_lp = time.perf_counter()
        lp_final = lp[-1]
        p_final = lp_final.exp()
        kl = torch.empty(lp.shape[:-1])
        ent = torch.empty(lp.shape[:-1])
        # one layer at a time: the vectorised form ((p_final * (lp_final - lp)).sum(-1)) would add two more
        # [L, B, P, V] temporaries (2 x 6.2 GB at the spec size), which this 23 GB machine cannot afford
        for layer in range(lp.shape[0]):
            kl[layer] = (p_final * (lp_final - lp[layer])).sum(-1)
            ent[layer] = -(lp[layer].exp() * lp[layer]).sum(-1)
        t_red = time.perf_counter()
        pieces.setdefault("runs", []).append(
            {"top_k_call_s": t_top - t, "targets_call_s": t_rank - t_top, "log_probs_call_s": t_lp - t_rank,
             "reductions_s": t_red - t_lp}
        )
        return {"top_ids": top_ids, "rank": ranks, "kl": kl, "entropy": ent,
                "readout_entropy": lp_res.readout.entropy, "labels": lp_res.labels}

    return run


# ------------------------------------------------------------------------------------------------ workers
def worker(name: str, cfg: dict, out_dir: Path) -> dict:
    import torch

    torch.manual_seed(0)
    info: dict = {"method": name}
    if name == "roofline":
        return worker_roofline(cfg)
    if name == "bf16":
        return worker_bf16(cfg, out_dir)
    if name == "profile":
        return worker_profile(cfg)

    model, tokens, logits, cache, load_s = load_everything(cfg, with_cache=name != "ours_fwd")
    info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), model_load_s=load_s, d_model=int(model.cfg.d_model), d_vocab=int(model.W_U.shape[-1]),
                n_layers=int(model.cfg.n_layers))
    # warm-up on a small input (first-call kernel/thread-pool setup), then the measured full-size calls
    wtok = tokens[:1, : cfg["warmup_len"]]
    wlogits, wcache = forward(model, wtok)
    if name == "ours":
        ours_op(model, wtok, wcache, wlogits)()
        probe, samples = matmul_probe(cfg)
        res, stats = timed_repeats(ours_op(model, tokens, cache, logits), cfg["repeats"], after=probe)
        info["roofline_interleaved"] = summarize_probe(cfg, samples)
        if cfg.get("with_fused"):  # the opt-in torch.compile'd reduction: first call (compile included), then warm
            t0 = time.perf_counter()
            ours_op(model, tokens, cache, logits, fused=True)()
            info["fused_first_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours_op(model, tokens, cache, logits, fused=True)()
            info["fused_s"] = time.perf_counter() - t0
        torch.save({"top_ids": res.top_ids, "rank": res.final_top1_rank, "kl": res.kl, "entropy": res.entropy,
                    "final_top1": res.final_top1, "labels": res.labels}, out_dir / "ours.pt")
    elif name == "ours_fwd":
        ours_fwd_op(model, wtok)()
        res, stats = timed_repeats(ours_fwd_op(model, tokens), cfg["repeats"])
    elif name == "tl":
        tl_op(model, wcache, cfg["tl_chunk_size"], {})()
        pieces: dict = {}
        res, stats = timed_repeats(tl_op(model, cache, cfg["tl_chunk_size"], pieces), cfg["repeats"])
        stats["pieces_s"] = {k: statistics.median(r[k] for r in pieces["runs"]) for k in pieces["runs"][0]}
        torch.save({k: v for k, v in res.items()}, out_dir / "tl.pt")
    else:
        raise SystemExit(f"unknown worker {name}")
    info.update(stats)
    return info


def matmul_probe(cfg: dict):
    """An ``after`` hook for the ours worker: ``roofline_repeats`` fp32 ``[rows, d] @ [d, vocab]`` matmuls in each
    weight layout, so the roofline is also measured in the same process and machine state as our timed calls.

    The product goes into a preallocated buffer (``torch.mm(..., out=)``): the roofline is the matmul's compute
    throughput, without the page faults of a fresh ``rows x vocab`` output (which cost ~20 % on this VM)."""
    import torch

    d, V, N = cfg["d_model"], cfg["d_vocab"], cfg["roofline_rows"]
    x = torch.randn(N, d)
    buf = torch.empty(N, V)
    Ws = {"nn": torch.randn(d, V), "model": torch.randn(V, d).t()}
    samples: dict = {k: [] for k in Ws}

    def probe():
        for k, W in Ws.items():
            torch.mm(x, W, out=buf)  # warm-up
            for _ in range(cfg["roofline_repeats"]):
                t = time.perf_counter()
                torch.mm(x, W, out=buf)
                samples[k].append(time.perf_counter() - t)

    return probe, samples


def summarize_probe(cfg: dict, samples: dict) -> dict:
    flop = 2 * cfg["roofline_rows"] * cfg["d_model"] * cfg["d_vocab"]
    out = {k: {"rows": cfg["roofline_rows"], "cols": cfg["d_vocab"], "median_s": statistics.median(v), "all_s": v,
               "gflops": flop / statistics.median(v) / 1e9, "gflops_best": flop / min(v) / 1e9}
           for k, v in samples.items()}
    best = max(out, key=lambda k: out[k]["gflops"])
    return dict(out[best], layout=f"float32_{best}")


def worker_roofline(cfg: dict) -> dict:
    """Throughput of ``[rows, d_model] @ [d_model, vocab]`` in fp32 and bf16, for both weight layouts.

    ``nn``: W contiguous ``[d_model, vocab]``; ``model``: W is the transposed view of a contiguous ``[vocab, d_model]``
    tensor, which is how the model's ``W_U`` (and so the matrix mi_lenses multiplies by) is laid out. The roofline
    uses the faster fp32 layout."""
    import torch

    d, V = cfg["d_model"], cfg["d_vocab"]
    out: dict = {"method": "roofline", "d_model": d, "d_vocab": V}
    probes = [
        ("float32", "nn", cfg["roofline_rows"], V, cfg["roofline_repeats"], True),
        ("float32", "model", cfg["roofline_rows"], V, cfg["roofline_repeats"], True),
        # the same with a freshly allocated output, as ``x @ W`` does (for information)
        ("float32", "model", cfg["roofline_rows"], V, cfg["roofline_repeats"], False),
        ("bfloat16", "model", cfg["bf16_matmul_rows"], V, cfg["bf16_matmul_repeats"], True),
        # the nn layout hits a ~100x slower bf16 kernel on this CPU: probe it on a vocab slice only
        ("bfloat16", "nn", cfg["bf16_matmul_rows"], 4096, cfg["bf16_matmul_repeats"], True),
    ]
    for dt_name, layout, rows, cols, reps, preallocated in probes:
        if rows <= 0:
            continue
        dtype = getattr(torch, dt_name)
        x = torch.randn(rows, d).to(dtype)
        W = torch.randn(d, cols).to(dtype) if layout == "nn" else torch.randn(cols, d).to(dtype).t()
        buf = torch.empty(rows, cols, dtype=dtype)
        mm = (lambda: torch.mm(x, W, out=buf)) if preallocated else (lambda: x @ W)
        mm()  # warm-up
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            mm()
            ts.append(time.perf_counter() - t)
        flop = 2 * rows * d * cols
        key = f"{dt_name}_{layout}" + ("" if preallocated else "_alloc")
        out[key] = {"rows": rows, "cols": cols, "median_s": statistics.median(ts), "all_s": ts,
                    "gflops": flop / statistics.median(ts) / 1e9, "gflops_best": flop / min(ts) / 1e9}
    best = max(("float32_nn", "float32_model"), key=lambda k: out[k]["gflops"])
    out["float32"] = dict(out[best], layout=best)
    return out


def worker_bf16(cfg: dict, out_dir: Path) -> dict:
    """ours fp32 vs bf16 on the first ``bf16_seqs`` sequences x ``bf16_positions`` positions (all layers)."""
    model, tokens, logits, cache, load_s = load_everything(cfg, seqs=cfg["bf16_seqs"],
                                                           positions_only=cfg["bf16_positions"])
    info = {"method": "bf16", "seqs": tokens.shape[0], "positions": tokens.shape[1], "model_load_s": load_s}
    for dt in ("float32", "bfloat16"):  # warm-up on one position
        ours_op(model, tokens, cache, logits, dtype=dt, positions=[0])()
    res = {}
    for dt in ("float32", "bfloat16"):
        r, stats = timed_repeats(ours_op(model, tokens, cache, logits, dtype=dt), cfg["bf16_repeats"])
        res[dt] = r
        info[dt] = stats
    a, b = res["float32"], res["bfloat16"]
    info["time_ratio_bf16_vs_fp32"] = info["bfloat16"]["wall_s"] / info["float32"]["wall_s"]
    info["kl_max_abs_err"] = float((a.kl - b.kl).abs().max())
    info["kl_mean_abs_err"] = float((a.kl - b.kl).abs().mean())
    info["entropy_max_abs_err"] = float((a.entropy - b.entropy).abs().max())
    info["top1_agreement"] = float((a.top_ids[..., 0] == b.top_ids[..., 0]).float().mean())
    info["final_top1_rank_agreement"] = float((a.final_top1_rank == b.final_top1_rank).float().mean())
    return info


def worker_profile(cfg: dict) -> dict:
    """torch.profiler over ours on ``profile_seqs`` sequences: where the time goes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model, tokens, logits, cache, _ = load_everything(cfg, seqs=cfg["profile_seqs"])
    op = ours_op(model, tokens, cache, logits)
    op()  # warm-up at this size
    # wrap row_stats (the streamed non-final rows) and final_row (the final row) so their shares are visible
    import importlib

    ll = importlib.import_module("mi_lenses.lenses.engine")  # the module that calls them

    def wrap(fn, label):
        def wrapped(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapped

    orig_rs, orig_fs = ll.row_stats, ll.final_row
    ll.row_stats, ll.final_row = wrap(orig_rs, "row_stats"), wrap(orig_fs, "final_row")
    try:
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            op()
        wall = time.perf_counter() - t
    finally:
        ll.row_stats, ll.final_row = orig_rs, orig_fs
    ranges = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in ("row_stats", "final_row")}
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "cpu_total_s": e.cpu_time_total / 1e6})
    rows.sort(key=lambda r: -r["self_cpu_s"])
    total_self = sum(r["self_cpu_s"] for r in rows)
    rows = [r for r in rows if r["name"] not in ranges]
    return {"method": "profile", "seqs": tokens.shape[0], "positions": tokens.shape[1], "wall_s": wall,
            "total_self_cpu_s": total_self, "ranges_s": ranges, "top_ops": rows[:20]}


# ------------------------------------------------------------------------------------------------ driver
def run_worker(name: str, cfg: dict, out_dir: Path, timeout: float) -> dict:
    """Run one method in a fresh Python process; its result comes back as JSON."""
    res_file = out_dir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-config",
           str(out_dir / "config.json"), "--worker-out", str(out_dir)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, **ISA_ENV.get(cfg.get("isa", "native"), {})})
    if proc.returncode != 0 or not res_file.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {name!r} failed with exit code {proc.returncode}")
    out = json.loads(res_file.read_text())
    out["process_s"] = time.perf_counter() - t
    print(f"  [{name}] done in {out['process_s']:.0f} s", flush=True)
    return out


def compare(out_dir: Path) -> dict:
    import torch

    a, b = torch.load(out_dir / "ours.pt"), torch.load(out_dir / "tl.pt")
    assert a["top_ids"].shape == b["top_ids"].shape, (a["top_ids"].shape, b["top_ids"].shape)
    exact = (a["top_ids"] == b["top_ids"]).all(-1)
    same_set = (a["top_ids"].sort(-1).values == b["top_ids"].sort(-1).values).all(-1)
    rank_eq = a["rank"] == b["rank"]
    return {
        "rows": len(a["labels"]),
        "labels_ours": [a["labels"][0], a["labels"][1], a["labels"][-1]],
        "labels_tl": [b["labels"][0], b["labels"][1], b["labels"][-1]],
        "final_top1_equal": bool((a["final_top1"] == b["top_ids"][-1, ..., 0]).all()),
        "top5_exact_agreement": float(exact.float().mean()),
        "top5_set_agreement": float(same_set.float().mean()),
        "top1_agreement": float((a["top_ids"][..., 0] == b["top_ids"][..., 0]).float().mean()),
        "rank_agreement": float(rank_eq.float().mean()),
        "rank_max_abs_diff": int((a["rank"] - b["rank"]).abs().max()),
        "kl_max_abs_diff": float((a["kl"] - b["kl"]).abs().max()),
        "kl_max_rel_diff": float(((a["kl"] - b["kl"]).abs() / b["kl"].abs().clamp(min=1e-2)).max()),
        "kl_max": float(b["kl"].max()),
        "entropy_max_abs_diff": float((a["entropy"] - b["entropy"]).abs().max()),
        "tl_entropy_reduction_vs_readout_max_abs_diff": float((b["entropy"] - b["readout_entropy"]).abs().max()),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def add_worker_options(p: argparse.ArgumentParser, json_default: str) -> None:
    """``--json`` and ``--render``, and the hidden options a worker process is started with (shared by the
    benchmarks that run each method in a fresh process)."""
    p.add_argument("--json", default=json_default, help="results file (relative: repo)")
    p.add_argument("--render", metavar="JSON", help="only print the table of an existing results file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)


def run_as_worker(args: argparse.Namespace, worker_fn) -> bool:
    """In a worker process (``--worker NAME``): run ``worker_fn(name, cfg, out_dir)``, write its JSON result to
    ``out_dir/NAME.json`` and return True; False in the parent."""
    if not args.worker:
        return False
    cfg = json.loads(Path(args.worker_config).read_text())
    out_dir = Path(args.worker_out)
    (out_dir / f"{args.worker}.json").write_text(json.dumps(worker_fn(args.worker, cfg, out_dir)))
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="text file (relative paths: to the repo root)")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    p.add_argument("--warmup-len", type=int, default=16, help="tokens of the small warm-up call")
    p.add_argument("--tl-chunk-size", type=int, default=64, help="TL logit_readout chunk_size (TL default 64)")
    p.add_argument("--roofline-rows", type=int, default=1024)
    p.add_argument("--roofline-repeats", type=int, default=5)
    p.add_argument("--bf16-matmul-rows", type=int, default=256, help="rows of the bf16 matmul probe (0: skip)")
    p.add_argument("--bf16-matmul-repeats", type=int, default=3)
    p.add_argument("--bf16-seqs", type=int, default=1, help="sequences for the bf16 comparison (0: skip)")
    p.add_argument("--bf16-positions", type=int, default=32, help="positions for the bf16 comparison")
    p.add_argument("--bf16-repeats", type=int, default=3)
    p.add_argument("--skip-ours-fwd", action="store_true", help="skip ours-with-forward-pass")
    p.add_argument("--profile", action="store_true", help="also torch.profiler ours")
    p.add_argument("--profile-seqs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="per-worker timeout (s)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="'avx2': restrict the workers to AVX2 kernels (emulates an AVX2-only CPU)")
    p.add_argument("--with-fused", action="store_true", help="also time the opt-in torch.compile'd reduction")
    add_worker_options(p, "benchmarks/results/logit_lens.json")
    args = p.parse_args()

    if run_as_worker(args, worker):
        return

    if args.render:
        print(render(json.loads(Path(args.render).read_text()), args))
        return
    data = (REPO / args.data).resolve() if not Path(args.data).is_absolute() else Path(args.data)
    if not data.is_file():
        raise SystemExit(f"text file not found: {data} (pass --data)")
    json_path = (REPO / args.json) if not Path(args.json).is_absolute() else Path(args.json)
    cfg = {"data": str(data), "seqs": args.seqs, "seq_len": args.seq_len, "repeats": args.repeats,
           "warmup_len": min(args.warmup_len, args.seq_len), "tl_chunk_size": args.tl_chunk_size,
           "roofline_rows": args.roofline_rows, "roofline_repeats": args.roofline_repeats,
           "bf16_matmul_rows": args.bf16_matmul_rows, "bf16_matmul_repeats": args.bf16_matmul_repeats,
           "bf16_seqs": args.bf16_seqs, "bf16_positions": min(args.bf16_positions, args.seq_len),
           "bf16_repeats": args.bf16_repeats, "profile_seqs": args.profile_seqs, "isa": args.isa,
           "with_fused": args.with_fused,
           # SmolLM2-135M (the roofline probe needs them before any model is loaded); checked below
           "d_model": 576, "d_vocab": 49152, "n_layers": 30}
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_logit_lens_") as tmp:
        out_dir = Path(tmp)
        (out_dir / "config.json").write_text(json.dumps(cfg))
        names = ["roofline", "ours", "tl"] + ([] if args.skip_ours_fwd else ["ours_fwd"])
        names += (["bf16"] if args.bf16_seqs > 0 else []) + (["profile"] if args.profile else [])
        print(f"running {names} on {args.seqs} x {args.seq_len} tokens, {args.repeats} repeats ...", flush=True)
        for name in names:
            results[name] = run_worker(name, cfg, out_dir, args.timeout)
        results["agreement"] = compare(out_dir)
    load1 = os.getloadavg()

    import torch

    for key in ("d_model", "d_vocab", "n_layers"):
        if results["ours"][key] != cfg[key]:
            raise SystemExit(f"model {key} = {results['ours'][key]}, the roofline assumed {cfg[key]}")
    rows = results["agreement"]["rows"]
    tokens = args.seqs * args.seq_len
    flops = 2 * rows * tokens * cfg["d_model"] * cfg["d_vocab"]
    # roofline throughput: the median of the fp32 probes taken in the ours process between its timed calls (same
    # machine state); the separate probe process is reported alongside
    roof = results["ours"]["roofline_interleaved"]
    roof_time = flops / (roof["gflops"] * 1e9)
    ours, tl = results["ours"], results["tl"]
    summary = {
        "time_ratio_ours_vs_tl": ours["wall_s"] / tl["wall_s"],
        "mem_ratio_ours_vs_tl": _ratio(ours["extra_peak_bytes"], tl["extra_peak_bytes"]),
        "unembed_flops": flops,
        "roofline_gflops": roof["gflops"],
        "roofline_time_s": roof_time,
        "roofline_fraction": roof_time / ours["wall_s"],
        # sensitivity: with the best single probe, and with the separate probe process
        "roofline_fraction_best_probe": flops / (roof["gflops_best"] * 1e9) / ours["wall_s"],
        "roofline_fraction_separate_probe": flops / (results["roofline"]["float32"]["gflops"] * 1e9) / ours["wall_s"],
    }
    if "ours_fwd" in results:
        summary["time_ratio_ours_fwd_vs_tl"] = results["ours_fwd"]["wall_s"] / tl["wall_s"]
        summary["mem_ratio_ours_fwd_vs_tl"] = _ratio(results["ours_fwd"]["extra_peak_bytes"], tl["extra_peak_bytes"])
    summary["pass"] = {
        "time_le_0.5x_tl": summary["time_ratio_ours_vs_tl"] <= TARGETS["time_ratio_max"],
        "mem_le_0.25x_tl": summary["mem_ratio_ours_vs_tl"] <= TARGETS["mem_ratio_max"],
        "roofline_ge_70pct": summary["roofline_fraction"] >= TARGETS["roofline_min"],
    }
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_info(), "isa": args.isa,
           "transformer_lens": _version("transformer_lens"),
           "cpu_capability": results["ours"].get("cpu_capability", torch.backends.cpu.get_cpu_capability()),
           "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": load0,
           "loadavg_end": load1, "total_runtime_s": time.perf_counter() - t_start}
    report = {"config": cfg, "env": env, "summary": summary, "targets": TARGETS, **results}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    print(render(report, args))
    print(f"\nJSON: {json_path}")


def _version(mod: str) -> str:
    from importlib.metadata import version

    try:
        return version(mod.replace("_", "-"))
    except Exception:
        return "?"


def render(r: dict, args) -> str:
    s, ag, ours, tl = r["summary"], r["agreement"], r["ours"], r["tl"]
    roof = r["roofline"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    cfg = r["config"]
    L = []
    cpu = r["env"].get("cpu", {})
    L.append(f"### logit lens: SmolLM2-135M, {cfg['seqs']} x {cfg['seq_len']} tokens of {Path(cfg['data']).name}, "
             f"{ag['rows']} rows x all positions, top-5 + final-top-1 rank + KL + entropy")
    L.append(f"(CPU {cpu.get('model', '?')} [{' '.join(cpu.get('flags', []))}]; kernels: "
             f"{r['env']['cpu_capability']}{' (AVX2 emulated: --isa avx2)' if cfg.get('isa') == 'avx2' else ''}; "
             f"{r['env']['torch_threads']} torch threads, torch "
             f"{r['env']['torch']}, TL {r['env']['transformer_lens']}; wall = median of {cfg['repeats']} after a "
             f"warm-up; extra mem = VmHWM - VmRSS baseline in a fresh process; loadavg "
             f"{r['env']['loadavg_start'][0]:.1f} -> {r['env']['loadavg_end'][0]:.1f})")
    L.append("")
    L.append("| method | wall (s) | cpu util | peak extra mem | time vs TL | mem vs TL |")
    L.append("|---|---:|---:|---:|---:|---:|")
    def row(name, m):
        L.append(f"| {name} | {m['wall_s']:.2f} | {m['cpu_util']:.2f} | {fmt_mb(m['extra_peak_bytes'])} | "
                 f"{m['wall_s'] / tl['wall_s']:.3f}x | {_ratio(m['extra_peak_bytes'], tl['extra_peak_bytes']):.4f}x |")
    row("(a) ours, `logit_lens(cache=...)`", ours)
    if "ours_fwd" in r:
        row("(a') ours incl. forward pass", r["ours_fwd"])
    row("(b) TL 4.3 `tools.analysis.logit_lens` x3 + reductions", tl)
    pc = tl["pieces_s"]
    L.append("")
    L.append("All timed calls (s): " + "; ".join(
        f"{k} {', '.join(f'{w:.1f}' for w in r[k]['wall_all_s'])}" for k in ("ours", "ours_fwd", "tl") if k in r)
        + ". Peak extra memory is the max over the calls (the first call in each process).")
    if "fused_s" in ours:
        L.append("")
        L.append(f"Ours (default) reduces cache-sized tiles with eager PyTorch: no compile step. The opt-in "
                 f"`fused=True` (torch.compile): first call {ours['fused_first_s']:.2f} s (compile included), then "
                 f"{ours['fused_s']:.2f} s, roofline fraction {s['roofline_time_s'] / ours['fused_s']:.3f}.")
    L.append("")
    L.append(f"TL time split (median): top_k call {pc['top_k_call_s']:.2f} s, targets call "
             f"{pc['targets_call_s']:.2f} s, log_probs call {pc['log_probs_call_s']:.2f} s, KL+entropy reductions "
             f"{pc['reductions_s']:.2f} s (entropy is also in TL's readout.entropy; reduction vs readout max |diff| "
             f"{ag['tl_entropy_reduction_vs_readout_max_abs_diff']:.2e}).")
    L.append("")
    L.append("| check / target | value | target | result |")
    L.append("|---|---:|---:|---|")
    L.append(f"| time ours / TL | {s['time_ratio_ours_vs_tl']:.3f} | <= 0.5 | "
             f"{ok(s['pass']['time_le_0.5x_tl'])} |")
    L.append(f"| peak extra mem ours / TL | {s['mem_ratio_ours_vs_tl']:.4f} | <= 0.25 | "
             f"{ok(s['pass']['mem_le_0.25x_tl'])} |")
    f32 = ours["roofline_interleaved"]
    L.append(f"| roofline fraction (roofline {s['roofline_time_s']:.2f} s / ours) | {s['roofline_fraction']:.3f} | "
             f">= 0.70 | {ok(s['pass']['roofline_ge_70pct'])} (with the best probe: "
             f"{s['roofline_fraction_best_probe']:.3f}; separate probe process: "
             f"{s['roofline_fraction_separate_probe']:.3f}) |")
    L.append(f"| roofline = {s['unembed_flops'] / 1e12:.3f} TFLOP unembedding / fp32 matmul throughput | "
             f"{f32['gflops']:.1f} GFLOP/s (best {f32['gflops_best']:.1f}) | | "
             f"[{f32['rows']},{roof['d_model']}]@[{roof['d_model']},{roof['d_vocab']}], {f32['layout']} layout, "
             f"median of {len(f32['all_s'])} probes between our timed calls, output preallocated |")
    for key in ("float32_nn", "float32_model", "float32_model_alloc", "bfloat16_model", "bfloat16_nn"):
        if key in roof:
            m = roof[key]
            L.append(f"| separate probe: matmul {key} [{m['rows']},{roof['d_model']}]@[{roof['d_model']},{m['cols']}] | "
                     f"{m['gflops']:.2f} GFLOP/s | | {m['gflops'] / s['roofline_gflops']:.3f}x the roofline throughput |")
    L.append(f"| top-5 ids ours == TL (exact order / same set) | {ag['top5_exact_agreement']:.5f} / "
             f"{ag['top5_set_agreement']:.5f} | 1 | |")
    L.append(f"| final-top-1 rank ours == TL | {ag['rank_agreement']:.5f} (max diff {ag['rank_max_abs_diff']}) | 1 | |")
    L.append(f"| KL / entropy max abs diff ours vs TL (nats) | {ag['kl_max_abs_diff']:.2e} / "
             f"{ag['entropy_max_abs_diff']:.2e} | | KL max rel diff {ag['kl_max_rel_diff']:.1e} (KL up to "
             f"{ag['kl_max']:.1f} nats) |")
    if "bf16" in r:
        b = r["bf16"]
        L.append(f"| ours bf16 / fp32 time ({b['seqs']} x {b['positions']} tokens, all rows) | "
                 f"{b['time_ratio_bf16_vs_fp32']:.1f}x ({b['bfloat16']['wall_s']:.2f} s vs "
                 f"{b['float32']['wall_s']:.2f} s) | | |")
        L.append(f"| ours bf16 vs fp32: KL max abs err / top-1 agreement | {b['kl_max_abs_err']:.3g} nats / "
                 f"{b['top1_agreement']:.4f} | | entropy max err {b['entropy_max_abs_err']:.3g}, rank agreement "
                 f"{b['final_top1_rank_agreement']:.4f} |")
    if "profile" in r:
        pr = r["profile"]
        L.append("")
        rg = pr["ranges_s"]
        L.append(f"Profile of ours ({pr['seqs']} x {pr['positions']} tokens, wall {pr['wall_s']:.2f} s; "
                 f"row_stats {rg.get('row_stats', 0):.2f} s, final_row {rg.get('final_row', 0):.2f} s):")
        L.append("")
        L.append("| op | calls | self CPU (s) | share |")
        L.append("|---|---:|---:|---:|")
        mm_flops = 2 * r["agreement"]["rows"] * pr["seqs"] * pr["positions"] * cfg["d_model"] * cfg["d_vocab"]
        for o in pr["top_ops"][:12]:
            L.append(f"| {o['name']} | {o['calls']} | {o['self_cpu_s']:.3f} | "
                     f"{o['self_cpu_s'] / pr['total_self_cpu_s']:.1%}"
                     + (f" ({mm_flops / o['self_cpu_s'] / 1e9:.0f} GFLOP/s)" if o["name"] == "aten::mm" else "") + " |")
    return "\n".join(L)


if __name__ == "__main__":
    main()
