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
    >>> kw = dict(answer=" Paris", wrong=" city")
    >>> res = mi_lenses.path_patching(model, "The capital of France is", "The capital of Rome is", **kw)
    >>> heads = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                       what="head_out", layers=[-1], **kw)
    >>> bool(torch.allclose(res.values[-1], heads.values[0], atol=1e-5))   # a last-layer head: only one path
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.view import ModelView
from mi_lenses.options import with_options
from mi_lenses.patching.experiment import Experiment
from mi_lenses.patching.options import Head, PathOptions, Receiver
from mi_lenses.patching.replay import Engine
from mi_lenses.patching.result import PatchingResult
from mi_lenses.patching.sites import check_head_split
from mi_lenses.progress import bar


@with_options(PathOptions)
def path_patching(model: Any, clean: PromptInput, corrupted: PromptInput, *,
                  options: PathOptions | None = None) -> PatchingResult:
    """Path patching from ``senders`` to ``receivers``, one side a grid (see the module docstring).

    ``senders=None`` sweeps every head as the sender into fixed ``receivers``; ``receivers="q"``, ``"k"`` or ``"v"``
    sweeps every later head's input from fixed ``senders``.

    Args:
        {options}

    Returns:
        :class:`~mi_lenses.patching.result.PatchingResult` (``values``: ``[layers, heads]``, ``method="path"``; NaN
        where no path exists).
    """
    opts = options
    exp = Experiment.prepare(model, clean, corrupted, opts, aligned="path patching", max_batch=opts.max_batch,
                             progress=opts.progress)
    sweep = Sweep.of(exp.view, opts)
    engine, raw, passes = path_grid(exp, sweep)
    values = exp.normalise(raw).view(sweep.shape)
    n_run = len(sweep.possible)
    return exp.finish(PatchingResult(
        **exp.result_fields(), what="path", by="layer_head", method="path", values=values,
        layers=list(range(exp.view.n_layers)), grid_axes=["layer", "head"], engine=engine.mode, cells_run=n_run,
        cells_skipped=len(sweep.senders) - n_run, passes=passes, extra=sweep.describe()))


@dataclass
class Sweep:
    """The experiments of a path patching call: ``senders[i]`` and ``receivers[i]`` (an empty receiver set: the
    logits) for every cell of the ``[layers, heads]`` grid; ``possible``: the cells whose senders come before their
    receivers."""

    senders: list[list[Head]]
    receivers: list[list[Receiver]]
    shape: tuple[int, int]
    fixed_senders: list[Head] | None
    fixed_receivers: list[Receiver]
    receiver_grid: str | None
    freeze: str

    @classmethod
    def of(cls, view: ModelView, opts: PathOptions) -> "Sweep":
        """The sweep of ``opts.senders`` and ``opts.receivers``, checked against the model (one side is a grid)."""
        L, H, KV = view.n_layers, view.n_heads, view.n_kv_heads
        senders = None if opts.senders is None else [_head(view, s, "sender") for s in opts.senders]
        grid, fixed = _receivers(view, opts.receivers)
        if (senders is None) == (grid is not None):
            raise LensInputError("one side of a path patching sweep is a grid: pass senders=None (every head) with "
                                 "fixed receivers, or fixed senders with receivers='q', 'k' or 'v' (every later "
                                 "head).")
        if senders is None:  # every head as the sender, into fixed receivers
            cells = [[(l, h)] for l in range(L) for h in range(H)]
            return cls(cells, [fixed] * len(cells), (L, H), None, fixed, None, opts.freeze)
        n = H if grid == "q" else KV  # fixed senders into every later head's q, k or v
        return cls([senders] * (L * n), [[(l, g, grid)] for l in range(L) for g in range(n)], (L, n), senders, [],
                   grid, opts.freeze)

    @property
    def possible(self) -> list[int]:
        return [i for i, (s, r) in enumerate(zip(self.senders, self.receivers))
                if not r or max(l for l, _ in s) < min(l for l, _, _ in r)]

    def describe(self) -> dict[str, Any]:
        """The result's ``extra``: which side is the grid, the frozen components, the fixed side."""
        fixed = self.receiver_grid or ("logits" if not self.fixed_receivers else [list(r) for r in
                                                                                   self.fixed_receivers])
        return {"grid": "senders" if self.fixed_senders is None else "receivers", "freeze": self.freeze,
                "senders": None if self.fixed_senders is None else [list(s) for s in self.fixed_senders],
                "receivers": fixed}


