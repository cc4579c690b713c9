"""Streaming lens statistics: decode residual vectors and reduce to top-k, ranks, KL, entropy and CE on the fly.

The unembedding matmul (rows x d_model x vocab) dominates every lens. Instead of materialising
``[layers, batch, pos, vocab]`` logits, the vocabulary is processed in tiles that stay in cache; every statistic is an
online reduction over tiles (running max / sum-exp as in flash-attention, running top-k, counting for ranks), so memory
is ``O(chunk x tile)`` and each logit is written once and read from cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class FinalDistribution:
    """The final row's distribution at each position: what every other row is compared with."""

    probs: Float[Tensor, "n vocab"]
    neg_entropy: Float[Tensor, " n"]  # sum p log p (nats)
    top1: Int[Tensor, " n"]


@dataclass
class RowStats:
    """Statistics of decoded vectors ``[n]`` (one row of a lens, flattened over batch x positions)."""

    top_ids: Int[Tensor, "n k"]
    top_logits: Float[Tensor, "n k"]
    logsumexp: Float[Tensor, " n"]
    entropy: Float[Tensor, " n"]
    kl: Float[Tensor, " n"]
    final_top1_rank: Int[Tensor, " n"]
    target_ranks: Int[Tensor, "n t"]
    target_logits: Float[Tensor, "n t"]
    next_logit: Float[Tensor, " n"]
    logits: Float[Tensor, "n vocab"] | None = None


def _cap(logits: Tensor, softcap: float | None) -> Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _column_logits(x: Tensor, W: Tensor, b: Tensor | None, ids: Tensor, softcap: float | None) -> Tensor:
    """Logits of ``x[n]`` at per-row token ids ``ids[n, t]`` without computing the other columns."""
    cols = W.t()[ids]  # [n, t, d]
    out = torch.einsum("nd,ntd->nt", x, cols)
    if b is not None:
        out = out + b[ids]
    return _cap(out, softcap)


def row_stats(
    x: Float[Tensor, "n d"],
    W: Float[Tensor, "d vocab"],
    b: Float[Tensor, " vocab"] | None,
    *,
    k: int,
    final: FinalDistribution,
    positions_per_row: int,
    targets: Int[Tensor, "n t"],
    next_ids: Int[Tensor, " n"],
    softcap: float | None = None,
    keep_logits: bool = False,
    vocab_tile: int = 2048,
) -> RowStats:
    """Streamed statistics of ``x`` (already normalised, in W's dtype) decoded through ``W``/``b``.

    ``x`` holds whole rows of ``positions_per_row`` vectors; ``final`` is indexed by position, so the KL of vector i
    is taken against ``final.probs[i % positions_per_row]``.
    """
    n, vocab = x.shape[0], W.shape[1]
    reps = n // positions_per_row
    f_top1 = final.top1.repeat(reps)
    rank_ids = torch.cat([f_top1[:, None], targets], dim=1)  # [n, 1 + t]
    ref = _column_logits(x, W, b, rank_ids, softcap).float()
    next_logit = _column_logits(x, W, b, next_ids.clamp(min=0)[:, None], softcap).float()[:, 0]

    m = torch.full((n,), -torch.inf)
    s = torch.zeros(n)
    el = torch.zeros(n)
    kl_dot = torch.zeros(n)
    greater = torch.zeros(n, rank_ids.shape[1], dtype=torch.long)
    run_v = torch.empty(n, 0)
    run_i = torch.empty(n, 0, dtype=torch.long)
    full = torch.empty(n, vocab) if keep_logits else None
    probs = final.probs.view(1, positions_per_row, vocab)
    for j in range(0, vocab, vocab_tile):
        hi = min(j + vocab_tile, vocab)
        L = x @ W[:, j:hi]
        if b is not None:
            L += b[j:hi]
        L = _cap(L, softcap).float()
        if full is not None:
            full[:, j:hi] = L
        tv, ti = L.topk(min(k, hi - j), dim=-1)
        run_v = torch.cat([run_v, tv], dim=1)
        run_i = torch.cat([run_i, ti + j], dim=1)
        if run_v.shape[1] > k:
            run_v, sel = run_v.topk(k, dim=-1)
            run_i = run_i.gather(1, sel)
        # ranks: how many logits exceed each reference logit (self-comparison removed below)
        greater += (L[:, None, :] > ref[:, :, None]).sum(-1)
        inside = (rank_ids >= j) & (rank_ids < hi)
        own = L.gather(1, (rank_ids - j).clamp(0, hi - j - 1))
        greater -= (inside & (own > ref)).long()  # a token never outranks itself
        kl_dot += torch.linalg.vecdot(L.view(reps, positions_per_row, -1), probs[..., j:hi]).reshape(n)
        m_new = torch.maximum(m, tv[:, 0])
        scale = torch.exp(m - m_new)
        E = torch.exp(L - m_new[:, None])
        s = s * scale + E.sum(-1)
        el = el * scale + torch.linalg.vecdot(E, L)
        m = m_new
    lse = m + torch.log(s)
    entropy = lse - el / s
    kl = final.neg_entropy.repeat(reps) - kl_dot + lse
    return RowStats(
        top_ids=run_i,
        top_logits=run_v,
        logsumexp=lse,
        entropy=entropy,
        kl=kl.clamp(min=0.0),
        final_top1_rank=greater[:, 0],
        target_ranks=greater[:, 1:],
        target_logits=ref[:, 1:],
        next_logit=next_logit,
        logits=full,
    )
