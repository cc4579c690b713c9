"""Benchmark: start-up of the command line on the embedded SmolLM2 (warm model cache), against its anchor.

Anchor: ``import transformer_lens`` plus one forward pass of the prompt (timed in a process that has the model
loaded): the least a TransformerLens tool can cost. The import is taken two ways: the wall time of a fresh
``python -c "import transformer_lens"`` process (interpreter start and exit included, as in our end-to-end number:
the primary anchor) and the import alone, timed inside the process (the stricter one). Ours: ``mi-lenses logit-lens PROMPT`` end to end, in
a fresh process, and its breakdown (imports, each step of ``load_model``, the lens, the table), each measured in fresh
processes, ``--runs`` times; the median is reported with the ratio to the anchor and the CPU model and instruction
sets.

Usage::

    python benchmarks/bench_startup.py            # writes benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_logit_lens import describe_cpu

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"

IMPORT_TL = "import time; t = time.perf_counter(); import transformer_lens; print(time.perf_counter() - t)"
FORWARD = f'''
import json, time, torch, mi_lenses
m = mi_lenses.load_model()
tokens = m.to_tokens({PROMPT!r})
with torch.no_grad():
    m(tokens)
    t = time.perf_counter(); m(tokens); print(json.dumps(time.perf_counter() - t))
'''
BREAKDOWN = f'''
import json, time
T = {{}}
t = time.perf_counter(); import torch; T["import torch"] = time.perf_counter() - t
t = time.perf_counter(); import mi_lenses.cli; T["import mi_lenses (+ its commands)"] = time.perf_counter() - t
t = time.perf_counter(); import transformer_lens; from transformer_lens.model_bridge import TransformerBridge
T["import transformer_lens"] = time.perf_counter() - t
from transformers import AutoModelForCausalLM, AutoTokenizer
from mi_lenses.models import loading
t = time.perf_counter(); folder, bos = loading._converted_gguf(loading.embedded_gguf_path(), loading.cache_root())
T["find the converted model"] = time.perf_counter() - t
t = time.perf_counter(); tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
T["tokenizer"] = time.perf_counter() - t
t = time.perf_counter(); hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
hf.eval(); T["weights (HF model)"] = time.perf_counter() - t
t = time.perf_counter()
m = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32)
T["boot the bridge"] = time.perf_counter() - t
m.cfg.default_prepend_bos = bos; m.eval()  # the CLI's plain logit lens skips compatibility mode (same numbers)
import mi_lenses
t = time.perf_counter(); res = mi_lenses.logit_lens(m, {PROMPT!r}); T["logit lens (forward pass included)"] = time.perf_counter() - t
import io
from rich.console import Console
t = time.perf_counter(); Console(file=io.StringIO(), width=120).print(res.table()); T["table"] = time.perf_counter() - t
print(json.dumps(T))
'''


def run(code_or_argv, runs: int) -> list:
    out = []
    for _ in range(runs):
        argv = code_or_argv if isinstance(code_or_argv, list) else [sys.executable, "-c", code_or_argv]
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "null"
        try:
            out.append((wall, json.loads(last)))
        except json.JSONDecodeError:
            out.append((wall, None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "startup.json"))
    args = ap.parse_args()
    cli = [str(Path(sys.executable).parent / "mi-lenses"), "logit-lens", PROMPT]
    run(cli, 1)  # warm the model cache and the OS file cache
    tl_runs = run(IMPORT_TL, args.runs)
    tl, tl_proc = [r[1] for r in tl_runs], [r[0] for r in tl_runs]
    fwd = [r[1] for r in run(FORWARD, args.runs)]
    ours = [r[0] for r in run(cli, args.runs)]
    parts = [r[1] for r in run(BREAKDOWN, args.runs)]
    anchor = statistics.median(tl_proc) + statistics.median(fwd)
    anchor_inside = statistics.median(tl) + statistics.median(fwd)
    med = statistics.median(ours)
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    print(f"CPU: {describe_cpu()}")
    print(f"anchor: python -c 'import transformer_lens' {statistics.median(tl_proc):.2f} s (the import alone "
          f"{statistics.median(tl):.2f} s) + one forward pass {statistics.median(fwd):.3f} s = {anchor:.2f} s "
          f"({anchor_inside:.2f} s)")
    print(f"ours:   mi-lenses logit-lens {PROMPT!r}: {med:.2f} s (runs {', '.join(f'{t:.2f}' for t in ours)}) "
          f"= {med / anchor:.2f}x the anchor ({med / anchor_inside:.2f}x the import alone + forward; "
          "target <= 1.5x)")
    print("breakdown (median of fresh processes):")
    for k, v in breakdown.items():
        print(f"  {k:<40} {v:6.2f} s")
    out = {"cpu": describe_cpu(), "prompt": PROMPT, "runs": args.runs, "import_transformer_lens_s": tl,
           "import_transformer_lens_process_s": tl_proc, "forward_s": fwd, "anchor_s": anchor,
           "anchor_import_only_s": anchor_inside, "cli_s": ours, "cli_median_s": med, "ratio": med / anchor,
           "ratio_vs_import_only": med / anchor_inside,
           "breakdown_s": breakdown}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
