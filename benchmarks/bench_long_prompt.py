"""Benchmark: the logit lens, DLA and the report on long prompts (4k and 8k tokens) against a plain forward pass.

Issue 27: a 30,000-character prompt (about 7,500 tokens, inside SmolLM2's 8,192-token context) ran past 15 minutes in
``mi-lenses logit-lens``. Each side below runs on the embedded SmolLM2-135M, on the first N tokens of the shipped
training text (``mi_lenses.data.TRAIN_TEXT``, no BOS), in its own fresh process (2 threads), after a warm-up call on
16 tokens:

* **(a) forward**: ``model(tokens)`` under ``torch.no_grad()``, the plain forward pass every ratio is taken to
  (TransformerLens's bridge runs eager attention: it builds every layer's ``[heads, pos, pos]`` scores);
* **(a') forward, fused attention**: the same pass inside ``mi_lenses.models.fused.fused_attention`` (the wrapped
  Hugging Face attention with PyTorch's SDPA), what the lens's own pass runs: the speed of the hardware;
* **(b) run_with_cache**: TransformerLens's ``model.run_with_cache(tokens)`` (every hook: patterns and scores of every
  layer), under an address-space limit (``--as-limit-gib``) so that it fails alone instead of exhausting the shared
  machine's memory;
* **(c) logit lens**: ``mi_lenses.logit_lens(model, tokens)`` with its own forward pass (every row x position: top-5,
  KL, entropy, ranks);
* **(d) DLA**: ``mi_lenses.direct_logit_attribution(model, tokens, answer=<the model's own next token>)`` (its
  forward pass included; the token comes from (a)'s run);
* **(e) report**: ``mi_lenses.report(model, tokens)`` with the default sections (logit lens, identity Patchscope,
  DLA, attention); no HTML in the timed call. Writing the page afterwards (``to_html``) is timed separately. Past
  ``reports.LONG_PROMPT`` (512) tokens the report shows the lenses at the last 512 positions and the attention of the
  last 64 queries (with every head's diagnostics over the whole prompt).

Per side: wall time, CPU time and utilisation (CPU s / (wall s x threads); well below 1 means another process shared
the cores), the peak extra memory of the call (VmHWM - VmRSS around it, as ``bench_logit_lens.measure``) and the
process's peak RSS (``ru_maxrss``: model, Python and torch included). Ratios are to (a), per size.

Usage (from the repo root, venv active; ~40 min on 2 cores)::

    python benchmarks/bench_long_prompt.py                       # 4096 and 8192 tokens -> results/long_prompt.json
    python benchmarks/bench_long_prompt.py --sizes 1024 2048     # quicker, to see the trend
    python benchmarks/bench_long_prompt.py --resume                # after an interruption: the missing sides
    python benchmarks/bench_long_prompt.py --render benchmarks/results/long_prompt.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_logit_lens import add_worker_options, cpu_info, describe_cpu, measure, run_as_worker

REPO = Path(__file__).resolve().parent.parent
SIDES = ("forward", "forward_fused", "run_with_cache", "logit_lens", "dla", "report")
LABELS = {"forward": "(a) model(tokens), no_grad", "forward_fused": "(a') the same, fused attention",
          "run_with_cache": "(b) TL run_with_cache(tokens)", "logit_lens": "(c) mi_lenses.logit_lens",
          "dla": "(d) mi_lenses.direct_logit_attribution", "report": "(e) mi_lenses.report (no HTML)"}
THREADS = 2
GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------------------ worker
def worker(name: str, cfg: dict, out_dir: Path) -> dict:
    """One side at one size (``name`` = ``side@tokens``), in this fresh process."""
    import logging
    import warnings

    import torch

    import mi_lenses
    from mi_lenses.data import TRAIN_TEXT
    from mi_lenses.models.fused import fused_attention
    from mi_lenses.models.view import ModelView

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    side, n = name.split("@")
    model = mi_lenses.load_model()
    view = ModelView(model)
    ids = model.tokenizer(TRAIN_TEXT.read_text(encoding="utf-8")[: 8 * int(n)], add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(ids[: int(n)])[None]
    assert tokens.shape[1] == int(n), f"the shipped text has only {tokens.shape[1]} tokens"
    answer = cfg.get("answer")
    if side == "dla" and answer is None:  # (a) did not run: the model's own next token, untimed
        with torch.no_grad(), fused_attention(view, view.batch(tokens), []):
            answer = int(model(tokens)[0, -1].argmax())

    def call(t):
        if side == "forward":
            with torch.no_grad():
                return model(t)
        if side == "forward_fused":
            with torch.no_grad(), fused_attention(view, view.batch(t), []):
                return model(t)
        if side == "run_with_cache":
            with torch.no_grad():
                return model.run_with_cache(t)
        if side == "logit_lens":
            return mi_lenses.logit_lens(model, t, progress=False)
        if side == "dla":
            return mi_lenses.direct_logit_attribution(model, t, answer=answer, progress=False)
        return mi_lenses.report(model, t, progress=False)

    call(tokens[:, :16])  # warm-up: the decoder, the parity and fused-attention probes, first-call costs
    info: dict = {"side": side, "tokens": int(n), "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": os.getloadavg()}
    try:
        out, wall, cpu, extra, faults = measure(lambda: call(tokens))
    except (MemoryError, RuntimeError) as err:  # (b) under the address-space limit
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {**info, "failed": f"out of memory ({type(err).__name__}: {str(err)[:160]})",
                "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    info.update(wall_s=wall, cpu_s=cpu, cpu_util=cpu / (wall * THREADS), extra_peak_bytes=extra, page_faults=faults,
                loadavg_after=os.getloadavg())
    if side == "forward":
        info["next_token"] = int(out[0, -1].argmax())
    elif side == "report":
        info["seconds"] = out.seconds
        t = time.perf_counter()
        html = out.to_html(out_dir / f"report_{n}.html")
        info["to_html_s"] = time.perf_counter() - t
        info["html_bytes"] = len(html.encode())
        info["prediction"] = out.prediction
    elif side == "dla":
        info["top"] = out.top(3)
    elif side == "logit_lens":
        info["final_top1"] = int(out.final_top1[0, -1])
    del out
    info["process_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return info


# ------------------------------------------------------------------------------------------------ driver
def run_worker(name: str, cfg: dict, out_dir: Path, timeout: float, as_limit: int | None = None) -> dict:
    """One side in a fresh Python process (``as_limit``: an address-space limit in bytes)."""
    res_file = out_dir / f"{name}.json"
    res_file.unlink(missing_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg))
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))) if as_limit else None
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-config",
                           str(out_dir / "config.json"), "--worker-out", str(out_dir)],
                          cwd=REPO, timeout=timeout, capture_output=True, text=True, preexec_fn=limit)
    if proc.returncode != 0 or not res_file.exists():
        tail = proc.stdout[-3000:] + proc.stderr[-3000:]
        if as_limit and ("MemoryError" in tail or "alloc" in tail.lower()):
            return {"failed": f"out of memory under a {as_limit / GiB:.0f} GiB address-space limit"}
        sys.stderr.write(tail)
        raise SystemExit(f"worker {name!r} failed with exit code {proc.returncode}")
    out = json.loads(res_file.read_text())
    out["process_s"] = time.perf_counter() - t
    shown = f"{out['wall_s']:.1f} s" if "wall_s" in out else out["failed"]
    print(f"  [{name}] {shown} (process {out['process_s']:.0f} s)", flush=True)
    return out


def render(report: dict) -> str:
    env = report["env"]
    lines = [f"CPU: {describe_cpu(env['cpu'])}; kernels {env.get('cpu_capability', '?')}; torch {env['torch']}, "
             f"TransformerLens {env['transformer_lens']}, transformers {env['transformers']}; {THREADS} threads; "
             f"load average at start {', '.join(f'{x:.1f}' for x in env['loadavg_start'])}"]
    for size, sides in report["sizes"].items():
        base = sides.get("forward", {})
        lines.append(f"\n{size} tokens of the shipped text (SmolLM2-135M, 30 layers, 9 heads):")
        lines.append(f"   {'side':<42} {'wall s':>8} {'x (a)':>7} {'CPU s':>8} {'CPU x (a)':>9} {'util':>5} "
                     f"{'peak extra':>11} {'process peak':>13}")
        for side in SIDES:
            r = sides.get(side)
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"   {LABELS[side]:<42} {r['failed']}")
                continue
            ratio = r["wall_s"] / base["wall_s"] if "wall_s" in base else float("nan")
            cpu_ratio = r["cpu_s"] / base["cpu_s"] if "cpu_s" in base else float("nan")
            lines.append(f"   {LABELS[side]:<42} {r['wall_s']:8.1f} {ratio:7.2f} {r['cpu_s']:8.1f} {cpu_ratio:9.2f} "
                         f"{r['cpu_util']:5.2f} {r['extra_peak_bytes'] / MiB:9.0f} M "
                         f"{r['process_peak_bytes'] / MiB:11.0f} M")
        rep = sides.get("report", {})
        if "seconds" in rep:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in rep["seconds"].items())
            lines.append(f"   report sections: {parts}; to_html afterwards {rep['to_html_s']:.1f} s "
                         f"({rep['html_bytes'] / MiB:.1f} MiB page)")
    lines.append("   (x (a): wall time, then CPU time, over the plain forward pass's; util < 1: another process shared "
                 "the cores, CPU s is then the fairer measure; peak extra: VmHWM - VmRSS around the call)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--as-limit-gib", type=float, default=16.0,
                   help="address-space limit of the run_with_cache side (it fails alone past it)")
    p.add_argument("--side-limit-gib", type=float, default=22.0,
                   help="address-space limit of the other sides (a safety net on a shared machine)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    p.add_argument("--resume", action="store_true",
                   help="keep the sides an interrupted run measured (its .partial.json) and run the others")
    add_worker_options(p, "benchmarks/results/long_prompt.json")
    args = p.parse_args()
    if run_as_worker(args, worker):
        return
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return

    import torch
    import transformers
    from importlib.metadata import version

    report: dict = {"env": {"cpu": cpu_info(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "transformer_lens": version("transformer-lens"),
                            "nproc": os.cpu_count(), "loadavg_start": os.getloadavg()},
                    "sizes": {}}
    path = (REPO / args.json) if not Path(args.json).is_absolute() else Path(args.json)
    partial = path.with_suffix(".partial.json")
    if args.resume and partial.is_file():
        report["sizes"] = json.loads(partial.read_text())["sizes"]
        report["env"]["resumed"] = True
    print(f"CPU: {describe_cpu()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_long_prompt_") as tmp:
        out_dir = Path(tmp)
        for n in args.sizes:
            sides: dict = report["sizes"].setdefault(str(n), {})
            for side in [s for s in SIDES if s in args.sides]:
                if side not in sides:
                    limit = int((args.as_limit_gib if side == "run_with_cache" else args.side_limit_gib) * GiB)
                    answer = sides.get("forward", {}).get("next_token")
                    sides[side] = run_worker(f"{side}@{n}", {"answer": answer}, out_dir, args.timeout,
                                             as_limit=limit)
                    partial.write_text(json.dumps(report, indent=2))
    report["env"]["loadavg_end"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    partial.unlink(missing_ok=True)
    print(render(report))
    print(f"\nwrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
