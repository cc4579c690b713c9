"""Streaming lens statistics: decode hidden states and reduce them to top-k, ranks, KL, entropy and CE on the fly.

The unembedding matmul (rows x d_model x vocab) dominates every lens. Instead of materialising
``[layers, batch, pos, vocab]`` logits, the vocabulary is processed in tiles that stay in cache; every statistic is an
online reduction over tiles (running max / sum-exp as in flash-attention, running top-k, counting for ranks), so memory
is ``O(chunk x tile)`` and each logit is written once and read from cache. All logits come from the model's
:class:`~mi_lenses.models.decode.Decoder`.

Example:
    >>> dec = ModelView(model).decoder
    >>> xn = dec.normalize(torch.randn(6, model.cfg.d_model))
    >>> final, own = final_row(dec, xn[:3], k=2, targets=torch.zeros(3, 0, dtype=torch.long),
    ...                        next_ids=torch.full((3,), -1))
    >>> st = row_stats(dec, xn, k=2, final=final, targets=torch.zeros(6, 0, dtype=torch.long),
    ...                next_ids=torch.full((6,), -1), vocab_tile=64)
    >>> st.top_ids.shape, bool(torch.allclose(st.logsumexp, dec.logits(xn, normalized=True).logsumexp(-1), atol=1e-5))
    (torch.Size([6, 2]), True)
    >>> float(own.kl.abs().max()), own.final_top1_rank.tolist()
    (0.0, [0, 0, 0])
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.models.decode import Decoder


@dataclass
class FinalDistribution:
    """The final row's distribution at each position: what every other row is compared with."""

    probs: Float[Tensor, "n vocab"]
    neg_entropy: Float[Tensor, " n"]  # sum p log p (nats)
    top1: Int[Tensor, " n"]


@dataclass
class Stats:
    """Statistics of decoded vectors with leading dimensions ``...`` (``[n]`` for one chunk, ``[R, N]`` in a result
    buffer): one record for the final row, the streamed rows and the buffers they fill."""

    top_ids: Int[Tensor, "... k"]
    top_logits: Float[Tensor, "... k"]
    logsumexp: Float[Tensor, "..."]
    entropy: Float[Tensor, "..."]
    kl: Float[Tensor, "..."]
    final_top1_rank: Int[Tensor, "..."]
    target_ranks: Int[Tensor, "... t"]
    target_logits: Float[Tensor, "... t"]
    next_logit: Float[Tensor, "..."]
    final_top1_logit: Float[Tensor, "..."]  # the logit of the final row's top-1 token (surprisal, precision@1)
    logits: Float[Tensor, "... vocab"] | None = None

    @classmethod
    def empty(cls, shape: tuple[int, ...], k: int, t: int, vocab: int | None = None) -> "Stats":
        """A zero-filled buffer with leading dimensions ``shape``."""
        f, i = dict(dtype=torch.float32), dict(dtype=torch.long)
        return cls(torch.zeros(*shape, k, **i), torch.zeros(*shape, k, **f), torch.zeros(*shape, **f),
                   torch.zeros(*shape, **f), torch.zeros(*shape, **f), torch.zeros(*shape, **i),
                   torch.zeros(*shape, t, **i), torch.zeros(*shape, t, **f), torch.zeros(*shape, **f),
                   torch.zeros(*shape, **f), None if vocab is None else torch.zeros(*shape, vocab, **f))

    def put(self, index: tuple, other: "Stats") -> None:
        """``self.field[index] = other.field`` for every field both hold."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is not None and theirs is not None:
                mine[index] = theirs.to(mine.device)

    def split(self, parts: int) -> list["Stats"]:
        """``parts`` equal slices along the first dimension (one per lens row of a chunk)."""
        cut = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).chunk(parts)
               for f in dataclasses.fields(self)}
        return [Stats(**{k: None if v is None else v[i] for k, v in cut.items()}) for i in range(parts)]


def final_row(
    decoder: Decoder,
    xn: Float[Tensor, "n d_model"],
    *,
    k: int,
    targets: Int[Tensor, "n t"],
    next_ids: Int[Tensor, " n"],
    keep_logits: bool = False,
) -> tuple[FinalDistribution, Stats]:
    """The final row decoded in full (``xn`` normalised, in the matmul dtype): its distribution, which every other
    row's KL is taken against, and its own statistics (KL 0, its top-1 has rank 0)."""
    logits = decoder.tile(xn, 0, decoder.W.shape[1])
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    neg_entropy = torch.linalg.vecdot(probs, logp)
    top_logits, top_ids = logits.topk(k, dim=-1)
    top1 = top_ids[:, 0].clone()
    ref = logits.gather(1, torch.cat([top1[:, None], targets], 1))
    ranks = (logits[:, None, :] > ref[:, :, None]).sum(-1)
    stats = Stats(top_ids, top_logits, torch.logsumexp(logits, -1), -neg_entropy, torch.zeros(len(xn)), ranks[:, 0],
                  ranks[:, 1:], ref[:, 1:], logits.gather(1, next_ids.clamp(min=0)[:, None])[:, 0], ref[:, 0],
                  logits if keep_logits else None)
    return FinalDistribution(probs, neg_entropy, top1), stats


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
    ``el = sum exp(L - m) * L`` (entropy), ``kl_dot = sum p_final * L`` (KL; the tile's rows are whole groups of
    ``probs``' rows) and the count of logits above each reference logit (ranks). Returns the updated reductions and
    the tile's row maxima. Products are summed with ``vecdot`` (no temporaries) and the exponentials are taken in place,
    so every pass stays in the cache the tile was sized for."""
    n, w = L.shape
    tmax = L.amax(-1)
    m_new = torch.maximum(m, tmax)
    scale = torch.exp(m - m_new)
    E = torch.sub(L, m_new[:, None]).exp_()
    s = s * scale + E.sum(-1)
    el = el * scale + torch.linalg.vecdot(E, L)
    kl_dot = kl_dot + torch.linalg.vecdot(L.view(n // probs.shape[0], probs.shape[0], w), probs).reshape(n)
    greater = greater + (L[:, None, :] > ref[:, :, None]).sum(-1)
    return m_new, s, el, kl_dot, greater, tmax


def _l2_bytes() -> int:
    """A core's L2 cache in bytes (Linux sysfs; 1 MiB where it cannot be read)."""
    try:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError, KeyError):
        pass
    return 1 << 20


