"""Patching a dictionary's features (``what="features"``, ``dictionary=``): exact, attribution (SAE feature
attribution patching, Marks et al. 2024) and integrated gradients at the features.

The dictionary writes ``y = decode(acts, x) + error`` at its output hook. A patch replaces the base run's
activations of a cell's features (at a cell's positions, or all aligned ones) by the source run's and keeps the base
run's error: the patched run writes ``y + ((acts_source - acts_base) @ W_dec') * scale`` there (linear in the
activations, :mod:`~mi_lenses.patching.features` never re-encodes). A cell whose activations are equal in both runs
is the base run (skipped: most features are silent in both).

* ``exact``: one forward pass per cell (replayed from the dictionary's block, many cells per pass);
* ``attribution``: ``Σ_cell (acts_source - acts_base) · ∂metric/∂acts`` at the base run, one backward pass;
* ``ig``: the same with the gradient averaged over ``ig_steps`` points where every feature activation of the
  dictionary is interpolated between the runs (the error kept): summed over every cell it tends to the exact value
  of patching all features at once (``by="layer"``), the completeness identity.

Example:
    >>> D = model.cfg.d_model
    >>> eye = torch.eye(D)        # relu(x) - relu(-x) == x: this SAE reconstructs exactly, its features are x's signs
    >>> d = mi_lenses.Dictionary(torch.cat([eye, -eye], 1), torch.zeros(2 * D), torch.cat([eye, -eye]),
    ...                          torch.zeros(D), hook="blocks.1.hook_resid_post")
    >>> kw = dict(answer=" Paris", wrong=" city", what="features", dictionary=d, by="layer_pos", progress=False)
    >>> f = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is", **kw)
    >>> r = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                   answer=" Paris", wrong=" city", what="resid_post", layers=[1])
    >>> bool((f.values - r.values).abs().max() < 1e-5)   # every feature at a position == the residual stream there
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mi_lenses.features.dictionary import Dictionary
from mi_lenses.patching.exact import ExactRun
from mi_lenses.patching.experiment import Experiment
from mi_lenses.patching.gradients import metric_pass, perturb_hook
from mi_lenses.patching.replay import PATCH_TOKENS, Engine
from mi_lenses.patching.sites import Site
from mi_lenses.progress import bar


@dataclass
class _Runs:
    """Both runs at the dictionary: ``delta`` ``[B, P, F]`` (source minus base activations at the aligned
    positions), ``scale`` ``[B, S, 1]`` (the base run's denormalisation; 1 for a transcoder), the aligned positions
    ``dst`` (base) and the decoder rows."""

    delta: Tensor
    scale: Tensor
    dst: Tensor
    rows: Tensor


def _runs(site: Site, base_x: Tensor, source_x: Tensor) -> _Runs:
    d: Dictionary = site.dictionary.to(base_x.device)
    base_x, source_x = (x.flatten(2) if x.ndim > 3 else x for x in (base_x, source_x))  # hook_z: heads flattened
    with torch.no_grad():
        base, source = d.encode(base_x.float()), d.encode(source_x.float().to(base_x.device))
    src = torch.tensor([p[0] for p in site.pos_map], device=base.device)
    dst = torch.tensor([p[1] for p in site.pos_map], device=base.device)
    _, scale, _ = d._stats(base_x)
    if d.is_transcoder:  # a transcoder's output is not denormalised
        scale = torch.ones_like(scale)
    return _Runs(source[:, src] - base[:, dst], scale, dst, d.decoder_rows().to(base.device))


def _grid_reduce(site: Site, t: Tensor) -> Tensor:
    """``t`` ``[B, P, F]`` summed over the prompts and the axes that are patched whole: ``[cells]`` in grid order."""
    t = t.sum(0)
    if "pos" not in site.grid_axes:
        t = t.sum(0, keepdim=True)
    if "feature" not in site.grid_axes:
        t = t.sum(-1, keepdim=True)
    return t.reshape(-1)


def _cell_writes(site: Site, runs: _Runs, cells: Tensor, prompts: Tensor, S: int) -> Tensor:
    """What each row (cell ``cells[r]`` of base prompt ``prompts[r]``) adds at the output hook: ``[R, S, d_out]``."""
    coords = site.coords()
    P = runs.delta.shape[1]
    dev = runs.delta.device
    cells, prompts = cells.to(dev), prompts.to(dev)
    if "pos" in site.grid_axes:
        mask = torch.nn.functional.one_hot(coords["pos"].to(dev)[cells], P).float()  # [R, P]
    else:
        mask = torch.ones(len(cells), P, device=dev)
    if "feature" in site.grid_axes:
        f = coords["feature"].to(dev)[cells]
        dv = runs.delta[prompts, :, f] * mask  # [R, P]
        aligned = dv[..., None] * runs.rows[f][:, None, :]
    else:
        aligned = (runs.delta[prompts] * mask[..., None]) @ runs.rows
    out = torch.zeros(len(cells), S, runs.rows.shape[1], device=dev)
    out[:, runs.dst] = aligned
    return out * runs.scale[prompts]


@torch.no_grad()
def feature_exact(exp: Experiment, site: Site) -> ExactRun:
    """The raw metric of every cell of a features site (``[1, *grid]``), cells with a change only."""
    d, layer = site.dictionary, site.layers[0]
    engine = Engine(exp.view, exp.pair.base, [d.hook])
    src_logits, src_cache = exp.view.run_with_cache(exp.pair.source, {d.hook})
    base_raw = exp.metric.cells(logits=engine.logits)
    exp.measure(base=base_raw, source=exp.metric.cells(logits=src_logits))
    runs = _runs(site, engine.cache[d.hook], src_cache[d.hook])
    n_cells = site.cells_per_layer()
    raw = torch.full((n_cells,), float(base_raw[0]))
    todo = torch.nonzero(_grid_reduce(site, (runs.delta != 0).float()).cpu() > 0)[:, 0]
    B, S = engine.batch.shape[0], engine.batch.shape[1]
    per_pass = engine.cells_per_pass(exp.max_batch)
    passes = 0
    with bar(len(todo), "feature patching", unit="patch", enabled=exp.progress and len(todo) > 0) as pbar:
        for a in range(0, len(todo), per_pass):
            ci = todo[a : a + per_pass]
            cells, prompts = ci.repeat_interleave(B), torch.arange(B).repeat(len(ci))
            writes = _cell_writes(site, runs, cells, prompts, S)

            def hook(t: Tensor, hook=None, writes: Tensor = writes) -> Tensor:
                return t + writes.to(t.device, t.dtype).view(t.shape)

            entry = torch.full((len(cells),), layer)
            final = engine.run(entry, prompts, lambda k: [(d.writes, hook)] if k == layer else [])
            raw[ci] = engine.measure(exp.metric, final).cpu().float()
            passes += 1
            pbar.update(len(ci))
    return ExactRun(raw.view(site.grid_shape), len(todo), n_cells - len(todo), passes, engine.mode)


def feature_gradients(exp: Experiment, site: Site, *, ig_steps: int | None = None) -> Tensor:
    """Attribution (``ig_steps=None``) or integrated gradients (``ig_steps`` points, every feature interpolated)
    of every cell of a features site, raw metric units ``[1, *grid]``; the metric measured on both runs."""
    view, d, B = exp.view, site.dictionary, exp.pair.n_prompts
    base_logits, base_cache = view.run_with_cache(exp.pair.base, {d.hook})
    src_logits, src_cache = view.run_with_cache(exp.pair.source, {d.hook})
    exp.measure(base=exp.metric.cells(logits=base_logits), source=exp.metric.cells(logits=src_logits))
    runs = _runs(site, base_cache[d.hook], src_cache[d.hook])
    S = exp.pair.base.shape[1]
    whole = torch.zeros(B, S, runs.rows.shape[1], device=runs.delta.device)
    whole[:, runs.dst] = runs.delta @ runs.rows
    whole = whole * runs.scale  # every feature patched: what the output hook gains
    m = ig_steps or 1
    per_pass = max(1, (exp.max_batch or max(1, PATCH_TOKENS // S)) // B) if ig_steps else 1
    grad = torch.zeros(B, S, runs.rows.shape[1], device=whole.device)
    for a in range(0, m, per_pass):
        alphas = ((torch.arange(a, min(m, a + per_pass), dtype=torch.float32) + 0.5) / m) if ig_steps \
            else torch.zeros(1)
        n = len(alphas)
        shift = alphas.to(whole.device).repeat_interleave(B)[:, None, None] * whole.repeat(n, 1, 1)
        deltas: dict[str, Tensor] = {}

        def move(t: Tensor, hook=None, shift: Tensor = shift) -> Tensor:
            return t + shift.to(t.device, t.dtype).view(t.shape)

        hooks = ([(d.writes, move)] if ig_steps else []) + [(d.writes, perturb_hook(deltas, d.writes))]
        raw = metric_pass(view, exp.metric, exp.pair.base.tokens.repeat(n, 1), hooks)
        (g,) = torch.autograd.grad(raw.sum() / m, [deltas[d.writes]])
        grad += g.detach().float().reshape(n, B, *g.shape[1:]).sum(0).reshape(B, S, -1).to(grad.device)
    # the gradient with respect to each feature's activation: (g * scale) . W_dec'[f], at the aligned positions
    per_feature = ((grad * runs.scale)[:, runs.dst]) @ runs.rows.T  # [B, P, F]
    return _grid_reduce(site, runs.delta * per_feature).cpu().view(site.grid_shape)
