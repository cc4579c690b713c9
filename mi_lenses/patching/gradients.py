"""Attribution patching and EAP-IG: the patching grid estimated from gradients.

``method="attribution"`` (Nanda 2023; Syed et al. 2023) is the first-order estimate of every cell at once:

    value(cell) ≈ Σ_cell (a_source - a_base) · ∂metric/∂a |_base

from one forward and one backward pass of the base run (plus the source run's activations). It is what TransformerLens
4.3's ``tools.analysis.attribution_patching.attribution_patch`` computes at node granularity on the bridge (the oracle
test checks it), available here on both worlds and for every ``what``/``by``.

``method="eap_ig"`` integrates the gradient along the straight path between the two runs' input embeddings (Hanna,
Pezzelle & Belinkov 2024, "Have Faith in Faithfulness"): ``ig_steps`` points ``x_α = x_base + α (x_source - x_base)``,
``α = (k + 1/2) / ig_steps`` (the midpoint rule), all in one batched forward and one backward pass:

    value(cell) ≈ Σ_cell (a_source - a_base) · mean_α ∂metric/∂a |_{x_α}

Completeness: on the embedding cut (the residual entering block 0, every position) the integrated attributions sum
to ``metric(source) - metric(base)`` as ``ig_steps`` grows (the integrated-gradients theorem); the result reports both
sums (``res.completeness``), so you can see how far the steps you chose are from it.

Example:
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     answer=" Paris", wrong=" city", method="eap_ig", ig_steps=16)
    >>> cut, diff = res.completeness
    >>> abs(cut - diff) < 0.05 * abs(diff)         # the embedding cut sums to the metric difference (1 - 0)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mi_lenses.models.batch import Batch
from mi_lenses.models.view import ModelView
from mi_lenses.patching.metric import Metric
from mi_lenses.patching.replay import hooks_after_blocks
from mi_lenses.patching.sites import Site


class Stop(Exception):
    """Raised by :func:`stop_hook` on the final residual stream: the default metric needs nothing after it."""

    def __init__(self, resid: Tensor):
        self.resid = resid


def stop_hook(t: Tensor, hook=None) -> None:
    raise Stop(t)


def perturb_hook(deltas: dict[str, Tensor], name: str):
    """A hook returning ``t + d`` for a zero ``d`` that requires grad (kept in ``deltas[name]``): the gradient
    with respect to ``d`` is the gradient with respect to the activation, on both worlds (a bridge hands hooks a
    reshaped view whose own ``.grad`` never fills)."""

    def hook(t: Tensor, hook=None) -> Tensor:
        d = torch.zeros_like(t, requires_grad=True)
        deltas[name] = d
        return t + d

    return hook


def metric_pass(view: ModelView, metric: Metric, tokens: Tensor, hooks: list) -> Tensor:
    """The raw metric of a forward pass with ``hooks`` (gradients on): read from the final residual stream when
    the default metric allows it (no unembedding of every position), else from the model's logits."""
    if not metric.needs_logits and not decode_in_model(view):
        hooks = hooks + [(view.final_resid_hook, stop_hook)]
    with torch.enable_grad(), view.model.hooks(fwd_hooks=hooks):
        try:
            return metric.cells(logits=view.model(tokens))
        except Stop as s:
            return metric.cells(resid=s.resid)


@dataclass
class GradientRun:
    """The attributions (``[layers, *grid]``, in raw metric units), the base run's raw metric (plain attribution)
    and, for EAP-IG, the embedding cut's attributions summed (raw units)."""

    values: Tensor
    base_raw: float
    completeness: float | None


def decode_in_model(view: ModelView) -> bool:
    """Whether the final norm and unembedding must run in the model: a callable metric (it reads logits), or user
    hooks after the blocks (hook points, or plain torch hooks on ``ln_final`` / ``unembed``). Otherwise the default
    metric is read from the final residual stream by the decoder."""
    return hooks_after_blocks(view)


