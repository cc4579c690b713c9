"""Sweeps: one Patchscope per (source layer ``l``, target layer ``l*``, source position), batched.

Every source position of every source prompt, every source layer and every target layer becomes one patched row of
the (shared) target prompt; rows run ``chunk`` at a time, each chunk one forward pass with one hook per target
layer, and the unpatched target prefix is computed once (KV cache). The result equals the per-pair loop of
:func:`mi_lenses.patchscopes.patchscope` (tested).

Example::

    from mi_lenses.patchscopes import presets, sweep
    sw = sweep(model, "The Eiffel Tower is in the city of", presets.identity(), positions=[-1])
    sw.prec_at_1_mean          # [Ls, Lt]
    sw.to_html("sweep.html")   # heat maps of precision@1, surprisal, target-token probability
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.patchscopes.result import SweepResult
from mi_lenses.patchscopes.run import apply_map, patched_readout, source_states
from mi_lenses.patchscopes.spec import (
    Target,
    resolve_layer,
    resolve_map,
    resolve_position,
    resolve_target,
    translate_ids,
    view_of,
)


def sweep(
    model: Any,
    source: str | Sequence[str] | Tensor,
    target: Target | None = None,
    *,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | str | None = None,
    positions: Sequence[int] | int | None = None,
    target_model: Any = None,
    target_token: str | int | None = None,
    chunk: int = 256,
    use_kv_cache: bool = True,
    progress: bool = True,
    prepend_bos: bool | None = None,
) -> SweepResult:
    """Patchscope statistics for every (source layer, target layer) pair over many source positions.

    Args:
        model: the source model ``M`` (and ``M*`` unless ``target_model`` or ``target.model`` is given).
        source: a prompt, a list of prompts (right-padded; padding skipped) or tokens ``[B, S]``.
        target: :class:`Target` (default: the token-identity preset).
        source_layers: default all blocks.
        target_layers: ``None`` -> ``[target.layer]`` if the target fixes one (e.g. SelfIE), else all blocks (the
            full ``l x l*`` grid); ``"same"`` -> ``l* = l`` only; or a list.
        positions: source positions per prompt (negative allowed); default every (non-padding) position.
        target_token: a token whose target probability is tracked (default: the source's own prediction).
        chunk: patched rows per forward pass.
    """
    from mi_lenses.patchscopes.run import _identity

    target = target if target is not None else _identity()
    src_view = view_of(model)
    tgt_view = view_of(target_model if target_model is not None else (target.model or src_view))
    if not isinstance(chunk, int) or chunk < 1:
        raise LensInputError(f"chunk must be a positive int, got {chunk!r}.")
    src_layers = [resolve_layer(src_view, l, "source layer")
                  for l in (range(src_view.n_layers) if source_layers is None else source_layers)]
    diagonal = isinstance(target_layers, str)
    if diagonal and target_layers != "same":
        raise LensInputError(f"target_layers must be a list of layers, None (all) or 'same', got {target_layers!r}.")
    if diagonal:
        tgt_layers = [resolve_layer(tgt_view, l, "target layer") for l in src_layers]
    else:
        if target_layers is None:
            target_layers = range(tgt_view.n_layers) if target.layer is None else [target.layer]
        tgt_layers = [resolve_layer(tgt_view, l, "target layer") for l in target_layers]
    if not src_layers or not tgt_layers:
        raise LensInputError("the sweep selects no layer.")
    tokens = src_view.to_tokens(source, prepend_bos)
    if isinstance(source, (list, tuple)):
        lengths = src_view.token_lengths(source, tokens, prepend_bos)
    else:
        lengths = [tokens.shape[1]] * tokens.shape[0]
    pairs = _source_positions(positions, lengths)
    rt = resolve_target(target, tgt_view)
    fmap = resolve_map(target.map, src_view, tgt_view)
    tgt_id = None if target_token is None else tgt_view.to_single_token(target_token)

    t0 = time.perf_counter()
    states, logits = source_states(src_view, tokens, set(src_layers))
    b_idx = torch.tensor([b for b, _ in pairs])
    p_idx = torch.tensor([p for _, p in pairs])
    P = len(pairs)
    pred = logits[b_idx, p_idx].float().argmax(-1).cpu()  # the source model's own next-token prediction
    pred_t = translate_ids(pred, src_view, tgt_view)
    mapped = {l: apply_map(fmap, states[l][b_idx, p_idx], tgt_view) for l in src_layers}

    grid = [(a, a) for a in range(len(src_layers))] if diagonal else \
        [(a, b) for a in range(len(src_layers)) for b in range(len(tgt_layers))]
    vectors = torch.cat([mapped[src_layers[a]] for a, _ in grid])  # [G * P, d]
    layers = torch.tensor([tgt_layers[b] for _, b in grid]).repeat_interleave(P)
    gather = pred_t[:, None] if tgt_id is None else torch.stack([pred_t, torch.full_like(pred_t, tgt_id)], 1)
    top_ids, _, got = patched_readout(rt, layers, vectors, gather.repeat(len(grid), 1), top_k=1, chunk=chunk,
                                      use_kv_cache=use_kv_cache, progress=progress)
    seconds = time.perf_counter() - t0

    Lt = 1 if diagonal else len(tgt_layers)
    shape = (len(src_layers), Lt, P)
    prec = torch.full(shape, torch.nan)
    surp = torch.full(shape, torch.nan)
    prob = torch.full(shape, torch.nan)
    top1 = torch.zeros(shape, dtype=torch.long)
    for g, (a, b) in enumerate(grid):
        rows = slice(g * P, (g + 1) * P)
        col = 0 if diagonal else b
        prec[a, col] = (top_ids[rows, 0] == pred_t).float()
        surp[a, col] = -got[rows, 0]
        prob[a, col] = got[rows, -1].exp()
        top1[a, col] = top_ids[rows, 0]
    vocab = tgt_view.id_to_str_map(torch.cat([top1.flatten(), pred_t.clamp(min=0)]))
    return SweepResult(
        model_name=src_view.name,
        target_model_name=tgt_view.name,
        target_name=target.name,
        source_layers=src_layers,
        target_layers=tgt_layers,
        diagonal=diagonal,
        positions=pairs,
        source_tokens=[src_view.id_to_str(int(tokens[b, p])) for b, p in pairs],
        source_predictions=[src_view.id_to_str(int(i)) for i in pred],
        prec_at_1=prec,
        surprisal=surp,
        target_prob=prob,
        target_token=None if tgt_id is None else tgt_view.id_to_str(tgt_id),
        top1_ids=top1,
        vocab=vocab,
        seconds=seconds,
    )


def _source_positions(positions: Sequence[int] | int | None, lengths: list[int]) -> list[tuple[int, int]]:
    pairs = []
    for b, n in enumerate(lengths):
        if positions is None:
            chosen = range(n)
        else:
            raw = [positions] if not isinstance(positions, (list, tuple, range)) else list(positions)
            chosen = [resolve_position(p, n, f"source position (prompt {b})") for p in raw]
        pairs.extend((b, p) for p in chosen)
    if not pairs:
        raise LensInputError("the sweep selects no source position.")
    return pairs
