"""Attention scores from queries and keys: ``scale * q · k`` under the layer's mask (causal, and a sliding window or
chunks where the layer has them; :mod:`mi_lenses.models.masks`), soft-capped where the model caps them,
grouped-query attention included; and the pattern they give (the softmax, with the learned attention sinks of
models that have them). The identity the attention engine checks against ``hook_attn_scores`` and ``hook_pattern``,
and the neuron view decomposes.

Example:
    >>> q, k = torch.randn(4, 6, 8), torch.randn(4, 2, 8)     # [S, H, d], [S, KV, d]: 3 query heads per KV head
    >>> s = causal_scores(q, k, 0.5, 4)
    >>> tuple(s.shape), bool(torch.isinf(s[0, 0, 1])), bool(torch.allclose(s[5, 3, 2], 0.5 * q[3, 5] @ k[2, 1]))
    ((6, 4, 4), True, True)
    >>> w = causal_scores(q, k, 0.5, 4, LayerMask(window=2))   # query 3 sees keys 2 and 3 only
    >>> bool(torch.isinf(w[0, 3, 1])), bool(torch.isfinite(w[0, 3, 2]))
    (True, True)
    >>> p, sink = probabilities(w, LayerMask(window=2, sinks=torch.zeros(6)))   # a learned sink takes a share
    >>> bool(torch.allclose(p.sum(-1) + sink, torch.ones(6, 4)))
    True
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.models.masks import LayerMask

CAUSAL = LayerMask()


def causal_scores(q: Tensor, k: Tensor, scale: float, n: int, mask: LayerMask = CAUSAL) -> Tensor:
    """``scale * q · k`` of one prompt's first ``n`` tokens, ``[H, n, n]``, -inf where ``mask`` hides a key (after
    each query; outside its window or chunk). ``q`` is ``[S, H, d]``; ``k`` is ``[S, KV, d]``, one slice per
    key/value head: query head ``h`` reads KV head ``h // (H / KV)`` (grouped-query attention, the layout of
    ``ModelView.expand_kv``)."""
    return row_scores(q[:n], k, scale, 0, n, mask)


def row_scores(q: Tensor, k: Tensor, scale: float, first: int, n: int, mask: LayerMask = CAUSAL) -> Tensor:
    """The rows of :func:`causal_scores` of the queries ``first .. first + Q - 1`` (``q`` is ``[Q, H, d]``) over the
    prompt's ``n`` keys: ``[H, Q, n]``, soft-capped where ``mask`` says so, -inf on the keys it hides."""
    kk = k[:n].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    return mask.capped(s).masked_fill(~mask.visible(first, q.shape[0], n), -torch.inf)


def probabilities(scores: Float[Tensor, "H Q n"], mask: LayerMask = CAUSAL
                  ) -> tuple[Float[Tensor, "H Q n"], Float[Tensor, "H Q"]]:
    """The pattern of masked ``scores`` and each row's share on the learned attention sink (zero without sinks):
    ``softmax([scores, sink logit])`` split into the keys and the sink."""
    if mask.sinks is None:
        return scores.softmax(-1), torch.zeros(scores.shape[:-1])
    sink = mask.sinks.to(scores)[:, None, None].expand(*scores.shape[:-1], 1)
    p = torch.cat([scores, sink], -1).softmax(-1)
    return p[..., :-1], p[..., -1]
