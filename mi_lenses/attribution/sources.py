"""Source positions: a head's direct effect split over the positions it reads.

Head ``h`` at destination ``p`` outputs ``z[p, h] @ W_O[h]`` with ``z[p, h] = Σ_s pattern[h, p, s] · v[s, kv(h)]``,
so its effect on a direction ``d'`` is ``Σ_s pattern[h, p, s] · (v[s, kv(h)] · (W_O[h] d'))``: one term per source position.
With grouped-query attention ``v`` has one slice per key/value head; query head ``h`` reads slice ``kv(h)``.

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
    pattern = cache[view.attn_hook(layer, "pattern")]  # [B, H, Q, K]
    v = view.expand_kv(cache[view.attn_hook(layer, "v")], dim=2)  # [B, K, H, d_head]
    row_pattern = torch.stack([pattern[b, :, p] for b, p in enumerate(pos.tolist())]).float()  # [B, H, K]
    value_on_dir = torch.einsum("bshd,bhd->bhs", v.float(), wod.to(v.device))  # [B, H, K]
    return row_pattern * value_on_dir
