"""Benchmark: loading and the all-layer logit lens on a Llama-3.2-1B-shaped model, side by side in one run.

The model: random weights from a ``LlamaConfig`` (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 128256, tied embeddings; 1.236e9 parameters, 4.6 GiB of float32), saved once to ``--folder`` (default
``~/.cache/mi_lenses/bench/llama-1b-shaped``; building it takes ~1 min and ~6 GiB; no hub). Its tokenizer is the
embedded SmolLM2's (ids < 49152, all valid here).

Sections (every one in fresh subprocesses, one at a time):

1. **Load peak memory** (VmHWM of the loading process, i.e. the resident peak since the process started, Python and
   torch included), load time, and the peak after a first forward pass (weights are memory-mapped: a load that never
   touches them looks cheaper than it is):
   * ``ours_default``: ``mi_lenses.load_model(folder)`` with default settings (``compatibility_mode="auto"``: raw
     above 2 GiB of weights, with the parity probe);
   * ``ours_no_probe``: the same with ``check_parity=False`` (what the probe costs at this size);
   * ``ours_bf16``: ``load_model(folder, dtype=torch.bfloat16)``;
   * ``tl_raw``: ``TransformerBridge.boot_transformers(folder, hf_model=...)``;
   * ``tl_compat``: the same plus ``enable_compatibility_mode()`` (what ``load_model(compatibility_mode=True)`` costs).
2. **All-layer logit lens over 1 x 1024 tokens** (17 rows: embed, 15 ``resid_pre``, final) of the shipped evaluation
   text, on the ``ours_default`` model; each side in its own process (one side's freed temporaries can fragment the
   heap for the other's), reading an activation cache of the same tokens:
   * ours: ``mi_lenses.logit_lens(model, tokens, cache=cache, logits=logits, top_k=5, check=False)`` (top-5 ids and
     logits, entropy, KL to the final row, rank of the final top-1, cross-entropy);
   * ours with its own forward pass (``cache=None``);
   * TransformerLens 4.3: ``transformer_lens.tools.analysis.logit_lens(model, cache=cache, positions=None, top_k=5)``
     (top-5 ids and values, entropy; no KL: that needs ``return_type="log_probs"``, 17 x 1024 x 128256 floats = 8.3
     GiB, which this 24 GiB machine shared with others cannot hold next to the model);
   * the fp32 roofline: 2 x 17 x 1024 x 2048 x 128256 FLOP over the measured fp32 ``[1024, 2048] @ [2048, 128256]``
     throughput (``bench_logit_lens.worker_roofline``, both weight layouts, the faster one).
   Wall time is the median of ``--repeats`` calls after a warm-up on 16 tokens; peak extra memory is VmHWM - VmRSS
   around each call (``bench_logit_lens.measure``). The top-5 ids of both sides are compared.
3. **The parity probe's cost** on small models: ``load_model`` with and without ``check_parity``, alternating, in fresh
   processes (``--probe-repeats`` each), on the embedded SmolLM2-135M and on a tiny random Llama (2 layers, d_model 64).

Usage (from the repo root, venv active; ~15 min on 2 cores; needs ~19 GiB free for ``tl_compat``)::

    python benchmarks/bench_scale.py                      # everything, writes benchmarks/results/scale.json
    python benchmarks/bench_scale.py --skip tl_compat     # without the 18 GiB TransformerLens fold
    python benchmarks/bench_scale.py --render benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_logit_lens import (add_worker_options, cpu_info, describe_cpu, load_tokens, measure, run_as_worker,
                              worker_roofline)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = Path.home() / ".cache" / "mi_lenses" / "bench" / "llama-1b-shaped"
DEFAULT_DATA = "mi_lenses/data/shakespeare_eval.txt"
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048,
             rope_theta=500000.0, rms_norm_eps=1e-5)
LOADS = ("ours_default", "ours_no_probe", "ours_bf16", "tl_raw", "tl_compat")
TARGET_LOAD_RATIO = 1.5  # default load peak <= 1.5 x the float32 weight bytes
GiB = 2**30


# ------------------------------------------------------------------------------------------------ models
def embedded_tokenizer_folder() -> Path:
    """The converted embedded SmolLM2 folder (converted once by load_model if missing)."""
    from mi_lenses.models.loading import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    if not (folder / "tokenizer_config.json").is_file():
        import mi_lenses

        mi_lenses.load_model(check_parity=False)
    return folder


def build_big(folder: Path) -> None:
    """The 1B-shaped random Llama, saved to ``folder`` (once)."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"building the 1B-shaped model in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(embedded_tokenizer_folder()).save_pretrained(tmp)
    tmp.rename(folder)


