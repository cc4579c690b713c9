"""Direct logit attribution on a model the user has hooked: the edits their hooks made, as parts of their own.

Every cached activation is the hooked model's, so head, MLP and neuron values are exact as they stand (each is what
that component computed in the hooked run). What a hook can break are the identities *between* the cached states:
a hook on ``hook_attn_out`` makes the heads no longer sum to what the layer wrote, one on ``hook_mlp_out`` does the
same to the neurons, one on a residual point adds a vector no component wrote, and one on ``hook_z`` makes a head's
output differ from ``pattern · v``. Each such difference, projected on the direction at the attributed position, is
an *edit*: a part of its own, named by the hook point where it shows (``edit@blocks.5.hook_attn_out``), so the parts
still sum to the hooked model's logit. A head whose ``z`` is no longer ``pattern · v`` keeps its exact value, but its
split over source positions is reported unavailable, with the reason.

Residual-stream edits are looked for where every block adds its sublayers' outputs to the stream as they are (no
post-norm, residual norm or residual multiplier, see :mod:`mi_lenses.models.blocks`); elsewhere the stream is not a
plain sum of the cached states, and only the attention and MLP edits are separated; where an edit there remains
(the parts do not add up), ``direct_logit_attribution`` refuses it with the reason instead of returning parts that
do not sum.

Edits are looked for only while the user's hooks are active (:func:`mi_lenses.models.interventions.active_hooks`):
without them a broken identity is a bug, and ``DLAResult.verify`` says so.

Example (a zeroed attention output):
    >>> kill = lambda out, hook: torch.zeros_like(out)
    >>> with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", kill)]):
    ...     res = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> res.active_hooks, list(res.interventions)
    (('blocks.1.hook_attn_out',), ['blocks.1.hook_attn_out'])
    >>> heads_and_edit = res.heads[0, 1].sum() + res.interventions["blocks.1.hook_attn_out"][0]
    >>> abs(float(heads_and_edit)) < 1e-4            # what the layer wrote: nothing
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.attribution.directions import Direction, effective_directions
from mi_lenses.attribution.result import SELF_CHECK_TOL
from mi_lenses.attribution.sources import pattern_rows
from mi_lenses.models.batch import Cached
from mi_lenses.models.view import ModelView

# |z - pattern · v| relative to |z| per model dtype: float32 noise is ~1e-6, a bfloat16 model's z is rounded to 8 bits
Z_RTOL = {"float32": 1e-3, "float64": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}


def _edit_tolerance(view: ModelView) -> tuple[float, float]:
    """Half of ``DLAResult.verify``'s (atol, rtol) for the model's dtype: a smaller edit cannot fail the check, and
    the rounding of a low-precision model is not taken for an edit."""
    atol, rtol = SELF_CHECK_TOL.get(_dtype(view), SELF_CHECK_TOL["float32"])
    return atol / 2, rtol / 2


def _dtype(view: ModelView) -> str:
    return str(view.dtype).replace("torch.", "")


@dataclass
class Edits:
    """``values``: hook name -> the edit's value on the direction per row; ``unavailable``: ``"L{l}H{h}"`` -> why
    that head's source positions are not given."""

    values: dict[str, Float[Tensor, " B"]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def plain_residual(view: ModelView) -> bool:
    """Whether every block adds its sublayers' outputs to the stream as they are (no post-norm, residual norm or
    residual multiplier): only then is the stream a plain sum of the cached states, and residual edits defined."""
    paths = [view.sublayer(l, s) for l in range(view.n_layers) for s in (("attn", "mlp") if view.has_mlp else ("attn",))]
    return all(p.post_norm is None and p.resid_norm is None and p.multiplier == 1.0 for p in paths)


def intervention_hooks(view: ModelView) -> list[str]:
    """The residual points read besides :func:`~mi_lenses.attribution.components.required_hooks` to find edits
    (none where the residual stream is not a plain sum: :func:`plain_residual`)."""
    if not plain_residual(view):
        return []
    points = ("resid_pre", "resid_post") if getattr(view.cfg, "parallel_attn_mlp", False) or not view.has_mlp \
        else ("resid_pre", "resid_mid", "resid_post")
    return [view.hook_name(p, l) for l in range(view.n_layers) for p in points]


@torch.no_grad()
def find_edits(view: ModelView, cache: Cached, parts, dirn: Direction, pos: Tensor, hooked: list[str]) -> Edits:
    """The edits of the user's hooks at each row's position ``pos`` (see the module docstring). Updates ``parts``
    (the engine's reduced parts) in place: an edited MLP's value becomes what its neurons computed (the edit is its
    own part) and an unavailable head's source positions become NaN."""
    pos_list = pos.tolist()
    d_eff, _ = effective_directions(view, dirn, parts.resid)
    dev = d_eff.device

    def at(t: Tensor) -> Tensor:
        return torch.stack([t[b, p] for b, p in enumerate(pos_list)]).float()

    def proj(hook: str) -> Tensor | None:
        t = cache.get(hook)
        return None if t is None else (at(t).to(dev) * d_eff).sum(-1).cpu()

    scale = parts.embed.abs().sum(-1) + parts.heads.abs().sum((1, 2)) + parts.neurons.abs().sum((1, 2))
    edit_atol, edit_rtol = _edit_tolerance(view)
    tol = edit_atol + edit_rtol * scale  # [B]
    edits = Edits()

    def keep(hook: str, value: Tensor | None) -> bool:
        if value is not None and bool((value.abs() > tol).any()):
            edits.values[hook] = value
            return True
        return False

    L = view.n_layers
    parallel = bool(getattr(view.cfg, "parallel_attn_mlp", False))
    plain = plain_residual(view)
    pre = [proj(view.hook_name("resid_pre", l)) for l in range(L)]
    post = [proj(view.hook_name("resid_post", l)) for l in range(L)]
    mid = [None if parallel or not view.has_mlp else proj(view.hook_name("resid_mid", l)) for l in range(L)]
    mlp_written = parts.mlps.clone() if parts.mlps is not None else None
    if pre[0] is not None and plain:
        keep(view.hook_name("resid_pre", 0), pre[0] - parts.embed.sum(-1))
    for l in range(L):
        attn = parts.heads[:, l].sum(-1) + (parts.attn_bias[:, l] if parts.attn_bias is not None else 0.0)
        keep(view.out_hook(l, "attn"), parts.attn_out[:, l] - attn)
        if parts.mlps is not None and parts.neurons.shape[-1]:
            computed = parts.neurons[:, l].sum(-1) + (parts.mlp_bias[:, l] if parts.mlp_bias is not None else 0.0)
            if keep(view.out_hook(l, "mlp"), parts.mlps[:, l] - computed):
                parts.mlps[:, l] = computed  # what the MLP computed; the hook's edit is its own part
        mlp = mlp_written[:, l] if mlp_written is not None else 0.0
        if not plain or pre[l] is None or post[l] is None:
            continue
        if mid[l] is not None:
            keep(view.hook_name("resid_mid", l), mid[l] - pre[l] - parts.attn_out[:, l])
            keep(view.hook_name("resid_post", l), post[l] - mid[l] - mlp)
        else:
            keep(view.hook_name("resid_post", l), post[l] - pre[l] - parts.attn_out[:, l] - mlp)
        if l + 1 < L and pre[l + 1] is not None:
            keep(view.hook_name("resid_pre", l + 1), pre[l + 1] - post[l])
    _mark_sources(view, cache, parts, pos_list, hooked, edits)
    return edits


def _mark_sources(view: ModelView, cache: Cached, parts, pos_list: list[int], hooked: list[str],
                  edits: Edits) -> None:
    """NaN the source positions of every head whose ``z`` is not ``pattern · v`` at the row's position."""
    names = {entry.split(" ")[0] for entry in hooked}
    for l in range(view.n_layers):
        z = view.split_heads(torch.stack([cache[view.attn_hook(l, "z")][b, p]
                                          for b, p in enumerate(pos_list)]).float())  # [B, H, d]
        pattern = pattern_rows(view, cache, l, torch.tensor(pos_list)).float()  # [B, H, K]
        v = view.expand_kv(view.attn_v(cache, l), dim=2).float()  # [B, K, H, d]
        recon = torch.einsum("bhk,bkhd->bhd", pattern, v.to(pattern.device))
        err = (z.to(recon.device) - recon).abs().amax(-1)
        bad = err > Z_RTOL.get(_dtype(view), 1e-3) * (1.0 + z.abs().amax(-1).to(recon.device))  # [B, H]
        for b, h in bad.nonzero().tolist():
            parts.sources[b, l, h] = float("nan")
            hook = view.attn_hook(l, "z")
            where = f"your hook on {hook}" if hook in names else "one of your hooks"
            edits.unavailable[f"L{l}H{h}"] = (
                f"{where} changed this head's output z so that pattern · v no longer reproduces it: the head's value "
                "is exact (read from the hooked z), its split over source positions is not defined")
