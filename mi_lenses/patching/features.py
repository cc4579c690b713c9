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

A :class:`~mi_lenses.features.dictionary.DictionarySet` (one dictionary per block, e.g. per-layer transcoders) is
patched layer by layer in one call: the grid is ``[layers, *grid]`` and each layer's slice is what patching that
layer's dictionary alone gives (exact: the cells of every layer share the batched passes, each row patched in its own
block only; attribution: one backward pass for every layer; ``ig``: each layer's features interpolated on their own,
the other layers' left at the base run, one pass per layer). With ``feature`` a grid axis and members of different
widths, a layer's cells past its own features are NaN.

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
    """Both runs at one dictionary: ``delta`` ``[B, P, F]`` (source minus base activations at the aligned
    positions), ``scale`` ``[B, S, 1]`` (the base run's denormalisation; 1 for a transcoder), the aligned positions
    ``dst`` (base) and the decoder rows."""

    delta: Tensor
    scale: Tensor
    dst: Tensor
    rows: Tensor


def _runs(site: Site, base_x: Tensor, source_x: Tensor) -> _Runs:
    """``site``: one layer's site (:meth:`~mi_lenses.patching.sites.Site.layer_site`)."""
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


def _assemble(site: Site, subs: list[Site], per_layer: list[Tensor]) -> Tensor:
    """The grid ``[layers, *grid]`` of every layer's cells (``per_layer[i]``: ``[cells]`` of ``subs[i]``); a layer
    with fewer features than the widest leaves its last feature cells NaN."""
    out = torch.full(site.grid_shape, float("nan"))
    for i, (sub, v) in enumerate(zip(subs, per_layer)):
        v = v.reshape(sub.grid_shape[1:])
        if "feature" in site.grid_axes:
            out[i, ..., : v.shape[-1]] = v
        else:
            out[i] = v
    return out


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


def _add_hook(rows: Tensor, writes: Tensor):
    """The hook adding ``writes`` ``[R, S, d_out]`` to batch rows ``rows`` of the output hook (all of them: plainly)."""

    def hook(t: Tensor, hook=None) -> Tensor:
        w = writes.to(t.device, t.dtype)
        if len(rows) == t.shape[0]:
            return t + w.view(t.shape)
        r = rows.to(t.device)
        out = t.clone()
        out[r] = t[r] + w.view(len(rows), *t.shape[1:])
        return out

    return hook


@torch.no_grad()
def feature_exact(exp: Experiment, site: Site) -> ExactRun:
    """The raw metric of every cell of a features site (``[layers, *grid]``), cells with a change only: one base run
    and one source run cached at every layer's dictionary, then the cells of all layers batched (sorted by layer),
    each row replayed from its dictionary's block with its write added there."""
    names = list(dict.fromkeys(site.hook(l) for l in site.layers))
    engine = Engine(exp.view, exp.pair.base, names)
    src_logits, src_cache = exp.view.run_with_cache(exp.pair.source, set(names))
    base_raw = exp.metric.cells(logits=engine.logits)
    exp.measure(base=base_raw, source=exp.metric.cells(logits=src_logits))
    subs = [site.layer_site(l) for l in site.layers]
    runs = [_runs(sub, engine.cache[sub.hook(l)], src_cache[sub.hook(l)]) for sub, l in zip(subs, site.layers)]
    raw = [torch.full((sub.cells_per_layer(),), float(base_raw[0])) for sub in subs]
    todo = [torch.nonzero(_grid_reduce(sub, (r.delta != 0).float()).cpu() > 0)[:, 0] for sub, r in zip(subs, runs)]
    layer_idx = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(todo)])
    cell_idx = torch.cat(todo)
    n_run, n_cells = len(cell_idx), sum(sub.cells_per_layer() for sub in subs)
    B, S = engine.batch.shape[0], engine.batch.shape[1]
    per_pass = engine.cells_per_pass(exp.max_batch)
    passes = 0
    with bar(n_run, "feature patching", unit="patch", enabled=exp.progress and n_run > 0) as pbar:
        for a in range(0, n_run, per_pass):
            li, ci = layer_idx[a : a + per_pass], cell_idx[a : a + per_pass]
            row_layer, row_cell = li.repeat_interleave(B), ci.repeat_interleave(B)
            prompts = torch.arange(B).repeat(len(ci))
            by_block = {}
            for i in sorted(set(li.tolist())):
                rows = torch.nonzero(row_layer == i)[:, 0]
                writes = _cell_writes(subs[i], runs[i], row_cell[rows], prompts[rows], S)
                by_block[site.layers[i]] = (site.write_hook(site.layers[i]), _add_hook(rows, writes))

            entry = torch.tensor(site.layers)[row_layer]
            final = engine.run(entry, prompts, lambda k: [by_block[k]] if k in by_block else [])
            got = engine.measure(exp.metric, final).cpu().float()
            for i in set(li.tolist()):
                mine = li == i
                raw[i][ci[mine]] = got[mine]
            passes += 1
            pbar.update(len(ci))
    return ExactRun(_assemble(site, subs, raw), n_run, n_cells - n_run, passes, engine.mode)