def build_tiny(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_folder())
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
                     ).save_pretrained(folder)
    tok.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------ workers
def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quiet() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)


def worker_load(name: str, cfg: dict) -> dict:
    import torch

    _quiet()
    base = _hwm()
    t0 = time.perf_counter()
    info: dict = {"method": name, "baseline_hwm_bytes": base}
    if name.startswith(("ours", "probe")):
        import mi_lenses

        # ours_*: the 1B-shaped model; probe_{tiny,smol}_{on,off}: a tiny Llama / the embedded SmolLM2
        folder = {"probe_tiny": cfg["tiny_folder"], "probe_smol": None}.get(name.rsplit("_", 1)[0], cfg["folder"])
        kw: dict = {"check_parity": not name.endswith(("_off", "_no_probe"))}
        if name == "ours_bf16":
            kw["dtype"] = torch.bfloat16
        model = mi_lenses.load_model(folder, **kw)
        report = mi_lenses.parity_report(model)
        info.update(mode="compat" if model.compatibility_mode else "raw", parity=str(report),
                    parity_seconds=report.seconds, parity_gap=report.gap)
    else:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = cfg["folder"]
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(
            folder), device="cpu", dtype=torch.float32)
        if name == "tl_compat":
            model.enable_compatibility_mode(disable_warnings=True)
        model.eval()
        info["mode"] = "compat" if name == "tl_compat" else "raw"
    info["load_s"] = time.perf_counter() - t0
    info["load_peak_bytes"] = _hwm()
    params = list({p.data_ptr(): p for p in model.parameters()}.values())
    info["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    t1 = time.perf_counter()
    with torch.no_grad():  # the first forward pages the memory-mapped weights in (the probe already did)
        model(torch.arange(1, 9)[None])
    info["first_forward_s"] = time.perf_counter() - t1
    info["after_forward_peak_bytes"] = _hwm()
    return info


def worker_lens(name: str, cfg: dict, out_dir: Path) -> dict:
    """``lens_ours`` (ours on the shared cache, then ours with its own forward pass) or ``lens_tl`` (TL's logit_lens),
    each in its own process: after one side's big temporaries, the other's 32 MB chunks can fragment the heap (a TL
    call after ours once grew to 20 GiB)."""
    import torch
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    import mi_lenses

    _quiet()
    t0 = time.perf_counter()
    model = mi_lenses.load_model(cfg["folder"])
    info: dict = {"method": name, "load_s": time.perf_counter() - t0, "mode": "compat" if model.compatibility_mode
                  else "raw", "d_model": int(model.cfg.d_model), "d_vocab": int(model.W_U.shape[-1]),
                  "n_layers": int(model.cfg.n_layers), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()}
    tokens = load_tokens(model.tokenizer, Path(cfg["data"]), 1, cfg["seq_len"])
    keep = lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_post")  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=keep)
        wlogits, wcache = model.run_with_cache(tokens[:, :16], names_filter=keep)
    if name == "lens_ours":
        ours = lambda c, lg, t: (lambda: mi_lenses.logit_lens(model, t, cache=c, logits=lg, top_k=5,  # noqa: E731
                                                              check=False))
        ours(wcache, wlogits, tokens[:, :16])()  # warm-ups (the decoder is built here, once per model)
        mi_lenses.logit_lens(model, tokens[:, :16], top_k=5, check=False)
        methods = (("ours", ours(cache, logits, tokens), cfg["repeats"]),
                   ("ours_fwd", lambda: mi_lenses.logit_lens(model, tokens, top_k=5, check=False), 1))
    else:
        tl = lambda c: (lambda: tl_logit_lens(model, cache=c, positions=None, top_k=5))  # noqa: E731
        tl(wcache)()
        methods = (("tl", tl(cache), cfg["repeats"]),)
    runs: dict = {}
    for label, fn, repeats in methods:
        walls, extras, cpus = [], [], []
        for i in range(repeats):
            out, wall, cpu, extra, _ = measure(fn)
            walls.append(wall)
            extras.append(extra)
            cpus.append(cpu)
            if i == 0 and label == "ours":
                torch.save({"top_ids": out.top_ids[:, 0].clone(), "rows": len(out.labels)}, out_dir / "ours_ids.pt")
            elif i == 0 and label == "tl":
                torch.save({"top_ids": out.readout.top_ids.clone()}, out_dir / "tl_ids.pt")
            del out
        runs[label] = {"wall_s": statistics.median(walls), "wall_all_s": walls, "extra_peak_bytes": max(extras),
                       "cpu_s": statistics.median(cpus),
                       "cpu_util": statistics.median(c / (w * info["threads"]) for c, w in zip(cpus, walls))}
    info.update(runs=runs, tokens=int(tokens.shape[-1]), process_peak_bytes=_hwm())
    return info


def compare_lens(out_dir: Path, ours: dict, tl: dict) -> dict:
    """Both lens workers' results side by side, and the agreement of their top-5 ids."""
    import torch

    a, b = torch.load(out_dir / "ours_ids.pt"), torch.load(out_dir / "tl_ids.pt")
    ours_ids = a["top_ids"]  # [R, P, 5]
    tl_ids = b["top_ids"].reshape(ours_ids.shape)
    return {**{k: ours[k] for k in ("mode", "d_model", "d_vocab", "n_layers", "threads", "tokens")},
            "rows": a["rows"], "runs": {**ours["runs"], **tl["runs"]},
            "process_peak_bytes": {"ours": ours["process_peak_bytes"], "tl": tl["process_peak_bytes"]},
            "top5_exact_agreement": float((ours_ids == tl_ids).all(-1).float().mean()),
            "top1_agreement": float((ours_ids[..., 0] == tl_ids[..., 0]).float().mean())}


def worker(name: str, cfg: dict, out_dir: Path) -> dict:
    if name == "roofline":  # with the share of the cores it got (the machine may be shared)
        import torch

        t, c = time.perf_counter(), time.process_time()
        out = worker_roofline(cfg)
        out["cpu_util"] = (time.process_time() - c) / ((time.perf_counter() - t) * torch.get_num_threads())
        return out
    if name.startswith("lens_"):
        return worker_lens(name, cfg, out_dir)
    return worker_load(name, cfg)


def run_worker(name: str, cfg: dict, out_dir: Path, timeout: float, as_limit: int | None = None) -> dict:
    """One worker in a fresh Python process; its peak RSS is also read from ``RUSAGE_CHILDREN``. ``as_limit``: an
    address-space limit (bytes), so a worker that would exhaust the machine's memory fails alone (the machine is
    shared) instead of waking the OOM killer; its failure is then recorded, not raised."""
    res_file = out_dir / f"{name}.json"
    res_file.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))) if as_limit else None
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-config",
                           str(out_dir / "config.json"), "--worker-out", str(out_dir)],
                          cwd=REPO, timeout=timeout, capture_output=True, text=True, preexec_fn=limit)
    if proc.returncode != 0 or not res_file.exists():
        tail = proc.stdout[-3000:] + proc.stderr[-3000:]
        if as_limit and ("MemoryError" in tail or "alloc" in tail.lower()):
            print(f"  [{name}] failed under the {as_limit / GiB:.0f} GiB address-space limit", flush=True)
            return {"failed": f"out of memory under a {as_limit / GiB:.1f} GiB address-space limit",
                    "tail": tail[-500:]}
        sys.stderr.write(tail)
        raise SystemExit(f"worker {name!r} failed with exit code {proc.returncode}")
    out = json.loads(res_file.read_text())
    out["process_s"] = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["children_maxrss_bytes"] = after * 1024 if after > before else None  # the largest child so far
    print(f"  [{name}] {out['process_s']:.0f} s", flush=True)
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------------ report
def render(report: dict) -> str:
    lines = [f"CPU: {describe_cpu(report['env']['cpu'])}; torch {report['env']['torch']}, "
             f"TransformerLens {report['env']['transformer_lens']}, transformers {report['env']['transformers']}"]
    w = report["summary"]["weight_bytes_float32"]
    lines.append(f"\n1. Load, 1B-shaped Llama ({w / GiB:.2f} GiB of float32 weights); peaks are the loading process's "
                 "resident high-water mark")
    lines.append(f"   {'method':<15} {'mode':<7} {'load s':>7} {'+1st fwd':>8} {'load peak':>10} {'x weights':>9} "
                 f"{'after fwd':>10} {'x weights':>9}")
    for name in LOADS:
        r = report.get("loads", {}).get(name)
        if r is None or "failed" in r:
            if r is not None or f"{name}_skipped" in report.get("loads", {}):
                lines.append(f"   {name:<15} {r['failed'] if r else 'skipped: ' + report['loads'][name + '_skipped']}")
            continue
        lines.append(f"   {name:<15} {r['mode']:<7} {r['load_s']:7.1f} {r.get('first_forward_s', float('nan')):8.1f} "
                     f"{r['load_peak_bytes'] / GiB:9.2f}G "
                     f"{r['load_peak_bytes'] / w:9.2f} {r['after_forward_peak_bytes'] / GiB:9.2f}G "
                     f"{r['after_forward_peak_bytes'] / w:9.2f}")
    s = report["summary"]
    if "default_load_ratio" in s:
        lines.append(f"   default: peak {s['default_peak_ratio']:.2f}x the weights (target <= {TARGET_LOAD_RATIO}): "
                     f"{'PASS' if s['default_peak_ratio'] <= TARGET_LOAD_RATIO else 'FAIL'}")
    lens = report.get("lens")
    if lens and "failed" in lens:
        lines.append(f"\n2. All-layer logit lens: {lens['failed']}")
    elif lens:
        lines.append(f"\n2. All-layer logit lens, {lens['rows']} rows x {lens['tokens']} tokens, vocab "
                     f"{lens['d_vocab']}, model {lens['mode']} ({lens['threads']} threads)")
        for label, what in (("ours", "mi_lenses (cache given)"), ("ours_fwd", "mi_lenses (own forward)"),
                            ("tl", "TL 4.3 logit_lens top_k=5")):
            r = lens["runs"][label]
            lines.append(f"   {what:<28} {r['wall_s']:7.1f} s  ({r.get('cpu_s', float('nan')):6.1f} CPU s)  peak "
                         f"+{r['extra_peak_bytes'] / GiB:5.2f} GiB  cpu_util {r['cpu_util']:.2f}")
        lines.append(f"   fp32 roofline {s['roofline_time_s']:.1f} s ({s['roofline_gflops']:.0f} GFLOP/s at cpu_util "
                     f"{s.get('roofline_cpu_util', float('nan')):.2f}): ours at {s['roofline_fraction']:.0%} of it; "
                     f"ours / TL time {s['time_ratio_ours_vs_tl']:.2f} (CPU time "
                     f"{s.get('cpu_ratio_ours_vs_tl', float('nan')):.2f}), memory {s['mem_ratio_ours_vs_tl']:.2f}; "
                     f"top-5 ids agree {lens['top5_exact_agreement']:.2%}, top-1 {lens['top1_agreement']:.2%}")
        lines.append("   (cpu_util < 1: other processes shared the 2 cores; CPU seconds are the fairer comparison then)")
    probe = report.get("probe")
    if probe:
        lines.append("\n3. Parity probe cost: load_model with / without check_parity (median of "
                     f"{probe['repeats']} fresh processes)")
        for model, r in probe["models"].items():
            lines.append(f"   {model:<10} on {r['on_s']:6.2f} s  off {r['off_s']:6.2f} s  extra {r['on_s'] - r['off_s']:+.2f} s "
                         f"(probe itself {r['probe_s'] * 1000:.0f} ms, gap {r['gap']:.2g} nats)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(DEFAULT_FOLDER), help="where the 1B-shaped model is (built if missing)")
    p.add_argument("--data", default=DEFAULT_DATA, help="text for the lens tokens")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="timed lens calls per side")
    p.add_argument("--probe-repeats", type=int, default=3, help="fresh processes per probe-cost measurement")
    p.add_argument("--skip", nargs="*", default=[], help=f"sections or loads to skip: {', '.join(LOADS)}, lens, "
                   "roofline, probe")
    p.add_argument("--timeout", type=float, default=3600)
    add_worker_options(p, "benchmarks/results/scale.json")
    args = p.parse_args()
    if run_as_worker(args, worker):
        return
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return

    import torch
    import transformers
    from importlib.metadata import version

    folder = Path(args.folder).expanduser()
    build_big(folder)
    data = (REPO / args.data) if not Path(args.data).is_absolute() else Path(args.data)
    t_start = time.perf_counter()
    report: dict = {"env": {"cpu": cpu_info(), "python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "transformer_lens": version("transformer-lens"),
                            "nproc": os.cpu_count(), "loadavg_start": os.getloadavg()},
                    "loads": {}}
    hf_cfg = json.loads((folder / "config.json").read_text())
    d, V, L, F = hf_cfg["hidden_size"], hf_cfg["vocab_size"], hf_cfg["num_hidden_layers"], hf_cfg["intermediate_size"]
    kv = hf_cfg["num_key_value_heads"] * d // hf_cfg["num_attention_heads"]
    n_params = V * d + L * (2 * d * d + 2 * d * kv + 3 * d * F + 2 * d) + d  # tied embeddings
    weight_bytes = 4 * n_params
    path = (REPO / args.json) if not Path(args.json).is_absolute() else Path(args.json)
    partial = path.with_suffix(".partial.json")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        out_dir = Path(tmp)
        tiny = out_dir / "tiny"
        build_tiny(tiny)
        cfg = {"folder": str(folder), "tiny_folder": str(tiny), "data": str(data), "seq_len": args.seq_len,
               "repeats": args.repeats, "d_model": d, "d_vocab": V, "roofline_rows": args.seq_len,
               "roofline_repeats": 5, "bf16_matmul_rows": 0, "bf16_matmul_repeats": 0}
        (out_dir / "config.json").write_text(json.dumps(cfg))
        print(f"CPU: {describe_cpu()}\n1. loads ...", flush=True)
        for name in LOADS:
            if name in args.skip:
                continue
            free = _mem_available()
            if name == "tl_compat" and free < 4.2 * weight_bytes:
                print(f"  [tl_compat] skipped: {free / GiB:.1f} GiB available, it needs ~{3.9 * weight_bytes / GiB:.0f}")
                report["loads"]["tl_compat_skipped"] = f"{free / GiB:.1f} GiB available"
                continue
            # every load may take at most what is free now, less 1 GiB for the others on this machine
            report["loads"][name] = run_worker(name, cfg, out_dir, args.timeout, as_limit=free - GiB + 6 * GiB)
            partial.write_text(json.dumps(report, indent=2))  # a later section may fail: keep what was measured
        if "roofline" not in args.skip and "lens" not in args.skip:
            print("2. lens ...", flush=True)
            report["roofline"] = run_worker("roofline", cfg, out_dir, args.timeout)
            sides = {side: run_worker(side, cfg, out_dir, args.timeout, as_limit=_mem_available() + 4 * GiB)
                     for side in ("lens_ours", "lens_tl")}
            failed = [f"{k}: {v['failed']}" for k, v in sides.items() if "failed" in v]
            report["lens"] = {"failed": "; ".join(failed)} if failed else compare_lens(out_dir, *sides.values())
            partial.write_text(json.dumps(report, indent=2))
        if "probe" not in args.skip:
            print("3. probe cost ...", flush=True)
            probe: dict = {"repeats": args.probe_repeats, "models": {}}
            for model in ("tiny", "smol"):
                on, off, seconds, gap = [], [], [], 0.0
                for _ in range(args.probe_repeats):
                    a = run_worker(f"probe_{model}_on", cfg, out_dir, args.timeout)
                    b = run_worker(f"probe_{model}_off", cfg, out_dir, args.timeout)
                    on.append(a["load_s"])
                    off.append(b["load_s"])
                    seconds.append(a["parity_seconds"])
                    gap = a["parity_gap"]
                probe["models"][model] = {"on_s": statistics.median(on), "off_s": statistics.median(off),
                                          "on_all_s": on, "off_all_s": off, "probe_s": statistics.median(seconds),
                                          "gap": gap}
            report["probe"] = probe
    summary: dict = {"weight_bytes_float32": weight_bytes, "n_params": n_params}
    if "ours_default" in report["loads"]:
        r = report["loads"]["ours_default"]
        summary["default_load_ratio"] = r["load_peak_bytes"] / weight_bytes
        summary["default_peak_ratio"] = max(r["load_peak_bytes"], r["after_forward_peak_bytes"]) / weight_bytes
    if "lens" in report and "failed" not in report["lens"]:
        lens, roof = report["lens"], report["roofline"]["float32"]
        flops = 2 * lens["rows"] * lens["tokens"] * d * V
        summary.update(unembed_flops=flops, roofline_gflops=roof["gflops"],
                       roofline_time_s=flops / (roof["gflops"] * 1e9),
                       roofline_fraction=flops / (roof["gflops"] * 1e9) / lens["runs"]["ours"]["wall_s"],
                       time_ratio_ours_vs_tl=lens["runs"]["ours"]["wall_s"] / lens["runs"]["tl"]["wall_s"],
                       mem_ratio_ours_vs_tl=lens["runs"]["ours"]["extra_peak_bytes"]
                       / max(1, lens["runs"]["tl"]["extra_peak_bytes"]),
                       roofline_cpu_util=report["roofline"].get("cpu_util"),
                       cpu_ratio_ours_vs_tl=lens["runs"]["ours"]["cpu_s"] / lens["runs"]["tl"]["cpu_s"])
    report["summary"] = summary
    report["env"].update(loadavg_end=os.getloadavg(), total_runtime_s=time.perf_counter() - t_start)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    partial.unlink(missing_ok=True)
    print(render(report))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
