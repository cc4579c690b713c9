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
from jaxtyping import Float
from torch import Tensor

from mi_lenses.models.view import ModelView
from mi_lenses.patching.experiment import Experiment
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


def gradient_grid(exp: Experiment, site: Site, *, ig_steps: int | None = None) -> GradientRun:
    """Attribution (``ig_steps=None``) or EAP-IG (``ig_steps`` points) of every cell of ``site``: the source run (and
    for EAP-IG the base run) cached at the site's hooks and at ``blocks.0.hook_resid_pre``, one gradient pass (plain
    attribution reads the base activations and the base run's metric from it), the metric measured on both runs."""
    view, metric = exp.view, exp.metric
    names = {site.hook(l) for l in site.layers} | {view.hook_name("resid_pre", 0)}
    src_logits, source_cache = view.run_with_cache(exp.pair.source, names)
    base_cache = None
    if ig_steps:
        base_logits, base_cache = view.run_with_cache(exp.pair.base, names)
    grad = _gradient_pass(exp, site, source_cache, base_cache, ig_steps)
    base_raw = metric.cells(logits=base_logits) if ig_steps else torch.tensor([grad.base_raw])
    exp.measure(base=base_raw, source=metric.cells(logits=src_logits))
    values = _cell_attributions(site, grad, source_cache, exp.pair.n_prompts)
    return GradientRun(values, grad.base_raw, _cut_sum(exp, grad, source_cache) if ig_steps else None)


@dataclass
class _Pass:
    """One gradient pass: ``grads`` at the write hooks (and the cut), summed over the IG points; ``acts`` the base
    run's activations at the read hooks; ``base_raw`` the base run's metric (plain attribution)."""

    grads: dict[str, Tensor | None]
    acts: dict[str, Tensor]
    base_raw: float
    points: int


def _gradient_pass(exp: Experiment, site: Site, source_cache: dict[str, Tensor], base_cache: dict[str, Tensor] | None,
                   ig_steps: int | None) -> _Pass:
    """The gradient of the metric (raw units, averaged over the IG points) at every write hook of ``site`` (and at the
    embedding cut for EAP-IG), from one batched forward and backward pass of the base run."""
    view, B = exp.view, exp.pair.n_prompts
    m = ig_steps or 1
    cut = view.hook_name("resid_pre", 0)
    deltas: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}
    hooks: list = [(cut, _interpolate(exp, source_cache[cut], m))] if ig_steps else []
    if base_cache is None:  # plain attribution: this pass is the base run
        hooks += [(name, _record(acts, name)) for name in dict.fromkeys(site.hook(l) for l in site.layers)]
    writes = [site.write_hook(l) for l in site.layers] + ([cut] if ig_steps else [])
    hooks += [(name, perturb_hook(deltas, name)) for name in dict.fromkeys(writes)]
    raw = metric_pass(view, exp.metric, exp.pair.base.tokens.repeat(m, 1), hooks)
    total = raw.sum() / m  # raw units: the caller divides by the normalisation's gap
    order = list(deltas)
    got = torch.autograd.grad(total, [deltas[n] for n in order], allow_unused=True)
    grads = {n: None if g is None else g.view(m, B, *g.shape[1:]).sum(0) for n, g in zip(order, got)}
    if base_cache is not None:
        acts = dict(base_cache)
    return _Pass(grads, acts, float(raw[0].detach()) if not ig_steps else float("nan"), m)


def _interpolate(exp: Experiment, x_source: Tensor, m: int):
    """The hook moving the base run's embeddings (aligned positions) to the ``m`` midpoints towards the source's."""
    B = exp.pair.n_prompts
    src_pos = torch.tensor([p[0] for p in exp.pair.pos_map])
    dst_pos = torch.tensor([p[1] for p in exp.pair.pos_map])
    alphas = (torch.arange(m, dtype=torch.float32) + 0.5) / m

    def hook(t: Tensor, hook=None) -> Tensor:
        x0 = x_source.to(t.device, t.dtype).repeat(m, 1, 1)
        a = alphas.to(t.device, t.dtype).repeat_interleave(B)[:, None, None]
        out = t.clone()
        dp, sp = dst_pos.to(t.device), src_pos.to(t.device)
        out[:, dp] = t[:, dp] + a * (x0[:, sp] - t[:, dp])
        return out

    return hook


def _record(acts: dict[str, Tensor], name: str):
    def hook(t: Tensor, hook=None) -> None:
        acts[name] = t.detach()

    return hook


