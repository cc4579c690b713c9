"""Benchmark: our tuned-lens training vs ``tuned-lens`` 0.2.0's trainer, side by side in one run.

Same HF model (the embedded SmolLM2-135M, de-quantised to float32), same packed WikiText-2 sequences in the same
order, same number of steps and tokens per step, the paper's SGD recipe for both. Their training loop
(``tuned_lens.scripts.train_loop.Train.execute``) runs unmodified in this process; only its setup (model/data loading
through ``datasets``/``torchdata``, whose ``dataloader2`` no longer exists in torchdata 0.11) is replaced by handing it
the model, its own ``TunedLens``/optimizer/scheduler and the batches. Then every lens is evaluated on the same
held-out WikiText-2 test tokens with the same code (per-layer KL to the model's output, bits).

Rows: ``tuned-lens 0.2.0 (fp32)``: their loop with its hard-coded bf16 autocast switched off (on CPUs without native
bf16 a bf16 matmul is ~100x slower than float32 and their loop as shipped would need hours per step); their bf16
per-layer step is timed separately on one layer (``their_bf16_layer_step``). ``ours`` (same recipe, zero init,
float32); ``ours + warm start`` (least-squares warm start on --warm-tokens tokens, then the same steps). With
``--with-bf16-run`` (CPUs with AVX512_BF16 or AMX): ``tuned-lens 0.2.0 as shipped`` (its bf16 autocast) and ``ours
bf16`` (``bf16=True``), the equal-precision pair. Our own bf16 layer step is timed against float32 with its error
(``bf16_layer_step``). Time to quality: the wall time of our fastest run (including a least-squares warm start on
only ``--ttq-warm-tokens`` tokens) that reaches the held-out KL their trainer ended at. CPU utilisation = CPU seconds / (wall x threads) for each phase; the CPU model and instruction sets are
printed and recorded.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_lens.py --steps 2 --tokens-per-step 256 --eval-tokens 512
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from bench_logit_lens import cpu_info, describe_cpu

ROOT = Path(__file__).resolve().parents[1]
THEIRS = "tuned-lens 0.2.0 (fp32)"
THEIRS_BF16 = "tuned-lens 0.2.0 as shipped (bf16 autocast)"
TRAIN = ROOT / "mi_lenses" / "data" / "shakespeare_train.txt"  # shipped; --train-data / --eval-data for WikiText
EVAL = ROOT / "mi_lenses" / "data" / "shakespeare_eval.txt"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        self.util = (cpu_s() - self.c) / (self.wall * torch.get_num_threads())


def import_their_train_loop():
    """tuned-lens 0.2.0's train loop imports ``torchdata.dataloader2``, gone in torchdata 0.11: stub the names it
    imports (only used by the setup we replace)."""
    import torchdata

    dl2 = types.ModuleType("torchdata.dataloader2")
    dl2.DataLoader2 = object
    dl2.DistributedReadingService = object
    dp = types.ModuleType("torchdata.datapipes")
    dp.iter = types.SimpleNamespace(IterableWrapper=None)
    sys.modules.setdefault("torchdata.dataloader2", dl2)
    sys.modules.setdefault("torchdata.datapipes", dp)
    torchdata.dataloader2, torchdata.datapipes = dl2, dp
    import tuned_lens.model_surgery as ms

    ms._transformer_lens_available = False  # tuned-lens 0.2.0 crashes probing TL 4.x's HookedTransformer
    import tuned_lens.scripts.ingredients as ing
    import tuned_lens.scripts.train_loop as tl_loop

    return ing, tl_loop


_REAL_AUTOCAST = torch.autocast


class _NoAutocast:
    """Stands in for ``torch.autocast`` inside their loop: runs it in float32 (their bf16 autocast is ~100x slower
    than float32 on CPUs without native bf16 matmul)."""

    def __init__(self, *args, **kwargs):
        self.ctx = _REAL_AUTOCAST("cpu", enabled=False)

    def __enter__(self):
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def train_theirs(hf, folder, batches, steps, tokens_per_step, micro, out, fp32=True):
    ing, tl_loop = import_their_train_loop()
    from tuned_lens.nn.lenses import TunedLens as TheirLens

    lens = TheirLens.from_model(hf)
    opt_cfg = ing.Optimizer()
    params = [p for p in lens.parameters() if p.requires_grad]
    opt = opt_cfg.create_optim(params)
    sched = opt_cfg.create_scheduler(opt, steps)
    train = tl_loop.Train(
        model=ing.Model(name=str(folder)), data=ing.Data(name=["unused"]), opt=opt_cfg,
        dist=ing.Distributed(per_gpu_batch_size=micro), output=Path(out), num_steps=steps,
        tokens_per_step=tokens_per_step,
    )
    grad_acc = train.calculate_gradient_accumulation_steps(batches[0]["input_ids"].shape[1])
    state = tl_loop.State(dataloader=batches, lens=lens, opt=opt, scheduler=sched, wandb_id=None, nats_to_bpb=1.0)
    train.setup = lambda: (state, hf, grad_acc)
    real = _REAL_AUTOCAST
    if fp32:
        torch.autocast = _NoAutocast  # their loop calls th.autocast(device, dtype=bfloat16) around each layer
    try:
        with Timer() as t:
            train.execute()
    finally:
        torch.autocast = real
    return t


def their_bf16_layer(hf, tokens, layer=15, positions=64):
    """Their per-layer step as shipped (bf16 autocast, their loss expression) for one layer, timed; float32 for
    comparison. The three lines inside are copied from ``tuned_lens/scripts/train_loop.py``."""
    from tuned_lens.nn.lenses import TunedLens as TheirLens

    lens = TheirLens.from_model(hf)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    h = out.hidden_states[layer][:, :positions]
    labels = out.logits[:, :positions].float().log_softmax(-1)
    res = {}
    for name, enabled in (("float32", False), ("bfloat16 autocast", True)):
        lens.zero_grad()
        with Timer() as t:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                logits = lens(h, idx=layer)
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        res[name] = {"s": t.wall, "cpu_util": t.util}
    res["tokens"] = int(h.shape[0] * h.shape[1])
    res["bf16_slowdown"] = res["bfloat16 autocast"]["s"] / res["float32"]["s"]
    return res


def bf16_check(model, tokens, lens, layers=(15,), positions=64) -> dict:
    """Time one layer's KL forward+backward in float32 and bf16 on the same tokens; report the KL and gradient error."""
    from mi_lenses.lenses.tuned.train import _Objective
    from mi_lenses.models.view import ModelView

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        obj = _Objective(ModelView(model), dtype)
        hs = [h[:positions] for h in obj.hidden(tokens)]
        target = obj.final(hs[-1])
        lens.zero_grad()
        kls = []
        with Timer() as t:
            for i in layers:
                kls.append(obj.layer_step(lens, i, hs[i], target, 1.0 / len(target.p)) / len(target.p) / math.log(2))
        out[name] = {"s_per_layer": t.wall / len(layers), "cpu_util": t.util, "kl_bits": kls,
                     "grad": lens.weight.grad.clone()}
    g32, g16 = out["float32"].pop("grad"), out["bfloat16"].pop("grad")
    out["grad_rel_err"] = float((g16 - g32).norm() / g32.norm())
    out["kl_abs_err_bits"] = max(abs(a - b) for a, b in zip(out["float32"]["kl_bits"], out["bfloat16"]["kl_bits"]))
    out["bf16_slowdown"] = out["bfloat16"]["s_per_layer"] / out["float32"]["s_per_layer"]
    out["tokens"] = positions
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-data", default=str(TRAIN))
    ap.add_argument("--eval-data", default=str(EVAL))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tokens-per-step", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warm-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--ttq-warm-tokens", type=int, default=256,
                    help="a second, small least-squares warm start (no KL steps), for time to quality")
    ap.add_argument("--with-bf16-run", action="store_true",
                    help="also full bf16 training rows: theirs as shipped (bf16 autocast) and ours with bf16=True "
                         "(slow on CPUs without native bf16)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "tuned_lens.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import mi_lenses
    from mi_lenses import evaluate_lens, load_lens, train_lens
    from mi_lenses.data import load_tokens
    from mi_lenses.lenses.tuned.train import _step_sequences
    from mi_lenses.models.loading import converted_folder, embedded_gguf_path
    from mi_lenses.atomic import write_atomic

    torch.manual_seed(0)
    model = mi_lenses.load_model()
    folder = converted_folder(embedded_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    tokens = load_tokens(args.train_data, model, args.seq_len)
    held = load_tokens(args.eval_data, model, args.seq_len, max_tokens=args.eval_tokens)
    seqs = args.tokens_per_step // args.seq_len
    order = torch.cat([_step_sequences(len(tokens), seqs, s, 0) for s in range(args.steps)])
    batches = [{"input_ids": tokens[order[i : i + args.micro_batch]]} for i in range(0, len(order), args.micro_batch)]
    n_train = args.steps * args.tokens_per_step
    L, d, V = model.cfg.n_layers, model.cfg.d_model, model.W_U.shape[-1]
    cpu = cpu_info()
    print(f"CPU {describe_cpu(cpu)}; kernels {torch.backends.cpu.get_cpu_capability()}")
    print(f"SmolLM2-135M: {L} layers, d_model {d}, vocab {V}; {args.steps} steps x {args.tokens_per_step} tokens; "
          f"threads {torch.get_num_threads()}", flush=True)

    rows: dict[str, dict] = {}
    lenses = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = train_theirs(hf, folder, batches, args.steps, args.tokens_per_step, args.micro_batch, Path(tmp) / "theirs")
        rows[THEIRS] = {"train_s": t.wall, "cpu_util": t.util, "tokens_per_s": n_train / t.wall}
        lenses[THEIRS] = load_lens(Path(tmp) / "theirs", model)
        print("theirs", rows[THEIRS], flush=True)
        their_bf16 = their_bf16_layer(hf, tokens[:1])
        print("their per-layer step, one layer, fp32 vs bf16 autocast:", their_bf16, flush=True)
        if args.with_bf16_run:
            t = train_theirs(hf, folder, batches, args.steps, args.tokens_per_step, args.micro_batch,
                             Path(tmp) / "theirs_bf16", fp32=False)
            rows[THEIRS_BF16] = {"train_s": t.wall, "cpu_util": t.util, "tokens_per_s": n_train / t.wall}
            lenses[THEIRS_BF16] = load_lens(Path(tmp) / "theirs_bf16", model)
            print("theirs as shipped", rows[THEIRS_BF16], flush=True)

        kw = dict(steps=args.steps, tokens_per_step=args.tokens_per_step, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, progress=False)
        variants = [("ours", dict(warm_start_tokens=0)), ("ours bf16", dict(warm_start_tokens=0, bf16=True)),
                    ("ours warm start only", dict(warm_start_tokens=args.warm_tokens, steps=0)),
                    (f"ours warm start only, {args.ttq_warm_tokens} tok",
                     dict(warm_start_tokens=args.ttq_warm_tokens, steps=0)),
                    ("ours + warm start", dict(warm_start_tokens=args.warm_tokens))]
        if not args.with_bf16_run:
            variants = [v for v in variants if v[0] != "ours bf16"]
        for name, extra in variants:
            with Timer() as t:
                lens = train_lens(model, tokens, **{**kw, **extra})
            info = lens.meta["training"]
            rows[name] = {"train_s": t.wall, "cpu_util": t.util, "tokens_per_s": info["tokens_per_s"] or 0.0,
                          "warm_start_s": info["warm_start_s"], "warm_start_tokens": info["warm_start_tokens"]}
            lenses[name] = lens
            print(name, rows[name], flush=True)

    bf16 = bf16_check(model, tokens[:1], lenses["ours"])
    print("bf16 vs fp32 per-layer KL step:", bf16, flush=True)

    evals = {}
    for i, (name, lens) in enumerate(lenses.items()):
        with Timer() as t:
            ev = evaluate_lens(lens, model, held, baseline=(i == 0))
        if i == 0:
            evals["logit lens"] = ev.kl_bits["logit lens"]
        evals[name] = ev.kl_bits["tuned lens"]
        print(f"eval {name}: {t.wall:.0f} s, util {t.util:.2f}", flush=True)
    layers = ev.layers

    flop_tok = (L * 4 + 2) * d * V  # lens fwd+bwd per layer, final decode once
    print(f"\n{'':26}{'tokens/s':>10}{'vs theirs':>10}{'wall s':>8}{'cpu util':>9}{'mean KL bits':>14}")
    base = rows[THEIRS]["tokens_per_s"]
    for name, r in rows.items():
        r["mean_kl_bits"] = sum(evals[name]) / len(layers)
        r["speedup_vs_tuned_lens"] = r["tokens_per_s"] / base if r["tokens_per_s"] else None
        r["gflop_per_s_unembed"] = r["tokens_per_s"] * flop_tok / 1e9
        print(f"{name:26}{r['tokens_per_s']:10.2f}{r['speedup_vs_tuned_lens'] or 0:10.2f}{r['train_s']:8.0f}"
              f"{r['cpu_util']:9.2f}{r['mean_kl_bits']:14.3f}")
    print(f"{'logit lens':26}{'':37}{sum(evals['logit lens']) / len(layers):14.3f}")
    # time to quality: how long each of our runs needed to reach the held-out KL their trainer ended at
    ttq = {}
    for theirs_name in [n for n in (THEIRS, THEIRS_BF16) if n in rows]:
        goal = rows[theirs_name]["mean_kl_bits"]
        ours = {n: r["train_s"] for n, r in rows.items() if n.startswith("ours") and r["mean_kl_bits"] <= goal}
        best = min(ours.items(), key=lambda kv: kv[1]) if ours else None
        ttq[theirs_name] = {"their_kl_bits": goal, "their_s": rows[theirs_name]["train_s"],
                            "ours_fastest_run": None if best is None else best[0],
                            "ours_s": None if best is None else best[1],
                            "speedup": None if best is None else rows[theirs_name]["train_s"] / best[1]}
        print(f"time to their held-out KL ({goal:.3f} bits): theirs {rows[theirs_name]['train_s']:.0f} s, ours "
              + ("never" if best is None else f"{best[1]:.0f} s ({best[0]}): {ttq[theirs_name]['speedup']:.1f}x"))
    print("\nheld-out KL (bits) per layer:")
    names = list(evals)
    print(f"{'layer':>7} " + " ".join(f"{n[:20]:>20}" for n in names))
    for i, lab in enumerate(layers):
        print(f"{lab:>7} " + " ".join(f"{evals[n][i]:20.3f}" for n in names))
    out = {
        "setup": {**vars(args), "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct (float32)",
                  "train_tokens": n_train, "eval_tokens": held.numel(), "flop_per_token_unembed": flop_tok},
        "rows": rows,
        "time_to_quality": ttq,
        "cpu": cpu,
        "bf16_layer_step": bf16,
        "their_bf16_layer_step": their_bf16,
        "layers": layers,
        "kl_bits": evals,
        "notes": "tokens/s counts training tokens of the KL steps (warm start timed separately); CPU shared.",
    }
    write_atomic(args.json, json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
