"""Neuron attribution: each MLP neuron's direct effect on a direction, without a ``[neurons, ..., d_model]`` tensor.

Neuron ``n`` of layer ``l`` writes ``post[n] * W_out[n]`` into the residual stream, so its direct effect on a direction
``d'`` is ``post[n] * (W_out[n] · d')``: project the ``d_mlp`` output rows once, then scale by the activations. The
final norm's scale is frozen per position, so it divides the projection per position; nothing of size ``d_model``
is ever multiplied out per neuron.

Example:
    >>> logits, cache = model.run_with_cache(model.to_tokens("The capital of France is"))
    >>> attr = neuron_attribution(model, cache, answer=" Paris")      # values: [layers, batch, pos, d_mlp]
    >>> dla = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> bool(torch.allclose(attr.values[:, 0, -1], dla.neurons[0], atol=1e-5))   # the last position: DLA's neurons
    True
    >>> b_out = 0 if dla.mlp_bias is None else dla.mlp_bias[0]           # b_out's part (this Llama has no b_out)
    >>> bool(torch.allclose(attr.values[:, 0, -1].sum(-1) + b_out, dla.mlps[0], atol=1e-5))  # neurons sum to each MLP
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mi_lenses.attribution.directions import (
    Direction,
    TokenSpec,
    centred_vectors,
    final_scale,
    resolve_direction,
    write_directions,
)
from mi_lenses.attribution.result import NeuronAttribution
from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec, resolve_indices
from mi_lenses.models.gaps import refuse
from mi_lenses.models.view import ModelView


def neuron_attribution(
    model: Any,
    cache: Any,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    direction: Tensor | Direction | None = None,
    layers: IndexSpec = None,
    positions: IndexSpec = None,
    through_final_norm: bool = True,
) -> NeuronAttribution:
    """Direct effect of every neuron at every (selected) position on ``answer`` (``- wrong``) or a vector direction:
    a :class:`~mi_lenses.attribution.result.NeuronAttribution` whose ``values`` are ``[layers, batch, pos, d_mlp]``.

    ``cache`` must hold ``blocks.{l}.mlp.hook_post`` for the layers and the final residual stream
    (``blocks.{L-1}.hook_resid_post``), whose norm scale is frozen per position. The direction is the same at every
    position (one per batch row). Equals TransformerLens's
    ``cache.stack_neuron_results(L, apply_ln=True, project_output_onto=W_U[:, answer])`` (compatibility mode),
    reshaped to ``[layers, batch, pos, d_mlp]`` (``.values``) — and is also right on a raw bridge, where the final
    norm's gain is applied to the direction here.

    Args:
        model: a TransformerLens model (raw ``TransformerBridge``, compatibility mode, or ``HookedTransformer``).
        cache: an ``ActivationCache`` of a batched run (``[batch, pos, d_model]``) holding the hooks above.
        answer: the token whose logit is attributed: a string that is exactly one token, an id, or one per prompt.
        wrong: optional token(s) subtracted: the attributed quantity is ``logit[answer] - logit[wrong]``.
        direction: instead of tokens, a ``[d_model]`` or ``[batch, d_model]`` vector read through the final norm like
            a column of ``W_U`` (``through_final_norm=False``: a plain residual projection).
        layers: blocks whose neurons are attributed (negative allowed); default all.
        positions: cache positions attributed (negative allowed); default all.
        through_final_norm: read ``direction`` through the final norm (default) or as a plain residual projection.

    Returns:
        :class:`~mi_lenses.attribution.result.NeuronAttribution`.
    """
    view = ModelView(model)
    refuse(view.model, "dla", "neuron attribution")
    if not view.has_mlp:
        raise LensInputError("this model has no MLP layers (cfg.attn_only): there are no neurons to attribute.")
    resid = cache[view.final_resid_hook]
    if resid.ndim != 3:
        raise LensInputError(
            f"expected a cache with a batch dimension ([batch, pos, d_model]), got {tuple(resid.shape)}."
        )
    B, S, _ = resid.shape
    if isinstance(direction, Direction):
        dirn = direction
    else:
        dirn = resolve_direction(view, B, answer, wrong, direction, through_final_norm)
    layer_ids = resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks",
                                ordered=False)
    # positions index the cache as it is (every position: plain views of the cache, no gather)
    pos = None if positions is None else torch.tensor(
        resolve_indices(positions, S, "position", f"the cache holds {S} positions", ordered=False),
        device=resid.device)

    def at(t: Tensor) -> Tensor:
        return t if pos is None else t.index_select(1, pos)

    P = S if pos is None else len(pos)
    dev = resid.device
    with torch.no_grad():
        vec = centred_vectors(view, dirn).to(dev)  # [B, d_model]
        inv_scale = (1.0 / final_scale(view, dirn, at(resid)))[..., None]  # [B, P, 1]
        per_position = view.writes_through_norms
        # the direction carried to each MLP's output (post-norms, multipliers, post-LN norms): per position where a
        # norm's frozen scale differs between positions, else once per row (then scaled by the final norm per position)
        dirs = write_directions(view, vec[:, None, :] * inv_scale if per_position else vec, cache, at)
        out = torch.zeros(len(layer_ids), B, P, view.d_mlp, device=dev)
        names = None
        for i, l in enumerate(layer_ids):
            if not view.layout(l).mlp:  # a block without an MLP with neurons (state-space, hybrid): zeros
                continue
            nr = view.neurons(l)
            if nr.names is not None and nr.size == view.d_mlp:
                names = list(nr.names)
            if nr.size:
                proj = nr.project(dirs.mlp[l]).to(dev)  # [B, (P,) n]: each neuron's output row on the direction
                if not per_position:
                    proj = proj[:, None, :] * inv_scale
                torch.mul(nr.activations(cache, at), proj, out=out[i, ..., : nr.size])
    return NeuronAttribution(model_name=view.name, metric=dirn.label, values=out, layers=list(layer_ids),
                             positions=list(range(S)) if pos is None else pos.tolist(), neuron_names=names)