def gradient_grid(view: ModelView, base: Batch, source_cache: dict[str, Tensor], site: Site, metric: Metric,
                  pos_map: list[tuple[int, int]], *, ig_steps: int | None = None,
                  base_cache: dict[str, Tensor] | None = None) -> GradientRun:
    """Attribution (``ig_steps=None``) or EAP-IG (``ig_steps`` points) of every cell of ``site``; ``source_cache``
    (and for EAP-IG ``base_cache``) hold the runs' activations at the site's hooks and at
    ``blocks.0.hook_resid_pre``; plain attribution reads the base activations from its own gradient pass."""
    B = base.shape[0]
    m = ig_steps or 1
    names = [site.hook(l) for l in site.layers]
    writes = {site.write_hook(l): site.hook(l) for l in site.layers}  # where the gradient is taken -> read hook
    cut = view.hook_name("resid_pre", 0)
    deltas: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    src_pos = torch.tensor([p[0] for p in pos_map])
    dst_pos = torch.tensor([p[1] for p in pos_map])
    alphas = (torch.arange(m, dtype=torch.float32) + 0.5) / m if ig_steps else torch.zeros(1)

    def interpolate(t: Tensor, hook=None) -> Tensor:
        x0 = source_cache[cut].to(t.device, t.dtype).repeat(m, 1, 1)
        a = alphas.to(t.device, t.dtype).repeat_interleave(B)[:, None, None]
        out = t.clone()
        dp, sp = dst_pos.to(t.device), src_pos.to(t.device)
        out[:, dp] = t[:, dp] + a * (x0[:, sp] - t[:, dp])
        return out

    def record(name: str):
        def hook(t: Tensor, hook=None) -> None:
            values[name] = t.detach()  # plain attribution: this pass is the base run

        return hook

    hooks: list = []
    if ig_steps:
        hooks.append((cut, interpolate))
    if base_cache is None:
        hooks += [(name, record(name)) for name in dict.fromkeys(names)]
    for name in dict.fromkeys(list(writes) + ([cut] if ig_steps else [])):
        hooks.append((name, perturb_hook(deltas, name)))
    raw = metric_pass(view, metric, base.tokens.repeat(m, 1), hooks)
    total = raw.sum() / m  # raw units: the caller divides by the normalisation's gap
    order = list(deltas)
    grads = dict(zip(order, torch.autograd.grad(total, [deltas[n] for n in order], allow_unused=True)))
    base_raw = float(raw[0].detach()) if not ig_steps else float("nan")
    if base_cache is not None:
        values = {n: base_cache[n] for n in set(names) | {cut}}
    out_vals = torch.zeros(site.grid_shape).view(len(site.layers), -1)
    coords = site.coords()
    n_cells = site.cells_per_layer()
    prompts = torch.arange(B).repeat(n_cells)
    cells = {a: v.repeat_interleave(B) for a, v in coords.items()}
    for i, layer in enumerate(site.layers):
        name = site.hook(layer)
        g = grads[site.write_hook(layer)]
        g = torch.zeros_like(values[name]) if g is None else g.view(m, B, *g.shape[1:]).sum(0)
        base_act, src_act = values[name], source_cache[name].to(values[name].device)
        p = prompts.to(base_act.device)
        dst = site.index(p, cells, "base")
        delta = src_act[site.index(p, cells, "source")].float() - base_act[dst].float()
        contrib = (delta * g[dst].float()).reshape(n_cells, B, -1).sum((1, 2))
        out_vals[i] = contrib.cpu()
    completeness = None
    if ig_steps:
        g = grads[cut]
        g = torch.zeros_like(values[cut]) if g is None else g.view(m, B, *g.shape[1:]).sum(0)
        x_src = source_cache[cut].to(values[cut].device).float()
        dp, sp = dst_pos.to(g.device), src_pos.to(g.device)
        cut_sum = float(((x_src[:, sp] - values[cut][:, dp].float()) * g[:, dp].float()).sum())
        completeness = cut_sum
    return GradientRun(out_vals.view(site.grid_shape), base_raw, completeness)
