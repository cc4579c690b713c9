"""The logit lens, the :class:`Lens` base every lens derives from, and :func:`run_lens`, the engine they all run on.

A lens maps each residual-stream row to a hidden state that is then decoded through the model's own final norm and
unembedding (:class:`~mi_lenses.models.decode.Decoder`). The logit lens is the identity map; the tuned lens adds a
learned affine translator per layer. The engine runs in four steps: **prepare** (check every option before any
forward pass), **forward** (one pass caching the residual rows, or a cache you already have), **reduce** (stream
vocabulary tiles into the statistics) and **assemble** (a :class:`~mi_lenses.lenses.result.LensResult`, padding
masked).

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is", targets=" Paris", top_k=3)
    >>> res.labels[0], res.labels[-1], tuple(res.top_ids.shape)   # rows x prompts x positions x k
    ('embed', 'final', (4, 1, 6, 3))
    >>> res.target_ranks[-1, 0, -1, 0].item() == res.target_ranks[-1, 0, -1, 0].item()   # rank of ' Paris'
    True
    >>> _ = res.verify()   # the final row reproduces the model's own log-probs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.indexing import IndexSpec, PositionGrid, resolve_indices, resolve_positions
from mi_lenses.lenses.result import LensResult
from mi_lenses.lenses.stream import Stats, final_row, row_stats
from mi_lenses.models.batch import Batch, PromptInput, match_cache
from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView, ResidualRow

Point = Literal["resid_pre", "resid_mid", "resid_post"]
MatmulDType = Literal["float32", "bfloat16", "float16"]
TokenLike = str | int

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tolerance of the automatic final-row identity check, per matmul dtype (log-prob units).
_CHECK_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


class Lens:
    """Base of every lens: ``transform`` maps a row's hidden states before decoding (identity here), ``bind`` checks
    the lens against a model, and calling a lens runs it through :func:`run_lens`.

    ``row.lens_index`` follows the ``tuned-lens`` package: 0 is the embeddings, ``l`` the input of block ``l``.

    Two class attributes describe what a lens predicts, so the engine compares it with the right reference:

    * ``ahead``: the lens at position ``t`` predicts the model's distribution at ``t + ahead`` (0: the next token,
      as the logit lens; a Future Lens with ``ahead=N`` predicts token ``t + N + 1``). KL, cross-entropy, ranks and
      surprisal are taken against position ``t + ahead``; where a prompt has no such position they are NaN / -1.
    * ``maps_final``: ``transform`` changes the final row too (the final row is then read like any other row, and
      the model-output identity of ``verify()`` does not apply).
    """

    name: str = "lens"
    ahead: int = 0
    maps_final: bool = False
    rows: list[int] | None = None  # the rows (lens indices) a lens can read, when not all: the default ``layers``

    def bind(self, model: Any) -> "Lens":
        """The lens to run on ``model`` (raise ``LensInputError`` if it does not belong to it)."""
        return self

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        return hidden

    def __call__(
        self,
        model: Any,
        input: PromptInput | None = None,
        *,
        cache: Any = None,
        logits: Tensor | None = None,
        attention_mask: Tensor | None = None,
        layers: IndexSpec = None,
        positions: IndexSpec = None,
        point: Point = "resid_pre",
        top_k: int = 5,
        targets: TokenLike | Sequence[TokenLike] | None = None,
        return_logits: bool = False,
        prepend_bos: bool | None = None,
        dtype: MatmulDType | torch.dtype = "float32",
        position_chunk: int = 256,
        vocab_tile: int | None = None,
        fused: bool | None = None,
        check: bool = True,
    ) -> LensResult:
        """Run this lens on ``model``: see :func:`run_lens` for every option."""
        return run_lens(self, model, input, cache=cache, logits=logits, attention_mask=attention_mask, layers=layers,
                        positions=positions, point=point, top_k=top_k, targets=targets, return_logits=return_logits,
                        prepend_bos=prepend_bos, dtype=dtype, position_chunk=position_chunk, vocab_tile=vocab_tile,
                        fused=fused, check=check)


class LogitLens(Lens):
    """The logit lens (nostalgebraist 2020): decode every residual state as if it were the last one."""

    name = "logit lens"


def logit_lens(
    model: Any,
    input: PromptInput | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    layers: IndexSpec = None,
    positions: IndexSpec = None,
    point: Point = "resid_pre",
    top_k: int = 5,
    targets: TokenLike | Sequence[TokenLike] | None = None,
    return_logits: bool = False,
    prepend_bos: bool | None = None,
    dtype: MatmulDType | torch.dtype = "float32",
    position_chunk: int = 256,
    vocab_tile: int | None = None,
    fused: bool | None = None,
    check: bool = True,
) -> LensResult:
    """The logit lens of ``input`` (or of a ``cache`` you already have): see :func:`run_lens` for every option.

    >>> res = mi_lenses.logit_lens(model, ["A city", "The quick brown fox"], positions=[-1])
    >>> res.positions, res.token_index.tolist()     # -1 is each prompt's own last token, not the padding
    ([-1], [[2], [4]])
    """
    return run_lens(LogitLens(), model, input, cache=cache, logits=logits, attention_mask=attention_mask,
                    layers=layers, positions=positions, point=point, top_k=top_k, targets=targets,
                    return_logits=return_logits, prepend_bos=prepend_bos, dtype=dtype, position_chunk=position_chunk,
                    vocab_tile=vocab_tile, fused=fused, check=check)


def run_lens(
    lens: Lens,
    model: Any,
    input: PromptInput | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    layers: IndexSpec = None,
    positions: IndexSpec = None,
    point: Point = "resid_pre",
    top_k: int = 5,
    targets: TokenLike | Sequence[TokenLike] | None = None,
    return_logits: bool = False,
    prepend_bos: bool | None = None,
    dtype: MatmulDType | torch.dtype = "float32",
    position_chunk: int = 256,
    vocab_tile: int | None = None,
    fused: bool | None = None,
    check: bool = True,
) -> LensResult:
    """Decode every residual row of ``input`` (or of an existing ``cache``) through ``lens`` and the unembedding.

    Args:
        lens: a :class:`Lens` (``LogitLens()``, a ``TunedLens``, or your own ``transform``).
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        input: a prompt, a list of prompts (right-padded; padding is masked out), or token ids ``[batch, pos]``.
            With ``cache`` it supplies the token strings and next tokens only; no forward pass is run.
        cache: an ``ActivationCache`` holding the residual hooks; ``logits`` (the model output of that run) enables
            ``verify()``.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right); padding is never read.
        layers: row indices (embedding row .. final row; negative allowed); default all, or the rows a lens that
            reads only some has (``lens.rows``, e.g. a Jacobian lens fitted on a few rows).
        positions: token positions, counted in each prompt's own tokens (``-1``: each prompt's last real token);
            default all. A position a shorter prompt lacks is masked for it.
        point: ``"resid_pre"`` (default; row ``l`` is the input of block ``l``), ``"resid_mid"`` or ``"resid_post"``.
        top_k: tokens kept per row and position.
        targets: token strings (each exactly one token) or ids whose rank and probability are tracked.
        return_logits: also return the full ``[rows, batch, pos, vocab]`` logits (memory heavy).
        prepend_bos: override the model's BOS default when tokenising text.
        dtype: matmul dtype: ``"float32"`` (default) or ``"bfloat16"``/``"float16"`` (faster only on hardware with
            fast low-precision matmul; statistics are still reduced in float32).
        position_chunk, vocab_tile: streaming sizes: positions per chunk; vocabulary columns per logit tile
            (default ``None``: sized to stay in cache, see :func:`~mi_lenses.lenses.stream.tile_shape`).
        fused: reduce each logit tile in one ``torch.compile``d kernel (``True``; compiled once per process, seconds).
            ``None``/``False`` (default): eager reductions on cache-sized tiles, which already run at about 0.8 of the
            matmul roofline (benchmarks/README.md). Falls back to eager code when no compiler is available.
        check: verify the final row against the model's own logits whenever a forward pass was run.

    Returns:
        :class:`~mi_lenses.lenses.result.LensResult`; padded positions hold NaN (floats) and -1 (ids, ranks).
    """
    view = ModelView(model)
    plan = _prepare(view, lens, layers=layers, point=point, top_k=top_k, targets=targets, dtype=dtype,
                    position_chunk=position_chunk, vocab_tile=vocab_tile)
    if input is None and cache is None:
        raise LensInputError("pass a prompt, a list of prompts, tokens, or cache=ActivationCache.")
    batch, resid, model_logits = _forward(view, plan, input, cache, logits, attention_mask, prepend_bos)
    grid = resolve_positions(positions, batch.lengths, batch.offsets)
    ref_index = _reference_index(batch, grid, plan.ahead)
    next_ids = batch.next_ids(ref_index)  # -1 where unknown (a cache without token ids, or no position t + ahead)
    stats, final_top1 = _reduce(view, plan, resid, grid, ref_index, next_ids, return_logits=return_logits,
                                fused=fused)
    result = _assemble(view, plan, batch, grid, ref_index, stats, final_top1.view(grid.index.shape), next_ids,
                       model_logits)
    if check and model_logits is not None and input is not None and plan.rows[-1].is_final and plan.exact_final:
        result.verify(atol=_CHECK_ATOL[plan.dtype])
    return result


def _reference_index(batch: Batch, grid: PositionGrid, ahead: int) -> Int[Tensor, "B P"]:
    """The padded-sequence index of the reference position ``t + ahead`` of every column (-1 where the prompt has
    no such position or the column is padding)."""
    if ahead == 0:
        return grid.index
    end = torch.tensor([o + n for o, n in zip(batch.offsets, batch.lengths)])[:, None]
    ref = grid.index + ahead
    return torch.where(grid.valid & (ref < end), ref, -1)


# ------------------------------------------------------------------------------------------------ prepare
@dataclass
class _Plan:
    """Everything decided before the forward pass."""

    lens: Lens
    point: str
    all_rows: list[ResidualRow]
    rows: list[ResidualRow]  # selected, in model order
    k: int
    target_ids: Int[Tensor, " T"]
    dtype: torch.dtype
    position_chunk: int
    vocab_tile: int | None

    @property
    def final(self) -> ResidualRow:
        return self.all_rows[-1]

    @property
    def ahead(self) -> int:
        return int(getattr(self.lens, "ahead", 0))

    @property
    def exact_final(self) -> bool:
        """The final row is the model's own output (the lens leaves it alone and predicts the next token)."""
        return self.ahead == 0 and not getattr(self.lens, "maps_final", False)


