"""Source positions: a head's direct effect split over the positions it reads.

Head ``h`` at destination ``p`` outputs ``z[p, h] @ W_O[h]`` with ``z[p, h] = Σ_s pattern[h, p, s] · v[s, kv(h)]``,
so its effect on a direction ``d'`` is ``Σ_s pattern[h, p, s] · (v[s, kv(h)] · (W_O[h] d'))``: one term per source position.
With grouped-query attention ``v`` has one slice per key/value head; query head ``h`` reads slice ``kv(h)``.
Only the pattern's rows at the attributed positions are read: a forward pass of ours keeps just those
(:func:`pattern_rows_kept`), never the ``[batch, heads, pos, pos]`` pattern of every layer.

Example (what :func:`~mi_lenses.attribution.direct_logit_attribution` stores as ``res.sources``):
    >>> res = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> res.sources.shape[1:3] == (model.cfg.n_layers, model.cfg.n_heads)
    True
    >>> bool(torch.allclose(res.sources.sum(-1), res.heads, atol=1e-5))   # source positions sum to each head
    True
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.models.batch import Reduction, derived
from mi_lenses.models.view import ModelView


def source_attribution(
    view: ModelView,
    cache: Any,
    layer: int,
    pos: Int[Tensor, " B"],
    wod: Float[Tensor, "B H d_head"],
) -> Float[Tensor, "B H S"]:
    """Per-source-position contribution of every head of ``layer`` at each row's destination position ``pos[b]``.

    ``wod[b, h] = W_O[h] @ d'_b`` is the head's output projection already dotted with the row's effective direction.
    """
    row_pattern = pattern_rows(view, cache, layer, pos).float()  # [B, H, K]
    gate = view.attn_hook(layer, "q_gate")
    if getattr(view.cfg, "gated_q_proj", False) and gate in view.hook_names:
        # Qwen3-Next / Qwen3.5: z = (pattern · v) ⊙ sigmoid(gate) at the destination, so the gate joins W_O d'
        g = torch.stack([cache[gate][b, p] for b, p in enumerate(pos.tolist())]).float()
        wod = wod * torch.sigmoid(g.reshape(wod.shape).to(wod.device))
    out_gate = view.output_gate(layer)
    if out_gate is not None:  # Laguna, AFMoE: the same with their own gate and activation
        hook, act = out_gate
        g = torch.stack([cache[hook][b, p] for b, p in enumerate(pos.tolist())]).float()  # [B, H] or [B, H * d]
        wod = wod * act(g.reshape(*wod.shape[:2], -1).to(wod.device))
    v = view.expand_kv(view.attn_v(cache, layer), dim=2)  # [B, K, H, d_value]
    value_on_dir = torch.einsum("bshd,bhd->bhs", v.float(), wod.to(v.device))  # [B, H, K]
    return row_pattern * value_on_dir


def pattern_rows_kept(view: ModelView, pos: Int[Tensor, " B"]) -> list[tuple[str, Reduction]]:
    """The reductions (:func:`~mi_lenses.models.batch.run_with_cache`) that keep each layer's pattern only at each
    row's query position ``pos[b]`` (``row``: ``[B, H, K]`` per layer instead of ``[B, H, S, S]``; ``row_pos``:
    ``pos``)."""
    rows = torch.arange(len(pos))

    def keep(pattern: Tensor) -> dict[str, Tensor]:
        return {"row": pattern[rows, :, pos.to(pattern.device)], "row_pos": pos.clone()}

    return [(view.attn_hook(l, "pattern"), keep) for l in view.attn_layers]


def pattern_rows(view: ModelView, cache: Any, layer: int, pos: Int[Tensor, " B"]) -> Float[Tensor, "B H K"]:
    """Block ``layer``'s attention pattern at each row's query position ``pos[b]``: the rows
    :func:`pattern_rows_kept` kept for these positions, else read from the whole cached pattern."""
    name = view.attn_hook(layer, "pattern")
    rows, at = cache.get(derived(name, "row")), cache.get(derived(name, "row_pos"))
    if rows is not None and at is not None and torch.equal(at.cpu(), pos.cpu()):
        return rows
    pattern = cache[name]  # [B, H, Q, K]
    return torch.stack([pattern[b, :, p] for b, p in enumerate(pos.tolist())])
