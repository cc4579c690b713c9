"""The lens engine: :func:`run_lens` runs any :class:`~mi_lenses.lenses.lens.Lens` in four steps: **prepare**
(check every option before any forward pass), **forward** (one pass caching the residual rows, or a cache you
already have), **reduce** (stream vocabulary tiles into the statistics) and **assemble** (a
:class:`~mi_lenses.lenses.result.LensResult`, padding masked).

Example:
    >>> res = run_lens(mi_lenses.LogitLens(), model, "The capital of France is", targets=" Paris", top_k=3)
    >>> res.labels[0], res.labels[-1], tuple(res.top_ids.shape)   # rows x prompts x positions x k
    ('embed', 'final', (4, 1, 6, 3))
    >>> final = model(model.to_tokens("The capital of France is")).detach()[0, -1]
    >>> int(res.target_ranks[-1, 0, -1, 0]) == int((final > final[model.to_single_token(" Paris")]).sum())
    True
    >>> res.verify() is res     # the final row reproduces the model's own log-probs
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import PositionGrid, resolve_indices, resolve_positions
from mi_lenses.lenses.options import LensOptions, with_lens_options
from mi_lenses.lenses.result import LensResult
from mi_lenses.lenses.stream import Stats, final_row, row_stats
from mi_lenses.models.batch import Batch, PromptInput, cached_forward
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView, ResidualRow
from mi_lenses.progress import bar

if TYPE_CHECKING:
    from mi_lenses.lenses.lens import Lens

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The matmul dtypes a lens may run in (the final-row check's tolerance follows it: lenses/result.py VERIFY_ATOL).
CHECK_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


@with_lens_options
def run_lens(
    lens: "Lens",
    model: Any,
    prompt: PromptInput | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    options: LensOptions | None = None,
) -> LensResult:
    """Decode every residual row of ``prompt`` (or of an existing ``cache``) through ``lens`` and the unembedding.

    Args:
        lens: a :class:`~mi_lenses.lenses.lens.Lens` (``LogitLens()``, a ``TunedLens``, or your own ``transform``).
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        prompt: a prompt, a list of prompts (right-padded; padding is masked out), or token ids ``[batch, pos]``.
            With ``cache`` it supplies the token strings and next tokens only; no forward pass is run.
        cache: an ``ActivationCache`` holding the residual hooks; ``logits`` (the model output of that run) enables
            ``verify()``.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right); padding is never read.
        options: a :class:`~mi_lenses.lenses.options.LensOptions` record; the keywords below override its fields.
        {options}

    Returns:
        :class:`~mi_lenses.lenses.result.LensResult`; padded positions hold NaN (floats) and -1 (ids, ranks).
    """
    opts = options or LensOptions()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    plan = _prepare(view, lens, opts)
    run = cached_forward(view, prompt, names=plan.hook_names, what="the lens", cache=cache, logits=logits,
                         attention_mask=attention_mask, prepend_bos=opts.prepend_bos, shape_hook=plan.final.hook_name,
                         hint=" (or one that keeps the residual hooks blocks.*.hook_resid_pre/mid/post)",
                         beyond_context=opts.beyond_context, progress=opts.progress, fused=True)
    batch = run.batch
    grid = resolve_positions(opts.positions, batch.lengths, batch.offsets)
    ref_index = _reference_index(batch, grid, plan.ahead)
    next_ids = batch.next_ids(ref_index)  # -1 where unknown (a cache without token ids, or no position t + ahead)
    resid = {name: run[name] for name in plan.hook_names}
    stats, final_top1 = _reduce(view, plan, resid, grid, ref_index, next_ids, opts)
    result = _assemble(view, plan, batch, grid, ref_index, stats, final_top1.view(grid.index.shape), next_ids,
                       run.logits)
    if opts.check and run.logits is not None and prompt is not None and plan.rows[-1].is_final and plan.exact_final:
        result.verify()  # at the tolerance of the coarser of the matmul dtype and the model's dtype
    return recorded(result, hooks)


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

    lens: "Lens"  # bound to the model
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
    def hook_names(self) -> list[str]:
        """The residual hooks the rows read, in model order (errors name the first missing one)."""
        return list(dict.fromkeys(r.hook_name for r in [*self.rows, self.final]))

    @property
    def ahead(self) -> int:
        return self.lens.ahead

    @property
    def exact_final(self) -> bool:
        """The final row is the model's own output (the lens leaves it alone and predicts the next token)."""
        return self.ahead == 0 and not self.lens.maps_final


