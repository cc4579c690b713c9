"""Exact activation patching: every cell of the grid is a real forward pass with that one activation patched.

The numbers are TransformerLens's ``patching.get_act_patch_*`` (the oracle tests check them to 1e-4 on both worlds);
the work is not. Rows (cell x prompt) are batched into few forward passes, each row computed from the block where its
patch sits (:mod:`mi_lenses.patching.replay`), and a cell whose source and base activations are identical (the same
token at layer 0, a position before the first difference) is not run at all: its patched run *is* the base run.

Example:
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     answer=" Paris", wrong=" city", what="resid_pre")
    >>> res.values.shape == (model.cfg.n_layers, 6), res.method
    (True, 'exact')
    >>> float(res.values[0, 0]) == 0.0, res.cells_skipped > 0   # <bos> in both runs: not run, changes nothing
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mi_lenses.patching.metric import Metric
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
def exact_grid(engine: Engine, source: dict[int, Tensor], site: Site, metric: Metric, *, max_batch: int | None = None,
               progress: bool = True) -> ExactRun:
    """The raw metric of every cell of ``site`` (``[layers, *grid]``) with the ``source`` run's activation (per layer
    of ``site.layers``) patched into the ``engine``'s base run."""
    B = engine.batch.shape[0]
    coords = site.coords()
    n_cells = site.cells_per_layer()
    base = {l: engine.cache[site.hook(l)] for l in site.layers}
    base_raw = float(metric.cells(**_final(engine, engine.logits, engine.cache[engine.view.final_resid_hook]))[0])
    raw = torch.full((len(site.layers), n_cells), base_raw)
    # rows to run: (layer, cell) with something to patch, each with its B prompts
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
    # one row per (cell, prompt), sorted by block
    layer_idx = torch.cat([torch.full((len(idx),), i) for i, idx in todo]) if todo else torch.zeros(0, dtype=torch.long)
    cell_idx = torch.cat([idx for _, idx in todo]) if todo else torch.zeros(0, dtype=torch.long)
    n_run = len(cell_idx)
    per_pass = engine.cells_per_pass(max_batch)
    passes = 0
    with bar(n_run, "exact patching", unit="patch", enabled=progress and n_run > 0) as pbar:
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

            final = engine.run(entry, prompt, hooks)
            values = metric.cells(**_final(engine, final if engine.returns_logits else None,
                                           None if engine.returns_logits else final))
            raw[li, ci] = values.cpu().float()
            passes += 1
            pbar.update(len(ci))
    return ExactRun(raw.view(site.grid_shape), n_run, len(site.layers) * n_cells - n_run, passes, engine.mode)


def _final(engine: Engine, logits: Tensor | None, resid: Tensor | None) -> dict[str, Tensor | None]:
    """The keyword :meth:`Metric.cells` reads: the logits when the engine returns them, else the final residual."""
    if logits is not None:
        return {"logits": logits}
    return {"resid": resid}
