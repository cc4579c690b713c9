"""Path patching (Wang et al. 2022, the IOI paper): the effect of sender heads on the metric *through* chosen
receivers only, exactly (forward passes, no gradients).

1. The base run is replayed with the senders' outputs (``z``) taken from the source run and every other head frozen
   at its base value (``freeze="heads"``, the paper; ``"heads_and_mlps"`` freezes the MLPs too); the receivers'
   inputs are recorded: their queries, keys or values (``hook_q``/``hook_k``/``hook_v``), or the logits.
2. The base run is replayed once more with only the receivers' recorded inputs patched in; the metric is read.

With ``receivers="logits"`` step 1 already gives the metric (the senders' effect through the residual stream, and
through the MLPs unless frozen). With ``freeze="heads_and_mlps"`` the path is the direct edge sender -> receiver: it
equals TransformerLens's ``patching.get_act_patch_direct_path`` (the oracle test checks it on q, k and v).

One side is a grid, the other fixed: ``senders=None`` sweeps every head as the sender (into fixed receivers), or
``receivers="q"``/``"k"``/``"v"`` sweeps every later head's queries/keys/values (from fixed senders). The result is a
``[layers, heads]`` :class:`~mi_lenses.patching.result.PatchingResult` (``method="path"``), NaN where no path exists
(a sender not before the receivers). Under grouped-query attention a key/value receiver is a key/value head.

Example:
    >>> res = mi_lenses.path_patching(model, "The capital of France is", "The capital of Rome is",
    ...                               answer=" Paris", wrong=" city", receivers="logits")
    >>> res.values.shape == (model.cfg.n_layers, model.cfg.n_heads), res.extra["grid"]
    (True, 'senders')
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from mi_lenses.attribution.directions import TokenSpec
from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching.activation import position_labels, resolve_metric, set_runs
from mi_lenses.patching.metric import MetricFn
from mi_lenses.patching.pair import Direction, make_pair
from mi_lenses.patching.replay import Engine
from mi_lenses.patching.result import PatchingResult
from mi_lenses.progress import bar

Head = tuple[int, int]
Receiver = tuple[int, int, str]


def path_patching(
    model: Any,
    clean: PromptInput,
    corrupted: PromptInput,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    metric: MetricFn | None = None,
    senders: Sequence[Head] | None = None,
    receivers: Literal["logits", "q", "k", "v"] | Sequence[Receiver] = "logits",
    freeze: Literal["heads", "heads_and_mlps"] = "heads",
    direction: Direction = "denoise",
    prepend_bos: bool | None = None,
    max_batch: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Path patching from ``senders`` (``[(layer, head), ...]`` patched together; ``None``: every head, one at a
    time) to ``receivers`` (``"logits"``; ``[(layer, head, "q"|"k"|"v"), ...]`` patched together; or ``"q"``/``"k"``/
    ``"v"``: every head after the senders, one at a time). See the module docstring."""
    t0 = time.perf_counter()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    if freeze not in ("heads", "heads_and_mlps"):
        raise LensInputError(f"freeze must be 'heads' or 'heads_and_mlps', got {freeze!r}.")
    pair = make_pair(view, clean, corrupted, direction=direction, prepend_bos=prepend_bos, aligned="path patching")
    met = resolve_metric(view, pair, answer, wrong, metric)
    L, H, KV = view.n_layers, view.n_heads, view.n_kv_heads
    sender_list = None if senders is None else [_head(view, s, "sender") for s in senders]
    if isinstance(receivers, str):
        if receivers not in ("logits", "q", "k", "v"):
            raise LensInputError(f"receivers must be 'logits', 'q', 'k', 'v' or a list of (layer, head, 'q'|'k'|'v'), "
                                 f"got {receivers!r}.")
        receiver_grid = receivers if receivers != "logits" else None
        receiver_list: list[Receiver] = []
    else:
        receiver_grid = None
        receiver_list = [_receiver(view, r) for r in receivers]
        if not receiver_list:
            raise LensInputError("receivers is empty: pass 'logits' or at least one (layer, head, 'q'|'k'|'v').")
    if (sender_list is None) == (receiver_grid is not None):
        raise LensInputError("one side of a path patching sweep is a grid: pass senders=None (every head) with fixed "
                             "receivers, or fixed senders with receivers='q', 'k' or 'v' (every later head).")
    names = [view.attn_hook(l, "z") for l in range(L)] + \
        ([view.out_hook(l, "mlp") for l in range(L)] if view.has_mlp else []) + \
        [view.attn_hook(l, c) for l in range(L) for c in ("q", "k", "v")]
    engine = Engine(view, pair.base, names)
    src_logits, src_cache = view.run_with_cache(pair.source, [view.attn_hook(l, "z") for l in range(L)])
    set_runs(met, pair, base=met.cells(logits=engine.logits), source=met.cells(logits=src_logits))
    B = pair.n_prompts
    if sender_list is None:  # every head as the sender, into fixed receivers
        experiments = [[(l, h)] for l in range(L) for h in range(H)]
        rec_sets = [receiver_list] * len(experiments)
        grid_shape = (L, H)
    else:  # fixed senders into every later head's q, k or v
        n = H if receiver_grid == "q" else KV
        experiments = [sender_list] * (L * n)
        rec_sets = [[(l, g, receiver_grid)] for l in range(L) for g in range(n)]
        grid_shape = (L, n)
    values = torch.full((len(experiments),), float("nan"))
    ok = [i for i, (s, r) in enumerate(zip(experiments, rec_sets))
          if not r or max(l for l, _ in s) < min(l for l, _, _ in r)]
    per_pass = engine.cells_per_pass(max_batch)
    ctx = _Context(view, engine, src_cache, freeze, B)
    with bar(len(ok), "path patching", unit="path", enabled=progress and bool(ok)) as pbar:
        for a in range(0, len(ok), per_pass):
            chunk = ok[a : a + per_pass]
            raw = ctx.paths([experiments[i] for i in chunk], [rec_sets[i] for i in chunk], met)
            values[torch.tensor(chunk)] = raw.cpu().float()
            pbar.update(len(chunk))
    values = met.normalise(values).view(grid_shape)
    result = PatchingResult(
        model_name=view.name, what="path", by="layer_head", method="path", direction=direction, metric=met.name,
        values=values, layers=list(range(L)), grid_axes=["layer", "head"], pos_labels=position_labels(view, pair),
        clean_tokens=view.str_tokens(pair.clean)[0], corrupted_tokens=view.str_tokens(pair.corrupted)[0],
        pos_map=list(pair.clean_map), clean_value=met.clean, corrupted_value=met.corrupted,
        normalised=met.normalised, n_prompts=B, engine=engine.mode, cells_run=len(ok),
        cells_skipped=len(experiments) - len(ok), passes=2 * -(-len(ok) // per_pass),
        seconds=time.perf_counter() - t0,
        extra={"grid": "senders" if sender_list is None else "receivers", "freeze": freeze,
               "senders": None if sender_list is None else [list(s) for s in sender_list],
               "receivers": receiver_grid or ("logits" if not receiver_list else [list(r) for r in receiver_list])})
    return recorded(result, hooks)


class _Context:
    """The two steps of path patching for a batch of experiments (each: a sender set and a receiver set)."""

    def __init__(self, view: ModelView, engine: Engine, src_cache, freeze: str, B: int):
        self.view, self.engine, self.src, self.freeze, self.B = view, engine, src_cache, freeze, B

    def paths(self, senders: list[list[Head]], receivers: list[list[Receiver]], met) -> Tensor:
        view, eng, B = self.view, self.engine, self.B
        E = len(senders)
        entry = torch.tensor([min(l for l, _ in s) for s in senders]).repeat_interleave(B)
        order = torch.argsort(entry, stable=True)  # rows sorted by entry block
        prompt = torch.arange(B).repeat(E)[order]
        exp_of = torch.arange(E).repeat_interleave(B)[order]
        entry = entry[order]
        rec_layers = sorted({l for r in receivers for l, _, _ in r})
        to_logits = not rec_layers
        recorded_values: dict[tuple[int, str], Tensor] = {}

        def hooks1(k: int) -> list:
            out = []
            base_z = eng.cache[view.attn_hook(k, "z")]
            src_z = self.src[view.attn_hook(k, "z")]
            mine = [(i, h) for i, e in enumerate(exp_of.tolist()) for (l, h) in senders[e] if l == k]

            def freeze_z(t: Tensor, hook=None) -> Tensor:
                n = t.shape[0]
                new = base_z[prompt[:n].to(base_z.device)].to(t.device, t.dtype).clone()
                for i, h in mine:
                    if i < n:
                        new[i, :, h] = src_z[int(prompt[i]), :, h].to(t.device, t.dtype)
                return new

            out.append((view.attn_hook(k, "z"), freeze_z))
            if self.freeze == "heads_and_mlps" and view.has_mlp:
                base_mlp = eng.cache[view.out_hook(k, "mlp")]

                def freeze_mlp(t: Tensor, hook=None) -> Tensor:
                    return base_mlp[prompt[: t.shape[0]].to(base_mlp.device)].to(t.device, t.dtype).clone()

                out.append((view.out_hook(k, "mlp"), freeze_mlp))
            if k in rec_layers:
                for comp in ("q", "k", "v"):
                    def record(t: Tensor, hook=None, comp: str = comp) -> None:
                        recorded_values[(k, comp)] = t.detach().clone()

                    out.append((view.attn_hook(k, comp), record))
            return out

        if to_logits:
            final = eng.run(entry, prompt, hooks1)
            raw = met.cells(**({"logits": final} if eng.returns_logits else {"resid": final}))
            return self._unsort(raw, order, E)
        eng.run(entry, prompt, hooks1, stop=max(rec_layers))
        # step 2: only the receivers' recorded inputs patched, from the first receiver's block
        entry2 = torch.tensor([min(l for l, _, _ in receivers[e]) for e in exp_of.tolist()])
        order2 = torch.argsort(entry2, stable=True)
        inv = torch.empty_like(order2)
        inv[order2] = torch.arange(len(order2))
        rows_of = order2  # row i of pass 2 is row order2[i] of pass 1

        def hooks2(k: int) -> list:
            out = []
            for comp in ("q", "k", "v"):
                mine = [(i, g) for i, r1 in enumerate(rows_of.tolist()) for (l, g, c) in receivers[int(exp_of[r1])]
                        if l == k and c == comp]
                if not mine:
                    continue
                rec = recorded_values[(k, comp)]

                def patch(t: Tensor, hook=None, mine=mine, rec=rec) -> Tensor:
                    out_t = t.clone()
                    for i, g in mine:
                        if i < t.shape[0]:
                            out_t[i, :, g] = rec[int(rows_of[i]), :, g].to(t.device, t.dtype)
                    return out_t

                out.append((view.attn_hook(k, comp), patch))
            return out

        final = eng.run(entry2[order2], prompt[order2], hooks2)
        raw2 = met.cells(**({"logits": final} if eng.returns_logits else {"resid": final}))
        # raw2 is per experiment in pass-2 row order (B rows per experiment stay together): back to pass-1 order
        exp_rows2 = exp_of[order2].view(-1, B)[:, 0]
        per_exp = torch.empty(E)
        per_exp[exp_rows2] = raw2.cpu().float()
        return per_exp

    def _unsort(self, raw: Tensor, order: Tensor, E: int) -> Tensor:
        """Per-experiment values from rows sorted by ``order`` (each experiment's B rows stay consecutive)."""
        B = self.B
        exp_sorted = torch.arange(E).repeat_interleave(B)[order].view(-1, B)[:, 0]
        out = torch.empty(E)
        out[exp_sorted] = raw.cpu().float()
        return out


def _head(view: ModelView, s: Any, what: str) -> Head:
    try:
        l, h = (int(x) for x in s)
    except (TypeError, ValueError):
        raise LensInputError(f"a {what} is a (layer, head) pair, got {s!r}.") from None
    if not (0 <= l < view.n_layers and 0 <= h < view.n_heads):
        raise LensInputError(f"{what} L{l}H{h} does not exist: layers 0..{view.n_layers - 1}, heads "
                             f"0..{view.n_heads - 1}.")
    return l, h


def _receiver(view: ModelView, r: Any) -> Receiver:
    try:
        l, h, c = r
        l, h = int(l), int(h)
    except (TypeError, ValueError):
        raise LensInputError(f"a receiver is (layer, head, 'q'|'k'|'v'), got {r!r}.") from None
    n = view.n_heads if c == "q" else view.n_kv_heads
    if c not in ("q", "k", "v") or not (0 <= l < view.n_layers and 0 <= h < n):
        raise LensInputError(f"receiver {r!r} does not exist: component 'q', 'k' or 'v', layers 0..{view.n_layers - 1}"
                             f", heads 0..{n - 1} ({'key/value heads' if c in ('k', 'v') else 'query heads'}).")
    return l, h, c