def _prepare(view: ModelView, lens: Lens, *, layers: IndexSpec, point: str, top_k: int, targets: Any, dtype: Any,
             position_chunk: int, vocab_tile: int | None) -> _Plan:
    dt = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in _CHECK_ATOL:
        raise LensInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= view.d_vocab:
        raise LensInputError(f"top_k must be an int in 1..{view.d_vocab}, got {top_k!r}.")
    for name, v in (("position_chunk", position_chunk), ("vocab_tile", 1 if vocab_tile is None else vocab_tile)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LensInputError(f"{name} must be a positive int, got {v!r}.")
    bound = lens.bind(view.model) if hasattr(lens, "bind") else lens
    all_rows = view.residual_rows(point)
    if layers is None and getattr(bound, "rows", None) is not None:  # a lens fitted on some rows reads those
        readable = set(bound.rows)
        rows = [r for r in all_rows if r.lens_index in readable]
        if not rows:
            raise LensInputError(f"this {getattr(bound, 'name', 'lens')} reads rows {sorted(readable)}, none of which "
                                 f"exists at point={point!r}; pass layers= or use point='resid_pre'.")
    else:
        hint = f"the lens has {len(all_rows)} rows, 0 (embed) .. {len(all_rows) - 1} (final output)"
        rows = [all_rows[i] for i in resolve_indices(layers, len(all_rows), "layer", hint)]
    if targets is None:
        target_ids: list[int] = []
    else:
        target_ids = [view.to_single_token(t) for t in ([targets] if isinstance(targets, (str, int)) else targets)]
    ahead = getattr(bound, "ahead", 0)
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
        raise LensInputError(f"a lens's `ahead` must be an int >= 0, got {ahead!r}.")
    return _Plan(bound, point, all_rows, rows, top_k, torch.tensor(target_ids, dtype=torch.long), dt,
                 position_chunk, vocab_tile)


# ------------------------------------------------------------------------------------------------ forward
def _forward(view: ModelView, plan: _Plan, input: Any, cache: Any, logits: Tensor | None, attention_mask: Any,
             prepend_bos: bool | None) -> tuple[Batch, dict[str, Tensor], Tensor | None]:
    """The batch, the residual rows ``{hook: [B, S, d]}`` and the model's logits (from this run or the caller)."""
    batch = view.batch(input, prepend_bos=prepend_bos, attention_mask=attention_mask) if input is not None else None
    names = list(dict.fromkeys(r.hook_name for r in [*plan.rows, plan.final]))  # model order: errors name the first
    if cache is None:
        logits, cache = view.run_with_cache(batch, names)
    resid = {name: _read(cache, name) for name in names}
    return match_cache(batch, resid[plan.final.hook_name].shape[:2], attention_mask), resid, logits


def _read(cache: Any, name: str) -> Tensor:
    try:
        t = cache[name]
    except (KeyError, IndexError) as err:
        raise LensInputError(
            f"the cache has no {name!r}: run model.run_with_cache(tokens) without a names_filter, or one that keeps "
            f"the residual hooks (blocks.*.hook_resid_pre/mid/post)."
        ) from err
    return t if t.ndim == 3 else t[None]


# ------------------------------------------------------------------------------------------------ reduce
def _reduce(view: ModelView, plan: _Plan, resid: dict[str, Tensor], grid: PositionGrid, ref_index: Tensor,
            next_ids: Tensor, *, return_logits: bool, fused: bool | None) -> tuple[Stats, Int[Tensor, " N"]]:
    """Statistics ``[rows, B * P]`` and the reference top-1 token ``[B * P]``: the reference (the model's own final
    row at ``t + ahead``) decoded in full per chunk of positions, every lens row streamed through vocabulary tiles
    against it. Where there is no reference position the final row at ``t`` stands in (masked in ``_assemble``)."""
    dec = view.decoder
    B, P = grid.index.shape
    N, k, T = B * P, plan.k, len(plan.target_ids)
    exact = plan.exact_final and plan.rows[-1].is_final
    rows_out = [r for r in plan.rows if not (r.is_final and exact)]
    out = Stats.empty((len(plan.rows), N), k, T, view.d_vocab if return_logits else None)
    final_top1 = torch.full((N,), -1, dtype=torch.long)
    use_fused = bool(fused)
    hidden = {r.hook_name: grid.gather(resid[r.hook_name]).reshape(N, -1) for r in [*plan.rows, plan.final]}
    ref_grid = PositionGrid(torch.where(ref_index >= 0, ref_index, grid.index), grid.valid, grid.requested)
    reference = ref_grid.gather(resid[plan.final.hook_name]).reshape(N, -1)
    nxt_all = next_ids.reshape(N)

    def normed(rows: list[ResidualRow], c0: int, c1: int) -> Tensor:
        x = [dec.normalize(plan.lens.transform(hidden[r.hook_name][c0:c1].float(), r)) for r in rows]
        return torch.cat(x).to(dec.W.device, plan.dtype)

    with torch.no_grad():
        for c0 in range(0, N, plan.position_chunk):
            c1 = min(c0 + plan.position_chunk, N)
            C, nxt = c1 - c0, nxt_all[c0:c1]
            ref_xn = dec.normalize(reference[c0:c1].float()).to(dec.W.device, plan.dtype)
            final, f_stats = final_row(dec, ref_xn, k=k, targets=plan.target_ids.expand(C, T), next_ids=nxt,
                                       keep_logits=return_logits)
            if exact:
                out.put((len(plan.rows) - 1, slice(c0, c1)), f_stats)
            rows_per = max(1, 1024 // C)
            for r0 in range(0, len(rows_out), rows_per):
                chunk = rows_out[r0 : r0 + rows_per]
                st = row_stats(dec, normed(chunk, c0, c1), k=k, final=final,
                               targets=plan.target_ids.expand(len(chunk) * C, T), next_ids=nxt.repeat(len(chunk)),
                               keep_logits=return_logits, vocab_tile=plan.vocab_tile, fused=use_fused)
                for i, part in enumerate(st.split(len(chunk))):
                    out.put((r0 + i, slice(c0, c1)), part)
            final_top1[c0:c1] = final.top1
    return out, final_top1


# ------------------------------------------------------------------------------------------------ assemble
def _assemble(view: ModelView, plan: _Plan, batch: Batch, grid: PositionGrid, ref_index: Tensor, st: Stats,
              final_top1: Tensor, next_ids: Tensor, model_logits: Tensor | None) -> LensResult:
    B, P = grid.index.shape
    R, k, T = len(plan.rows), plan.k, len(plan.target_ids)
    shape = (R, B, P)
    valid = grid.valid
    has_ref = valid & (ref_index >= 0)  # a reference position t + ahead exists
    ref_max = ref_lp = None
    if model_logits is not None and plan.rows[-1].is_final and plan.exact_final:
        ml = grid.gather(model_logits.detach()).float().log_softmax(-1).cpu()
        ref_lp = ml.gather(-1, st.top_ids[-1].view(B, P, k))
        ref_max = ml.max(-1).values
    ce = (st.logsumexp - st.next_logit).view(shape)
    ce = torch.where(next_ids[None] >= 0, ce, torch.nan)
    tokens = batch.tokens.cpu()
    real = batch.real_tokens()
    ids = torch.cat([st.top_ids.flatten(), plan.target_ids, tokens.flatten().clamp(min=0), final_top1.flatten()])
    vocab = view.id_to_str_map(ids.clamp(min=0))
    vocab[-1] = ""
    str_tokens = [[vocab[t] if t >= 0 else "?" for t in row] for row in real]

    def masked(t: Tensor, fill: float | int, mask: Tensor = valid) -> Tensor:
        m = mask.view(1, B, P, *([1] * (t.ndim - 3))).expand_as(t)
        return torch.where(m, t, torch.as_tensor(fill, dtype=t.dtype))

    logits = None if st.logits is None else masked(st.logits.view(*shape, -1), torch.nan)
    return LensResult(
        model_name=view.name,
        lens_name=plan.lens.name,
        labels=[r.label for r in plan.rows],
        point=plan.point,
        tokens=tokens,
        str_tokens=str_tokens,
        positions=grid.requested,
        token_index=torch.where(valid, grid.index - torch.tensor(batch.offsets)[:, None], -1),
        valid=valid,
        top_ids=masked(st.top_ids.view(*shape, k), -1),
        top_logits=masked(st.top_logits.view(*shape, k), torch.nan),
        logsumexp=masked(st.logsumexp.view(shape), torch.nan),
        entropy=masked(st.entropy.view(shape), torch.nan),
        kl=masked(st.kl.view(shape), torch.nan, has_ref),
        cross_entropy=masked(ce, torch.nan),
        final_top1=torch.where(has_ref, final_top1, -1),
        final_top1_rank=masked(st.final_top1_rank.view(shape), -1, has_ref),
        final_top1_logprob=masked((st.final_top1_logit - st.logsumexp).view(shape), torch.nan, has_ref),
        target_ids=plan.target_ids,
        target_ranks=masked(st.target_ranks.view(*shape, T), -1),
        target_logprobs=masked((st.target_logits - st.logsumexp[..., None]).view(*shape, T), torch.nan),
        vocab=vocab,
        logits=logits,
        reference_logprobs=ref_lp,
        reference_max_logprob=ref_max,
        dtype=str(plan.dtype).replace("torch.", ""),
        ahead=plan.ahead,
        final_is_output=plan.exact_final,
    )