def feature_gradients(exp: Experiment, site: Site, *, ig_steps: int | None = None) -> Tensor:
    """Attribution (``ig_steps=None``: one backward pass for every layer) or integrated gradients (``ig_steps``
    points; each layer on its own, every feature of its dictionary interpolated) of every cell of a features site,
    raw metric units ``[layers, *grid]``; the metric measured on both runs."""
    view = exp.view
    names = {site.hook(l) for l in site.layers}
    base_logits, base_cache = view.run_with_cache(exp.pair.base, names)
    src_logits, src_cache = view.run_with_cache(exp.pair.source, names)
    exp.measure(base=exp.metric.cells(logits=base_logits), source=exp.metric.cells(logits=src_logits))
    subs = [site.layer_site(l) for l in site.layers]
    runs = [_runs(sub, base_cache[sub.hook(l)], src_cache[sub.hook(l)]) for sub, l in zip(subs, site.layers)]
    writes = [site.write_hook(l) for l in site.layers]
    if ig_steps:
        grads = [_gradients(exp, [w], [r], ig_steps)[0] for w, r in zip(writes, runs)]
    else:
        grads = _gradients(exp, writes, runs, None)
    out = []
    for sub, r, grad in zip(subs, runs, grads):
        # the gradient with respect to each feature's activation: (g * scale) . W_dec'[f], at the aligned positions
        per_feature = ((grad * r.scale)[:, r.dst]) @ r.rows.T  # [B, P, F]
        out.append(_grid_reduce(sub, r.delta * per_feature).cpu())
    return _assemble(site, subs, out)


def _gradients(exp: Experiment, writes: list[str], runs: list[_Runs], ig_steps: int | None) -> list[Tensor]:
    """The metric's gradient (raw units) at each output hook ``writes[i]`` ``[B, S, d_out]``: at the base run
    (``ig_steps=None``, every hook in one pass), or averaged over ``ig_steps`` points where every hook's features are
    moved towards the source run's together (the error kept)."""
    view, B = exp.view, exp.pair.n_prompts
    S = exp.pair.base.shape[1]
    wholes = []
    for r in runs:
        whole = torch.zeros(B, S, r.rows.shape[1], device=r.delta.device)
        whole[:, r.dst] = r.delta @ r.rows
        wholes.append(whole * r.scale)  # every feature patched: what the output hook gains
    m = ig_steps or 1
    per_pass = max(1, (exp.max_batch or max(1, PATCH_TOKENS // S)) // B) if ig_steps else 1
    grads = [torch.zeros(B, S, w.shape[-1], device=w.device) for w in wholes]
    for a in range(0, m, per_pass):
        alphas = ((torch.arange(a, min(m, a + per_pass), dtype=torch.float32) + 0.5) / m) if ig_steps \
            else torch.zeros(1)
        n = len(alphas)
        deltas: dict[str, Tensor] = {}
        hooks = []
        if ig_steps:
            for name, whole in zip(writes, wholes):
                shift = alphas.to(whole.device).repeat_interleave(B)[:, None, None] * whole.repeat(n, 1, 1)
                hooks.append((name, _shift_hook(shift)))
        hooks += [(name, perturb_hook(deltas, name)) for name in writes]
        raw = metric_pass(view, exp.metric, exp.pair.base.tokens.repeat(n, 1), hooks)
        got = torch.autograd.grad(raw.sum() / m, [deltas[name] for name in writes], allow_unused=True)
        for total, g in zip(grads, got):
            if g is not None:
                total += g.detach().float().reshape(n, B, *g.shape[1:]).sum(0).reshape(B, S, -1).to(total.device)
    return grads


def _shift_hook(shift: Tensor):
    def move(t: Tensor, hook=None) -> Tensor:
        return t + shift.to(t.device, t.dtype).view(t.shape)

    return move
