"""``activation_patching``: the entry point of exact, attribution and EAP-IG patching over one grid.

Example (the IOI pair; ``model = mi_lenses.load_model()`` for the real one)::

    res = mi_lenses.activation_patching(model, "When Mary and John went to the store, John gave a drink to",
                                        "When John and Mary went to the store, Mary gave a drink to",
                                        answer=" Mary", wrong=" John", what="resid_pre")
    res.values          # [n_layers, n_positions]: patching.get_act_patch_resid_pre's numbers
    res.show()          # the layer x position map labelled with the tokens

>>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
...                                     answer=" Paris", wrong=" city", what="resid_pre", method="attribution")
>>> res.values.shape == (model.cfg.n_layers, 6), res.engine
(True, 'gradient')
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from mi_lenses.attribution.directions import TokenSpec, resolve_direction
from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching.exact import exact_grid
from mi_lenses.patching.gradients import gradient_grid
from mi_lenses.patching.metric import Metric, MetricFn
from mi_lenses.patching.pair import Direction, Pair, PositionMap, make_pair
from mi_lenses.patching.replay import Engine
from mi_lenses.patching.result import PatchingResult
from mi_lenses.patching.sites import By, Site, What, resolve_site

Method = Literal["exact", "attribution", "eap_ig"]
DEFAULT_IG_STEPS = 16


def activation_patching(
    model: Any,
    clean: PromptInput,
    corrupted: PromptInput,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    metric: MetricFn | None = None,
    what: What = "resid_pre",
    by: By | None = None,
    direction: Direction = "denoise",
    method: Method = "exact",
    ig_steps: int | None = None,
    layers: IndexSpec = None,
    position_map: PositionMap | None = None,
    prepend_bos: bool | None = None,
    max_batch: int | None = None,
    beyond_context: bool = False,
    progress: bool = True,
) -> PatchingResult:
    """Patch every cell of a grid of activations between a clean and a corrupted run and measure the metric.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), hooked as you like: your
            hooks stay active in every forward pass (and are listed in ``res.active_hooks``).
        clean, corrupted: a prompt each, lists of prompts (pairs; one length per side) or token ids ``[B, S]``.
        answer, wrong: the tokens of the default metric, the normalised ``logit[answer] - logit[wrong]`` at the last
            position (one token, or one per prompt pair; without ``wrong``: ``logit[answer]``).
        metric: instead, any ``metric(logits [B, S, vocab]) -> scalar`` (raw values, as TransformerLens's
            ``patching_metric``).
        what: the activation patched (see :mod:`mi_lenses.patching.sites`): ``resid_pre``/``mid``/``post``,
            ``attn_out``, ``mlp_out``, ``head_out`` (z), ``head_q``/``k``/``v``, ``head_pattern``, ``neurons``.
        by: the grid after the layer: ``layer_pos`` (default for residual and block outputs), ``layer_head`` (every
            position at once; default for heads), ``layer_pos_head``, ``layer``, ``layer_neuron``,
            ``layer_pos_neuron``.
        direction: ``"denoise"`` (clean activations into the corrupted run) or ``"noise"`` (the reverse).
        method: ``"exact"`` (forward passes, TransformerLens's numbers), ``"attribution"`` (one forward and one
            backward pass) or ``"eap_ig"`` (integrated gradients along the input path, ``ig_steps`` points,
            default 16).
        layers: the layers of the grid (default all).
        position_map: ``{clean position: corrupted position}`` when the prompts differ in length (see
            :mod:`mi_lenses.patching.pair`).
        max_batch: rows (cells x prompt pairs) per forward pass of the exact engine (default: 8192 tokens' worth).
        beyond_context: accept prompts longer than the model's context.
        progress: a progress bar over the exact engine's cells.

    Returns:
        :class:`~mi_lenses.patching.result.PatchingResult` (``values``: ``[layers, *grid]``).
    """
    t0 = time.perf_counter()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    integration_steps(method, ig_steps, ("exact", "attribution", "eap_ig"))
    pair = make_pair(view, clean, corrupted, position_map=position_map, direction=direction, prepend_bos=prepend_bos,
                     beyond_context=beyond_context)
    met = resolve_metric(view, pair, answer, wrong, metric)
    site = pair_site(view, pair, what, by, layers)
    names = [site.hook(l) for l in site.layers]
    if method == "exact":
        engine = Engine(view, pair.base, names)
        src_logits, src_cache = view.run_with_cache(pair.source, names)
        set_runs(met, pair, base=met.cells(logits=engine.logits), source=met.cells(logits=src_logits))
        run = exact_grid(engine, {l: src_cache[site.hook(l)] for l in site.layers}, site, met, max_batch=max_batch,
                         progress=progress)
        values = met.normalise(run.raw)
        info = dict(engine=run.mode, cells_run=run.cells_run, cells_skipped=run.cells_skipped, passes=run.passes)
    else:
        steps = integration_steps(method, ig_steps, ("attribution", "eap_ig"))
        cut = view.hook_name("resid_pre", 0)
        src_logits, src_cache = view.run_with_cache(pair.source, set(names) | {cut})
        base_cache = None
        if steps:
            base_logits, base_cache = view.run_with_cache(pair.base, set(names) | {cut})
            set_runs(met, pair, base=met.cells(logits=base_logits), source=met.cells(logits=src_logits))
        grad = gradient_grid(view, pair.base, src_cache, site, met, pair.pos_map, ig_steps=steps,
                             base_cache=base_cache)
        if not steps:
            set_runs(met, pair, base=torch.tensor([grad.base_raw]), source=met.cells(logits=src_logits))
        gap = (met.clean - met.corrupted) if met.normalised else 1.0
        values = grad.values / gap
        info = dict(engine="gradient", passes=1)
        if steps:
            src_value, base_value = (1.0, 0.0) if direction == "denoise" else (0.0, 1.0)
            if not met.normalised:
                src_value, base_value = (met.clean, met.corrupted) if direction == "denoise" else \
                    (met.corrupted, met.clean)
            info["completeness"] = (grad.completeness / gap, src_value - base_value)
            info["ig_steps"] = steps
    result = PatchingResult(
        model_name=view.name, what=what, by=site.by, method=method, direction=direction, metric=met.name,
        values=values.float().cpu(), layers=site.layers, grid_axes=["layer", *site.grid_axes],
        pos_labels=position_labels(view, pair), clean_tokens=view.str_tokens(pair.clean)[0],
        corrupted_tokens=view.str_tokens(pair.corrupted)[0], pos_map=list(pair.clean_map),
        clean_value=met.clean, corrupted_value=met.corrupted, normalised=met.normalised, n_prompts=pair.n_prompts,
        seconds=time.perf_counter() - t0, **info)
    return recorded(result, hooks)


# ------------------------------------------------------------------------------------------------ shared steps
def integration_steps(method: str, ig_steps: int | None, methods: tuple[str, ...]) -> int | None:
    """``method`` and ``ig_steps`` checked; the number of EAP-IG points (None for the other methods)."""
    if method not in methods:
        raise LensInputError(f"method must be one of {list(methods)}, got {method!r}.")
    if ig_steps is not None and (not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1):
        raise LensInputError(f"ig_steps must be a positive int, got {ig_steps!r}.")
    if ig_steps is not None and method != "eap_ig":
        raise LensInputError("ig_steps= goes with method='eap_ig'.")
    return (ig_steps or DEFAULT_IG_STEPS) if method == "eap_ig" else None


def resolve_metric(view: ModelView, pair: Pair, answer: TokenSpec | None, wrong: TokenSpec | None,
                   metric: MetricFn | None) -> Metric:
    """The metric of a call: a callable, or the normalised logit difference of ``answer`` (minus ``wrong``)."""
    if metric is not None:
        if not callable(metric):
            raise LensInputError(f"metric must be a function of the logits [batch, pos, vocab], got {metric!r}.")
        if answer is not None or wrong is not None:
            raise LensInputError("pass either metric= or answer=/wrong= (the default metric), not both.")
        return Metric.callable(view, metric, pair.n_prompts)
    if answer is None:
        raise LensInputError("pass answer= (and usually wrong=): the default metric is the normalised "
                             "logit[answer] - logit[wrong]. Or pass metric=callable on the logits.")
    dirn = resolve_direction(view, pair.n_prompts, answer, wrong)
    return Metric.logit_diff(view, dirn.answer_ids, dirn.wrong_ids, dirn.label)


def set_runs(met: Metric, pair: Pair, *, base: torch.Tensor, source: torch.Tensor) -> None:
    """The metric's clean and corrupted values from the base and source runs."""
    clean, corrupted = (source, base) if pair.direction == "denoise" else (base, source)
    met.set_runs(clean=clean, corrupted=corrupted)


def pair_site(view: ModelView, pair: Pair, what: str, by: str | None, layers: IndexSpec) -> Site:
    """The site of ``what``/``by`` over the pair's aligned positions (attention patterns need equal lengths)."""
    S = pair.base.shape[1]
    heads = view.n_kv_heads if what in ("head_k", "head_v") else view.n_heads
    if what == "head_pattern" and not pair.same_length:
        raise LensInputError("attention patterns are patched whole over their key positions, which needs clean and "
                             "corrupted prompts of the same length with positions aligned one to one: patch "
                             "head_out, head_q, head_k or head_v instead.")
    return resolve_site(view, what, by, sizes={"pos": S, "head": heads, "neuron": view.d_mlp, "src": S,
                                               "d": view.d_model}, layers=layers, pos_map=pair.pos_map)


def position_labels(view: ModelView, pair: Pair) -> list[str]:
    """One label per aligned position: the base run's token, ``clean/corrupted`` where the two differ."""
    c, x = view.str_tokens(pair.clean)[0], view.str_tokens(pair.corrupted)[0]
    return [c[a] if c[a] == x[b] else f"{c[a]}/{x[b]}" for a, b in pair.clean_map]