def _prepare(view: ModelView, lens: "Lens", opts: LensOptions) -> _Plan:
    top_k = opts.top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= view.d_vocab:
        raise LensInputError(f"top_k must be an int in 1..{view.d_vocab}, got {top_k!r}.")
    opts.validate()
    dt = _DTYPES.get(opts.dtype, opts.dtype) if isinstance(opts.dtype, str) else opts.dtype
    if dt not in CHECK_ATOL:
        raise LensInputError(f"dtype must be one of {list(_DTYPES)}, got {opts.dtype!r}.")
    bound = lens.bind(view.model)
    ahead = bound.ahead
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
        raise LensInputError(f"a lens's `ahead` must be an int >= 0, got {ahead!r}.")
    all_rows = view.residual_rows(opts.point)
    if opts.layers is None and bound.rows is not None:  # a lens fitted on some rows reads those
        readable = set(bound.rows)
        rows = [r for r in all_rows if r.lens_index in readable]
        if not rows:
            raise LensInputError(f"this {bound.name} reads rows {sorted(readable)}, none of which exists at "
                                 f"point={opts.point!r}; pass layers= or use point='resid_pre'.")
    else:
        hint = f"the lens has {len(all_rows)} rows, 0 (embed) .. {len(all_rows) - 1} (final output)"
        rows = [all_rows[i] for i in resolve_indices(opts.layers, len(all_rows), "layer", hint)]
    targets = opts.targets
    target_ids = [] if targets is None else \
        [view.to_single_token(t) for t in ([targets] if isinstance(targets, (str, int)) else targets)]
    return _Plan(bound, opts.point, all_rows, rows, top_k, torch.tensor(target_ids, dtype=torch.long), dt,
                 opts.position_chunk, opts.vocab_tile)


# ------------------------------------------------------------------------------------------------ reduce
def _reduce(view: ModelView, plan: _Plan, resid: dict[str, Tensor], grid: PositionGrid, ref_index: Tensor,
            next_ids: Tensor, opts: LensOptions) -> tuple[Stats, Int[Tensor, " N"]]:
    """Statistics ``[rows, B * P]`` and the reference top-1 token ``[B * P]``: the reference (the model's own final
    row at ``t + ahead``) decoded in full per chunk of positions, every lens row streamed through vocabulary tiles
    against it. Where there is no reference position the final row at ``t`` stands in (masked in ``_assemble``)."""
    return_logits = opts.return_logits
    dec = view.decoder
    B, P = grid.index.shape
    N, k, T = B * P, plan.k, len(plan.target_ids)
    exact = plan.exact_final and plan.rows[-1].is_final
    rows_out = [r for r in plan.rows if not (r.is_final and exact)]
    out = Stats.empty((len(plan.rows), N), k, T, view.d_vocab if return_logits else None)
    final_top1 = torch.full((N,), -1, dtype=torch.long)
    use_fused = bool(opts.fused)
    hidden = {r.hook_name: grid.gather(resid[r.hook_name]).reshape(N, -1) for r in [*plan.rows, plan.final]}
    ref_grid = PositionGrid(torch.where(ref_index >= 0, ref_index, grid.index), grid.valid, grid.requested)
    reference = ref_grid.gather(resid[plan.final.hook_name]).reshape(N, -1)
    nxt_all = next_ids.reshape(N)

    def normed(rows: list[ResidualRow], c0: int, c1: int) -> Tensor:
        x = [dec.normalize(plan.lens.transform(hidden[r.hook_name][c0:c1].float(), r)) for r in rows]
        return torch.cat(x).to(dec.W.device, plan.dtype)

    with torch.no_grad(), bar(N, f"{plan.lens.name} ({len(plan.rows)} rows)", unit="position",
                              enabled=opts.progress) as progress:
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
            progress.update(C)
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
        model_dtype=str(view.dtype).replace("torch.", ""),
        ahead=plan.ahead,
        final_is_output=plan.exact_final,
    )
