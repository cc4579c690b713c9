"""Exact activation patching: every cell of the grid is a real forward pass with that one activation patched.

The numbers are TransformerLens's ``patching.get_act_patch_*`` (the oracle tests check them to 1e-4 on both worlds);
the work is not. Rows (cell x prompt) are batched into few forward passes, each row computed from the block where its
patch sits (:mod:`mi_lenses.patching.replay`), and a cell whose source and base activations are identical (the same
token at layer 0, a position before the first difference) is not run at all: its patched run *is* the base run.

Example:
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     answer=" Paris", wrong=" city", what="resid_pre")
    >>> float(res.values[0, 0]) == 0.0, res.cells_skipped > 0   # <bos> in both runs: not run, changes nothing
    (True, True)
    >>> res.cells_run + res.cells_skipped == res.values.numel() and res.passes >= 1
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mi_lenses.patching.experiment import Experiment
from mi_lenses.patching.replay import Engine
from mi_lenses.patching.sites import Site
from mi_lenses.progress import bar


@dataclass
class ExactRun:
    """What the exact engine did: the grid of raw metric values, the cells it ran and skipped, its forward passes."""

    raw: Tensor
    cells_run: int
    cells_skipped: int
    passes: int
    mode: str


def patch_hook(site: Site, source: dict[int, Tensor], base: dict[int, Tensor], layer: int, rows: Tensor,
               prompts: Tensor, coords: dict[str, Tensor]):
    """The hook (at ``site.write_hook(layer)``) that writes the source activation of ``layer`` into ``rows`` (batch
    indices) at each row's cell: on a copy, as TransformerLens's patch setters do (a hook point that aliases a
    module's input must not change the tensor in place), and as a difference for an additive site."""
    dst = site.index(rows, coords, "base")
    src_act = source[layer]
    src = src_act[site.index(prompts.to(src_act.device), coords, "source")]
    if site.additive:
        base_act = base[layer]
        src = src.to(base_act.device) - base_act[site.index(prompts.to(base_act.device), coords, "base")]

    def hook(t: Tensor, hook=None) -> Tensor:
        idx = tuple(i.to(t.device) if isinstance(i, Tensor) else i for i in dst)
        out = t.clone()
        out[idx] = (out[idx] + src.to(t.device, t.dtype)) if site.additive else src.to(t.device, t.dtype)
        return out

    return hook


@torch.no_grad()
def exact_grid(exp: Experiment, site: Site) -> ExactRun:
    """The raw metric of every cell of ``site`` (``[layers, *grid]``): the base run (the :class:`Engine`), the source
    run's activations at the site, the metric measured on both, then the source activation of every cell patched into
    the base run, ``exp.max_batch`` rows per forward pass."""
    names = [site.hook(l) for l in site.layers]
    engine = Engine(exp.view, exp.pair.base, names)
    src_logits, src_cache = exp.view.run_with_cache(exp.pair.source, names)
    base_raw = exp.metric.cells(logits=engine.logits)
    exp.measure(base=base_raw, source=exp.metric.cells(logits=src_logits))
    source = {l: src_cache[site.hook(l)] for l in site.layers}
    raw = torch.full((len(site.layers), site.cells_per_layer()), float(base_raw[0]))
    layer_idx, cell_idx = _cells_to_run(engine, source, site)
    n_run, B, coords = len(cell_idx), engine.batch.shape[0], site.coords()
    base = {l: engine.cache[site.hook(l)] for l in site.layers}
    per_pass = engine.cells_per_pass(exp.max_batch)
    passes = 0
    with bar(n_run, "exact patching", unit="patch", enabled=exp.progress and n_run > 0) as pbar:
        for a in range(0, n_run, per_pass):
            li, ci = layer_idx[a : a + per_pass], cell_idx[a : a + per_pass]
            entry = torch.tensor([site.layers[i] for i in li.tolist()]).repeat_interleave(B)
            prompt = torch.arange(B).repeat(len(ci))
            rows_coords = {ax: v[ci].repeat_interleave(B) for ax, v in coords.items()}
            by_layer = {}
            for layer in sorted(set(entry.tolist())):
                rows = torch.nonzero(entry == layer)[:, 0]
                by_layer[layer] = patch_hook(site, source, base, layer, rows, prompt[rows],
                                             {ax: v[rows] for ax, v in rows_coords.items()})

            def hooks(k: int) -> list:
                return [(site.write_hook(k), by_layer[k])] if k in by_layer else []

            raw[li, ci] = engine.measure(exp.metric, engine.run(entry, prompt, hooks)).cpu().float()
            passes += 1
            pbar.update(len(ci))
    return ExactRun(raw.view(site.grid_shape), n_run, raw.numel() - n_run, passes, engine.mode)


def _cells_to_run(engine: Engine, source: dict[int, Tensor], site: Site) -> tuple[Tensor, Tensor]:
    """The ``(layer index, cell)`` of every cell with something to patch (its source and base activations differ for
    some prompt), sorted by layer: a cell whose activations are identical is its base run, not run again."""
    B = engine.batch.shape[0]
    coords = site.coords()
    n_cells = site.cells_per_layer()
    prompts_of = torch.arange(B).repeat(n_cells)
    cells_of = torch.arange(n_cells).repeat_interleave(B)
    todo: list[tuple[int, Tensor]] = []
    for i, layer in enumerate(site.layers):
        base_act, src_act = engine.cache[site.hook(layer)], source[layer]
        c = {a: v[cells_of] for a, v in coords.items()}
        same = (base_act[site.index(prompts_of.to(base_act.device), c, "base")]
                == src_act[site.index(prompts_of.to(src_act.device), c, "source")].to(base_act.device))
        same = same.reshape(n_cells * B, -1).all(-1).reshape(n_cells, B).all(-1).cpu()
        todo += [(i, idx) for idx in [torch.nonzero(~same)[:, 0]] if len(idx)]
    if not todo:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.full((len(idx),), i) for i, idx in todo]), torch.cat([idx for _, idx in todo])