def path_grid(exp: Experiment, sweep: Sweep) -> tuple[Engine, Float[Tensor, " n"], int]:
    """The raw metric of every experiment of ``sweep`` (NaN where impossible), ``exp.max_batch`` paths per pair of
    forward passes: the engine, the values and the number of passes."""
    view = exp.view
    check_head_split(view, "path patching")
    L = view.n_layers
    names = [view.attn_hook(l, "z") for l in range(L)] + \
        ([view.out_hook(l, "mlp") for l in range(L)] if view.has_mlp else []) + \
        [view.attn_hook(l, c) for l in range(L) for c in ("q", "k", "v")]
    engine = Engine(view, exp.pair.base, names)
    src_logits, src_cache = view.run_with_cache(exp.pair.source, [view.attn_hook(l, "z") for l in range(L)])
    exp.measure(base=exp.metric.cells(logits=engine.logits), source=exp.metric.cells(logits=src_logits))
    values = torch.full((len(sweep.senders),), float("nan"))
    ok = sweep.possible
    per_pass = engine.cells_per_pass(exp.max_batch)
    with bar(len(ok), "path patching", unit="path", enabled=exp.progress and bool(ok)) as pbar:
        for a in range(0, len(ok), per_pass):
            chunk = ok[a : a + per_pass]
            paths = PathBatch(exp, engine, src_cache, sweep.freeze, [sweep.senders[i] for i in chunk],
                              [sweep.receivers[i] for i in chunk])
            values[torch.tensor(chunk)] = paths.run()
            pbar.update(len(chunk))
    return engine, values, 2 * -(-len(ok) // per_pass)


class PathBatch:
    """The two steps of path patching (see the module docstring) for a batch of experiments, each a sender set and a
    receiver set, run on ``B`` rows each (one per prompt pair). Step 1 replays the base run with the senders' ``z``
    from the source run and every other head (and with ``freeze="heads_and_mlps"`` every MLP) frozen at its base
    value, recording the receivers' inputs; step 2 replays it with only those inputs patched in."""

    def __init__(self, exp: Experiment, engine: Engine, src_cache: Any, freeze: str, senders: list[list[Head]],
                 receivers: list[list[Receiver]]):
        self.exp, self.engine, self.src, self.senders, self.receivers = exp, engine, src_cache, senders, receivers
        self.freeze_mlps = freeze == "heads_and_mlps" and exp.view.has_mlp
        B = exp.pair.n_prompts
        entry = torch.tensor([min(l for l, _ in s) for s in senders]).repeat_interleave(B)
        order = torch.argsort(entry, stable=True)  # rows sorted by entry block
        self.entry, self.prompt = entry[order], torch.arange(B).repeat(len(senders))[order]
        self.exp_of = torch.arange(len(senders)).repeat_interleave(B)[order]
        self.receiver_layers = sorted({l for r in receivers for l, _, _ in r})
        self.inputs: dict[tuple[int, str], Tensor] = {}  # (layer, "q"|"k"|"v") -> the receivers' recorded inputs
        self.rows2 = torch.arange(0)  # row i of step 2 is row rows2[i] of step 1

    def run(self) -> Float[Tensor, " E"]:
        """The raw metric of every experiment."""
        eng = self.engine
        if not self.receiver_layers:  # into the logits: step 1 gives the metric
            final = eng.run(self.entry, self.prompt, self.sender_hooks)
            return self._per_experiment(eng.measure(self.exp.metric, final), self.exp_of)
        eng.run(self.entry, self.prompt, self.sender_hooks, stop=max(self.receiver_layers))
        entry2 = torch.tensor([min(l for l, _, _ in self.receivers[e]) for e in self.exp_of.tolist()])
        self.rows2 = torch.argsort(entry2, stable=True)  # from the first receiver's block
        final = eng.run(entry2[self.rows2], self.prompt[self.rows2], self.receiver_hooks)
        return self._per_experiment(eng.measure(self.exp.metric, final), self.exp_of[self.rows2])

    def sender_hooks(self, k: int) -> list:
        """Step 1 in block ``k``: the heads' ``z`` frozen at the base run's but the senders' taken from the source
        run, the MLP frozen too with ``freeze="heads_and_mlps"``, the receivers' inputs recorded."""
        view, base_cache = self.exp.view, self.engine.cache
        out = [(view.attn_hook(k, "z"), self._freeze_z(k))]
        if self.freeze_mlps:
            out.append((view.out_hook(k, "mlp"), self._frozen(base_cache[view.out_hook(k, "mlp")])))
        if k in self.receiver_layers:
            for comp in ("q", "k", "v"):
                def record(t: Tensor, hook=None, comp: str = comp) -> None:
                    self.inputs[(k, comp)] = t.detach().clone()

                out.append((view.attn_hook(k, comp), record))
        return out

    def _freeze_z(self, k: int):
        base_z = self.engine.cache[self.exp.view.attn_hook(k, "z")]
        src_z = self.src[self.exp.view.attn_hook(k, "z")]
        mine = [(i, h) for i, e in enumerate(self.exp_of.tolist()) for (l, h) in self.senders[e] if l == k]
        prompt = self.prompt

        def hook(t: Tensor, hook=None) -> Tensor:
            n = t.shape[0]
            new = base_z[prompt[:n].to(base_z.device)].to(t.device, t.dtype).clone()
            for i, h in mine:
                if i < n:
                    new[i, :, h] = src_z[int(prompt[i]), :, h].to(t.device, t.dtype)
            return new

        return hook

    def _frozen(self, base: Tensor):
        prompt = self.prompt

        def hook(t: Tensor, hook=None) -> Tensor:
            return base[prompt[: t.shape[0]].to(base.device)].to(t.device, t.dtype).clone()

        return hook

    def receiver_hooks(self, k: int) -> list:
        """Step 2 in block ``k``: the receivers' recorded inputs (queries, keys or values) patched in."""
        out = []
        rows = self.rows2.tolist()
        for comp in ("q", "k", "v"):
            mine = [(i, g) for i, r1 in enumerate(rows) for (l, g, c) in self.receivers[int(self.exp_of[r1])]
                    if l == k and c == comp]
            if mine:
                out.append((self.exp.view.attn_hook(k, comp), self._patch(self.inputs[(k, comp)], mine)))
        return out

    def _patch(self, recorded: Tensor, mine: list[tuple[int, int]]):
        rows2 = self.rows2

        def hook(t: Tensor, hook=None) -> Tensor:
            out = t.clone()
            for i, g in mine:
                if i < t.shape[0]:
                    out[i, :, g] = recorded[int(rows2[i]), :, g].to(t.device, t.dtype)
            return out

        return hook

    def _per_experiment(self, raw: Tensor, exp_of_rows: Tensor) -> Float[Tensor, " E"]:
        """Per-experiment values from rows in any order that keeps each experiment's ``B`` rows together."""
        out = torch.empty(len(self.senders))
        out[exp_of_rows.view(-1, self.exp.pair.n_prompts)[:, 0]] = raw.cpu().float()
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


def _receivers(view: ModelView, receivers: Any) -> tuple[str | None, list[Receiver]]:
    """``receivers`` as ``(grid component or None, fixed receivers)``: ``"logits"`` is no receiver."""
    if isinstance(receivers, str):
        if receivers not in ("logits", "q", "k", "v"):
            raise LensInputError(f"receivers must be 'logits', 'q', 'k', 'v' or a list of (layer, head, 'q'|'k'|'v'), "
                                 f"got {receivers!r}.")
        return (receivers if receivers != "logits" else None), []
    fixed = [_receiver(view, r) for r in receivers]
    if not fixed:
        raise LensInputError("receivers is empty: pass 'logits' or at least one (layer, head, 'q'|'k'|'v').")
    return None, fixed


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
