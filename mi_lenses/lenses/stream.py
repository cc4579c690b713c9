"""Streaming lens statistics: decode residual vectors and reduce to top-k, ranks, KL, entropy and CE on the fly.

The unembedding matmul (rows x d_model x vocab) dominates every lens. Instead of materialising
``[layers, batch, pos, vocab]`` logits, the vocabulary is processed in tiles that stay in cache; every statistic is an
online reduction over tiles (running max / sum-exp as in flash-attention, running top-k, counting for ranks), so memory
is ``O(chunk x tile)`` and each logit is written once and read from cache.
"""

from __future__ import annotations

import os
import warnings
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


def _tile_update(
    L: Float[Tensor, "n w"],
    probs: Float[Tensor, "c w"],
    ref: Float[Tensor, "n r"],
    m: Float[Tensor, " n"],
    s: Float[Tensor, " n"],
    el: Float[Tensor, " n"],
    kl_dot: Float[Tensor, " n"],
    greater: Int[Tensor, "n r"],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fold one logit tile into the online reductions: running max ``m``, ``s = sum exp(L - m)``,
    ``el = sum exp(L - m) * L`` (entropy), ``kl_dot = sum p_final * L`` (KL) and the count of logits above each
    reference logit (ranks). Returns the updated reductions and the tile's row maxima."""
    n, w = L.shape
    tmax = L.amax(-1)
    m_new = torch.maximum(m, tmax)
    scale = torch.exp(m - m_new)
    E = torch.exp(L - m_new[:, None])
    s = s * scale + E.sum(-1)
    el = el * scale + (E * L).sum(-1)
    kl_dot = kl_dot + (L.view(n // probs.shape[0], probs.shape[0], w) * probs).sum(-1).reshape(n)
    greater = greater + (L[:, None, :] > ref[:, :, None]).sum(-1)
    return m_new, s, el, kl_dot, greater, tmax


_COMPILED: dict[str, object] = {}
FUSE_MIN_VECTORS = 16384  # auto mode compiles the tile update only for jobs at least this large (decoded vectors)


def fused_tile_update():
    """``_tile_update`` compiled by ``torch.compile`` into one pass over each tile (about 5x less time than eager
    on the reductions), or ``None`` when compilation is unavailable (no C++ compiler) or disabled with
    ``MI_LENSES_NO_COMPILE=1``. Compiled once per process for all shapes (about 10-20 s, cached on disk by torch)."""
    if os.environ.get("MI_LENSES_NO_COMPILE", "0") not in ("0", ""):
        return None
    if "fn" not in _COMPILED:
        fn = None
        try:
            candidate = torch.compile(_tile_update, dynamic=True)
            probe = [torch.randn(4, 8), torch.rand(2, 8), torch.randn(4, 1), torch.full((4,), -torch.inf),
                     torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4, 1, dtype=torch.long)]
            got, want = candidate(*probe), _tile_update(*probe)
            if all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(got, want)):
                fn = candidate
        except Exception as err:  # no compiler, unsupported platform: stay correct, just slower
            warnings.warn(f"mi_lenses: torch.compile unavailable ({type(err).__name__}); using eager reductions.")
        _COMPILED["fn"] = fn
    return _COMPILED["fn"]


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
    fused: bool | None = None,
) -> RowStats:
    """Streamed statistics of ``x`` (already normalised, in W's dtype) decoded through ``W``/``b``.

    ``x`` holds whole rows of ``positions_per_row`` vectors; ``final`` is indexed by position, so the KL of vector i
    is taken against ``final.probs[i % positions_per_row]``. ``fused``: run the per-tile reductions as one compiled
    kernel (``None``: when the job is large, see ``FUSE_MIN_VECTORS``; falls back to eager when unavailable).
    """
    n, vocab = x.shape[0], W.shape[1]
    reps = n // positions_per_row
    f_top1 = final.top1.repeat(reps)
    rank_ids = torch.cat([f_top1[:, None], targets], dim=1)  # [n, 1 + t]
    ref = _column_logits(x, W, b, rank_ids, softcap).float()
    next_logit = _column_logits(x, W, b, next_ids.clamp(min=0)[:, None], softcap).float()[:, 0]

    update = (fused_tile_update() if (fused or (fused is None and n >= FUSE_MIN_VECTORS)) else None) or _tile_update
    m = torch.full((n,), -torch.inf)
    s = torch.zeros(n)
    el = torch.zeros(n)
    kl_dot = torch.zeros(n)
    greater = torch.zeros(n, rank_ids.shape[1], dtype=torch.long)
    run_v = torch.full((n, k), -torch.inf)
    run_i = torch.zeros(n, k, dtype=torch.long)
    full = torch.empty(n, vocab) if keep_logits else None
    in_place = x.dtype == torch.float32 and W.dtype == torch.float32
    buf = torch.empty(n, min(vocab_tile, vocab)) if in_place else None  # reused: no page faults per tile
    for j in range(0, vocab, vocab_tile):
        hi = min(j + vocab_tile, vocab)
        if buf is not None:
            L = torch.mm(x, W[:, j:hi], out=buf[:, : hi - j])
        else:
            L = x @ W[:, j:hi]
        if b is not None:
            L += b[j:hi]
        L = _cap(L, softcap).float()
        if full is not None:
            full[:, j:hi] = L
        m, s, el, kl_dot, greater, tmax = update(L, final.probs[:, j:hi], ref, m, s, el, kl_dot, greater)
        # running top-k: only rows whose tile maximum beats their current k-th best can change it
        rows = (tmax > run_v[:, -1]).nonzero().squeeze(1)
        if len(rows):
            Lr = L if len(rows) == n else L.index_select(0, rows)
            tv, ti = Lr.topk(min(k, hi - j), dim=-1)
            cv, sel = torch.cat([run_v[rows], tv], 1).topk(k, dim=-1)
            run_v[rows] = cv
            run_i[rows] = torch.cat([run_i[rows], ti + j], 1).gather(1, sel)
        # a token never outranks itself (its tile logit may differ from the gathered one in the last bit)
        inside = (rank_ids >= j) & (rank_ids < hi)
        own = L.gather(1, (rank_ids - j).clamp(0, hi - j - 1))
        greater -= (inside & (own > ref)).long()
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
