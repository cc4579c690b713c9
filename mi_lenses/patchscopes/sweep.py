"""Sweeps: one Patchscope per (source layer ``l``, target layer ``l*``, source position), batched.

Every source position of every source prompt, every source layer and every target layer becomes one patched row of
the (shared) target prompt; rows run ``chunk`` at a time, each chunk one forward pass with one hook per target
layer, and the unpatched target prefix is computed once (KV cache). The result equals the per-pair loop of
:func:`mi_lenses.patchscopes.patchscope` (tested).

Example:
    >>> sw = mi_lenses.sweep(model, "The capital of France is", mi_lenses.presets.identity(), positions=[-1],
    ...                      progress=False)
    >>> tuple(sw.prec_at_1_mean.shape)      # source layers x target layers
    (3, 3)
    >>> sw.prec_at_1_mean[-1, -1].item()    # the last layer patched into itself reproduces the prediction
    1.0
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec, int_list, resolve_positions
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patchscopes.presets import identity
from mi_lenses.patchscopes.result import SweepResult
from mi_lenses.patchscopes.run import apply_map, patched_readout, source_states
from mi_lenses.patchscopes.spec import POINT, Target, resolve_layer, resolve_map, resolve_target, translate_ids


def sweep(
    model: Any,
    prompt: PromptInput,
    target: Target | None = None,
    *,
    source_layers: IndexSpec = None,
    target_layers: IndexSpec | Literal["same"] = None,
    positions: IndexSpec = None,
    attention_mask: Tensor | None = None,
    target_model: Any = None,
    answer: str | int | None = None,
    chunk: int = 256,
    use_kv_cache: bool = True,
    progress: bool = True,
    prepend_bos: bool | None = None,
    cache: Any = None,
    logits: Tensor | None = None,
) -> SweepResult:
    """Patchscope statistics for every (source layer, target layer) pair over many source positions.

    Args:
        model: the source model ``M`` (and ``M*`` unless ``target_model`` or ``target.model`` is given).
        prompt: the source prompt: a prompt, a list of prompts (right-padded; padding skipped) or token ids
            ``[B, S]`` (with ``attention_mask`` when padded).
        target: :class:`Target` (default: the token-identity preset).
        source_layers: default all blocks.
        target_layers: ``None`` -> ``[target.layer]`` if the target fixes one (e.g. SelfIE), else all blocks (the
            full ``l x l*`` grid); ``"same"`` -> ``l* = l`` only; or a list.
        positions: source positions, counted in each prompt's own tokens (``-1``: its last token); default every
            real position. A position a shorter prompt lacks is skipped for it.
        answer: a token whose probability in the target run is tracked (default: the source's own prediction).
        chunk: patched rows per forward pass.
        use_kv_cache: compute the target prompt's unpatched prefix (before the first patched position) once and
            share it through the model's KV cache; ``False`` runs the whole target prompt for every row.
        progress: show a progress bar over the chunks of patched rows (when there is more than one).
        prepend_bos: add the BOS token when tokenising the source prompt (default: the model's setting).
        cache: the source prompt's ``ActivationCache`` holding ``blocks.*.hook_resid_post`` of the source layers,
            with ``logits`` (that run's output): no forward pass over the source prompt (a long prompt costs one).
    """
    target = target if target is not None else identity()
    src_view = ModelView(model)
    hooks = active_hooks(src_view.model)
    tgt_view = ModelView(target_model if target_model is not None else (target.model or src_view))
    if not isinstance(chunk, int) or chunk < 1:
        raise LensInputError(f"chunk must be a positive int, got {chunk!r}.")
    src_layers, tgt_layers, diagonal = _layers(src_view, tgt_view, target, source_layers, target_layers)
    batch = src_view.batch(prompt, prepend_bos=prepend_bos, attention_mask=attention_mask)
    grid = resolve_positions(positions, batch.lengths, batch.offsets, "source position")
    pairs = [(b, int(grid.index[b, j])) for b in range(grid.index.shape[0]) for j in range(grid.index.shape[1])
             if bool(grid.valid[b, j])]
    rt = resolve_target(target, tgt_view)
    fmap = resolve_map(target.map, src_view, tgt_view)
    tgt_id = None if answer is None else tgt_view.to_single_token(answer)

    t0 = time.perf_counter()
    if cache is None or logits is None:
        states, logits = source_states(src_view, batch, set(src_layers))
    else:
        states = {l: cache[src_view.hook_name(POINT, l)].detach() for l in src_layers}
        if any(tuple(t.shape[:2]) != batch.shape for t in states.values()):
            raise LensInputError(f"the cache's [batch, pos] does not match the source's {batch.shape}: pass the cache "
                                 "of this source prompt.")
    b_idx = torch.tensor([b for b, _ in pairs])
    p_idx = torch.tensor([p for _, p in pairs])
    P = len(pairs)
    pred = logits[b_idx, p_idx].float().argmax(-1).cpu()  # the source model's own next-token prediction
    pred_t = translate_ids(pred, src_view, tgt_view)
    mapped = {l: apply_map(fmap, states[l][b_idx, p_idx], tgt_view) for l in src_layers}

    grid_pairs = [(a, a) for a in range(len(src_layers))] if diagonal else \
        [(a, b) for a in range(len(src_layers)) for b in range(len(tgt_layers))]
    vectors = torch.cat([mapped[src_layers[a]] for a, _ in grid_pairs])  # [G * P, d]
    layers = torch.tensor([tgt_layers[b] for _, b in grid_pairs]).repeat_interleave(P)
    gather = pred_t[:, None] if tgt_id is None else torch.stack([pred_t, torch.full_like(pred_t, tgt_id)], 1)
    top_ids, _, got = patched_readout(rt, layers, vectors, gather.repeat(len(grid_pairs), 1), top_k=1, chunk=chunk,
                                      use_kv_cache=use_kv_cache, progress=progress)
    seconds = time.perf_counter() - t0

    shape = (len(src_layers), 1 if diagonal else len(tgt_layers), P)
    prec, surp, prob = torch.full(shape, torch.nan), torch.full(shape, torch.nan), torch.full(shape, torch.nan)
    top1 = torch.zeros(shape, dtype=torch.long)
    for g, (a, b) in enumerate(grid_pairs):
        rows, col = slice(g * P, (g + 1) * P), 0 if diagonal else b
        prec[a, col] = (top_ids[rows, 0] == pred_t).float()
        surp[a, col] = -got[rows, 0]
        prob[a, col] = got[rows, -1].exp()
        top1[a, col] = top_ids[rows, 0]
    vocab = tgt_view.id_to_str_map(torch.cat([top1.flatten(), pred_t.clamp(min=0)]))
    offsets = batch.offsets
    return recorded(SweepResult(
        model_name=src_view.name,
        target_model_name=tgt_view.name,
        target_name=target.name,
        source_layers=src_layers,
        target_layers=tgt_layers,
        diagonal=diagonal,
        positions=[(b, p - offsets[b]) for b, p in pairs],
        source_tokens=[src_view.id_to_str(int(batch.tokens[b, p])) for b, p in pairs],
        source_predictions=[src_view.id_to_str(int(i)) for i in pred],
        prec_at_1=prec,
        surprisal=surp,
        answer_prob=prob,
        answer=None if tgt_id is None else tgt_view.id_to_str(tgt_id),
        top1_ids=top1,
        vocab=vocab,
        seconds=seconds,
    ), hooks)


def _layers(src: ModelView, tgt: ModelView, target: Target, source_layers: Any,
            target_layers: Any) -> tuple[list[int], list[int], bool]:
    """Source layers, target layers and whether only ``l* = l`` runs."""
    src_layers = [resolve_layer(src, l, "source layer")
                  for l in (range(src.n_layers) if source_layers is None else int_list(source_layers))]
    diagonal = isinstance(target_layers, str)
    if diagonal and target_layers != "same":
        raise LensInputError(f"target_layers must be a list of layers, None (all) or 'same', got {target_layers!r}.")
    if diagonal:
        tgt_layers = [resolve_layer(tgt, l, "target layer") for l in src_layers]
    else:
        if target_layers is None:
            target_layers = range(tgt.n_layers) if target.layer is None else [target.layer]
        tgt_layers = [resolve_layer(tgt, l, "target layer") for l in int_list(target_layers)]
    if not src_layers or not tgt_layers:
        raise LensInputError("the sweep selects no layer.")
    return src_layers, tgt_layers, diagonal