def _cell_attributions(site: Site, grad: _Pass, source_cache: dict[str, Tensor], B: int) -> Float[Tensor, "L ..."]:
    """``Σ_cell (a_source - a_base) · gradient`` of every cell of ``site`` (raw units)."""
    out = torch.zeros(site.grid_shape).view(len(site.layers), -1)
    coords = site.coords()
    n_cells = site.cells_per_layer()
    prompts = torch.arange(B).repeat(n_cells)
    cells = {a: v.repeat_interleave(B) for a, v in coords.items()}
    for i, layer in enumerate(site.layers):
        name = site.hook(layer)
        base_act = grad.acts[name]
        g = grad.grads[site.write_hook(layer)]
        g = torch.zeros_like(base_act) if g is None else g
        src_act = source_cache[name].to(base_act.device)
        p = prompts.to(base_act.device)
        dst = site.index(p, cells, "base")
        delta = src_act[site.index(p, cells, "source")].float() - base_act[dst].float()
        out[i] = (delta * g[dst].float()).reshape(n_cells, B, -1).sum((1, 2)).cpu()
    return out.view(site.grid_shape)


def _cut_sum(exp: Experiment, grad: _Pass, source_cache: dict[str, Tensor]) -> float:
    """EAP-IG's attributions on the embedding cut (every aligned position of ``blocks.0.hook_resid_pre``), summed."""
    cut = exp.view.hook_name("resid_pre", 0)
    base_x = grad.acts[cut]
    g = grad.grads[cut]
    g = torch.zeros_like(base_x) if g is None else g
    src_pos = torch.tensor([p[0] for p in exp.pair.pos_map], device=g.device)
    dst_pos = torch.tensor([p[1] for p in exp.pair.pos_map], device=g.device)
    x_src = source_cache[cut].to(base_x.device).float()
    return float(((x_src[:, src_pos] - base_x[:, dst_pos].float()) * g[:, dst_pos].float()).sum())


def site_ig_grid(exp: Experiment, site: Site, *, ig_steps: int) -> Tensor:
    """Integrated gradients at the patched site (Marks et al. 2024), raw metric units ``[layers, *grid]``: for each
    layer of ``site`` on its own, the base run with that layer's whole activation (at the aligned positions) moved to
    ``ig_steps`` midpoints towards the source run's, the gradient there averaged, times ``a_source - a_base`` per cell.
    Summed over every cell of a layer whose activation is a cut (``resid_pre``, whole positions) it tends to the
    metric difference of the runs (completeness). The metric is measured on both runs."""
    view, B, m = exp.view, exp.pair.n_prompts, ig_steps
    names = {site.hook(l) for l in site.layers}
    src_logits, source_cache = view.run_with_cache(exp.pair.source, names)
    base_logits, base_cache = view.run_with_cache(exp.pair.base, names)
    exp.measure(base=exp.metric.cells(logits=base_logits), source=exp.metric.cells(logits=src_logits))
    S = exp.pair.base.shape[1]
    per_pass = max(1, (exp.max_batch or max(1, 8192 // S)) // B)
    grads: dict[str, Tensor | None] = {}
    for layer in site.layers:
        read, write = site.hook(layer), site.write_hook(layer)
        total = None
        for a in range(0, m, per_pass):
            alphas = (torch.arange(a, min(m, a + per_pass), dtype=torch.float32) + 0.5) / m
            deltas: dict[str, Tensor] = {}
            hooks = [(write, _site_interpolate(site, source_cache[read], base_cache[read], alphas, B)),
                     (write, perturb_hook(deltas, write))]
            raw = metric_pass(view, exp.metric, exp.pair.base.tokens.repeat(len(alphas), 1), hooks)
            (g,) = torch.autograd.grad(raw.sum() / m, [deltas[write]], allow_unused=True)
            if g is not None:
                g = g.detach().view(len(alphas), B, *g.shape[1:]).sum(0)
                total = g if total is None else total + g
        grads[write] = total
    return _cell_attributions(site, _Pass(grads, dict(base_cache), float("nan"), m), source_cache, B)


def _site_interpolate(site: Site, source: Tensor, base: Tensor, alphas: Tensor, B: int):
    """The hook moving a layer's activation (rows: ``len(alphas)`` copies of the base prompts) at the aligned
    positions to ``base + alpha (source - base)``; an additive site (``resid_mid``) adds ``alpha (source - base)``."""
    pos_dim = site.axes.index("pos") + 1
    src_pos = torch.tensor([p[0] for p in site.pos_map])
    dst_pos = torch.tensor([p[1] for p in site.pos_map])
    n = len(alphas)

    def hook(t: Tensor, hook=None) -> Tensor:
        a = alphas.to(t.device, t.dtype).repeat_interleave(B).view(-1, *([1] * (t.ndim - 1)))
        sp, dp = src_pos.to(t.device), dst_pos.to(t.device)
        src = source.to(t.device, t.dtype).movedim(pos_dim, 1)[:, sp].repeat(n, *([1] * (t.ndim - 1)))
        out = t.clone()
        view = out.movedim(pos_dim, 1)
        if site.additive:
            b = base.to(t.device, t.dtype).movedim(pos_dim, 1)[:, dp].repeat(n, *([1] * (t.ndim - 1)))
            view[:, dp] = view[:, dp] + a * (src - b)
        else:
            view[:, dp] = view[:, dp] + a * (src - view[:, dp])
        return out

    return hook