# A logit tile (rows x vocabulary columns, float32) fills half a core's L2 cache, so the matmul writes it and every
# reduction reads it there (measured on a 1 MiB-L2 AMD EPYC: 0.84 of the matmul roofline at 512 KiB, 0.60 at 8 MiB).
TILE_BYTES = min(max(_l2_bytes() // 2, 1 << 18), 1 << 21)


WIDE_TILE_D_MODEL = 1024  # below: tiles sized to the L2 cache (SmolLM2, d_model 576: 0.84 of the matmul roofline)
WIDE_TILE_COLUMNS_PER_D = 8


def tile_shape(positions: int, budget: int | None = None, d_model: int | None = None) -> tuple[int, int]:
    """``(rows, columns)`` of a logit tile: ``rows`` a divisor or a multiple of ``positions`` (so a tile's rows pair with
    whole rows of the final distribution), ``rows x columns x 4`` bytes within ``budget`` (default ``TILE_BYTES``),
    columns a multiple of 128. From ``d_model`` :data:`WIDE_TILE_D_MODEL` up, columns are at least
    ``WIDE_TILE_COLUMNS_PER_D x d_model``: the matmul (2 d_model FLOP per logit) then outweighs reducing the tile out
    of cache, and narrow tiles make the matmul itself slow (measured on a 2-core AMD EPYC, d_model 2048, vocabulary
    128256, 1088 rows: 512 columns 90-104 s, 16384 columns 26-30 s, the whole vocabulary 30-31 s).

    >>> tile_shape(128, 1 << 20), tile_shape(512, 1 << 20), tile_shape(3, 1 << 20), tile_shape(128, 1 << 19)
    ((256, 1024), (256, 1024), (255, 1024), (256, 512))
    >>> tile_shape(128, 1 << 19, d_model=576), tile_shape(128, 1 << 19, d_model=2048)
    ((256, 512), (256, 16384))
    """
    budget = TILE_BYTES if budget is None else budget
    floats = budget // 4
    target = max(1, min(256, floats // 512))
    if positions >= target:
        rows = next(r for r in range(target, 0, -1) if positions % r == 0)
    else:
        rows = positions * (target // positions)
    cols = max(128, (floats // rows) // 128 * 128)
    if d_model is not None and d_model >= WIDE_TILE_D_MODEL:
        cols = max(cols, WIDE_TILE_COLUMNS_PER_D * d_model // 128 * 128)
    return rows, cols


_COMPILED: dict[str, object] = {}


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
    decoder: Decoder,
    xn: Float[Tensor, "n d_model"],
    *,
    k: int,
    final: FinalDistribution,
    targets: Int[Tensor, "n t"],
    next_ids: Int[Tensor, " n"],
    keep_logits: bool = False,
    vocab_tile: int | None = None,
    fused: bool | None = None,
) -> Stats:
    """Streamed statistics of normalised vectors ``xn`` (in the matmul dtype) decoded by ``decoder``.

    ``xn`` holds whole rows of ``len(final.top1)`` vectors: the KL of vector ``i`` is taken against
    ``final.probs[i % len(final.top1)]``. The logits are made one tile at a time (:func:`tile_shape`; ``vocab_tile``
    overrides the columns) and folded into the reductions while the tile is in cache. ``fused=True``: run the per-tile
    reductions as one compiled kernel (falls back to eager when unavailable).
    """
    n, vocab = xn.shape[0], decoder.W.shape[1]
    C = final.top1.shape[0]
    reps = n // C
    rank_ids = torch.cat([final.top1.repeat(reps)[:, None], targets], dim=1)  # [n, 1 + t]
    ref = decoder.columns(xn, rank_ids)
    next_logit = decoder.columns(xn, next_ids.clamp(min=0)[:, None])[:, 0]

    update = (fused_tile_update() if fused else None) or _tile_update
    m = torch.full((n,), -torch.inf)
    s, el, kl_dot = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    greater = torch.zeros(n, rank_ids.shape[1], dtype=torch.long)
    run_v = torch.full((n, k), -torch.inf)
    run_i = torch.zeros(n, k, dtype=torch.long)
    full = torch.empty(n, vocab) if keep_logits else None
    rows, cols = tile_shape(C, d_model=xn.shape[1])
    cols = min(vocab_tile or cols, vocab)
    buf = torch.empty(min(rows, n), cols) if xn.dtype == torch.float32 else None  # reused: stays in cache
    for j in range(0, vocab, cols):
        hi = min(j + cols, vocab)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            b = slice(r0, r1)
            L = decoder.tile(xn[b], j, hi, out=None if buf is None else buf[: r1 - r0, : hi - j])
            if full is not None:
                full[b, j:hi] = L
            p0 = r0 % C
            probs = final.probs[p0 : p0 + min(C, r1 - r0), j:hi]
            m[b], s[b], el[b], kl_dot[b], greater[b], tmax = update(L, probs, ref[b], m[b], s[b], el[b], kl_dot[b],
                                                                   greater[b])
            _running_topk(L, tmax, j, run_v[b], run_i[b], k)
            # a token never outranks itself (its tile logit may differ from the gathered one in the last bit)
            ids = rank_ids[b]
            inside = (ids >= j) & (ids < hi)
            if inside.any():
                own = L.gather(1, (ids - j).clamp(0, hi - j - 1))
                greater[b] -= (inside & (own > ref[b])).long()
    lse = m + torch.log(s)
    kl = final.neg_entropy.repeat(reps) - kl_dot + lse
    return Stats(run_i, run_v, lse, lse - el / s, kl.clamp(min=0.0), greater[:, 0], greater[:, 1:], ref[:, 1:],
                 next_logit, ref[:, 0], full)


def _running_topk(L: Tensor, tmax: Tensor, offset: int, run_v: Tensor, run_i: Tensor, k: int) -> None:
    """Merge a tile into the running top-k (in place); only rows whose tile maximum beats their current k-th best
    can change it."""
    rows = (tmax > run_v[:, -1]).nonzero().squeeze(1)
    if not len(rows):
        return
    whole = len(rows) == L.shape[0]
    Lr = L if whole else L.index_select(0, rows)
    tv, ti = Lr.topk(min(k, L.shape[1]), dim=-1)
    old_v, old_i = (run_v, run_i) if whole else (run_v[rows], run_i[rows])
    cv, sel = torch.cat([old_v, tv], 1).topk(k, dim=-1)
    ci = torch.cat([old_i, ti + offset], 1).gather(1, sel)
    if whole:
        run_v.copy_(cv)
        run_i.copy_(ci)
    else:
        run_v[rows] = cv
        run_i[rows] = ci
