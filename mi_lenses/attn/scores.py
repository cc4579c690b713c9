"""Attention scores from queries and keys: ``scale * q · k`` with the causal mask, grouped-query attention
included (the identity the attention engine checks against ``hook_attn_scores`` and the neuron view decomposes).

Example:
    >>> q, k = torch.randn(4, 6, 8), torch.randn(4, 2, 8)     # [S, H, d], [S, KV, d]: 3 query heads per KV head
    >>> s = causal_scores(q, k, 0.5, 4)
    >>> tuple(s.shape), bool(torch.isinf(s[0, 0, 1])), bool(torch.allclose(s[5, 3, 2], 0.5 * q[3, 5] @ k[2, 1]))
    ((6, 4, 4), True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_scores(q: Tensor, k: Tensor, scale: float, n: int) -> Tensor:
    """``scale * q · k`` of one prompt's first ``n`` tokens, ``[H, n, n]``, with the causal mask (-inf above the
    diagonal). ``q`` is ``[S, H, d]``; ``k`` is ``[S, KV, d]``, one slice per key/value head: query head ``h`` reads
    KV head ``h // (H / KV)`` (grouped-query attention, the layout of ``ModelView.expand_kv``)."""
    return row_scores(q[:n], k, scale, 0, n)


def row_scores(q: Tensor, k: Tensor, scale: float, first: int, n: int) -> Tensor:
    """The rows of :func:`causal_scores` of the queries ``first .. first + Q - 1`` (``q`` is ``[Q, H, d]``) over the
    prompt's ``n`` keys: ``[H, Q, n]``, -inf on keys after each query."""
    kk = k[:n].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    later = torch.arange(n)[None, :] > torch.arange(first, first + q.shape[0])[:, None]
    return s.masked_fill(later, -torch.inf)
