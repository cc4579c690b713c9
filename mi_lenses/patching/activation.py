"""``activation_patching``: the entry point of exact, attribution and EAP-IG patching over one grid.

Example (the IOI pair; ``model = mi_lenses.load_model()`` for the real one)::

    res = mi_lenses.activation_patching(model, "When Mary and John went to the store, John gave a drink to",
                                        "When John and Mary went to the store, Mary gave a drink to",
                                        answer=" Mary", wrong=" John", what="resid_pre")
    res.values          # [n_layers, n_positions]: patching.get_act_patch_resid_pre's numbers
    res.show()          # the layer x position map labelled with the tokens

Attribution is linear in the patch: the whole residual stream at once is the sum of its positions.

>>> kw = dict(answer=" Paris", wrong=" city", what="resid_pre", method="attribution", layers=[0])
>>> by_pos = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is", **kw)
>>> whole = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is", by="layer",
...                                       **kw)
>>> abs(float(whole.values[0]) - float(by_pos.values[0].sum())) < 1e-5, by_pos.engine
(True, 'gradient')
"""

from __future__ import annotations

from typing import Any

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec
from mi_lenses.models.batch import PromptInput
from mi_lenses.options import with_options
from mi_lenses.patching.exact import exact_grid
from mi_lenses.patching.experiment import Experiment
from mi_lenses.features.dictionary import DictionarySet
from mi_lenses.features.reading import as_dictionary, check_dictionary
from mi_lenses.patching.features import feature_exact, feature_gradients
from mi_lenses.patching.gradients import gradient_grid, site_ig_grid
from mi_lenses.patching.options import ActivationOptions
from mi_lenses.patching.result import PatchingResult
from mi_lenses.patching.sites import Site, resolve_site


@with_options(ActivationOptions)
def activation_patching(model: Any, clean: PromptInput, corrupted: PromptInput, *,
                        options: ActivationOptions | None = None) -> PatchingResult:
    """Patch every cell of a grid of activations between a clean and a corrupted run and measure the metric.

    ``method="exact"`` runs every cell that changes something (TransformerLens's numbers, batched and replayed from
    the patched block: :mod:`~mi_lenses.patching.exact`); ``"attribution"``, ``"eap_ig"`` (the input embeddings
    interpolated) and ``"ig"`` (each layer's own activation interpolated) estimate the whole grid from gradients
    (:mod:`~mi_lenses.patching.gradients`). ``what="features"`` with ``dictionary=`` patches a dictionary's feature
    activations, the error kept (:mod:`~mi_lenses.patching.features`); a
    :class:`~mi_lenses.features.dictionary.DictionarySet` with one dictionary per block patches every block's (or
    the ``layers=`` chosen), each layer's slice of the grid equal to patching that block's dictionary alone. With
    the default metric a cell's value is 0 for the corrupted run and 1 for the clean one.

    Example (a set of two SAEs, blocks 0 and 2; each layer of the grid is its own dictionary's patching):

    >>> D, g = model.cfg.d_model, torch.Generator().manual_seed(0)
    >>> sae = lambda l: mi_lenses.Dictionary(torch.randn(D, 16, generator=g) / 2, torch.zeros(16),
    ...                                      torch.randn(16, D, generator=g) / 2, torch.zeros(D),
    ...                                      hook=f"blocks.{l}.hook_resid_post")
    >>> saes = mi_lenses.DictionarySet([sae(0), sae(2)])
    >>> kw = dict(answer=" Paris", wrong=" city", what="features", by="layer_pos_feature", progress=False)
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     dictionary=saes, **kw)
    >>> res.layers, res.grid_axes, res.values.shape[2]
    ([0, 2], ['layer', 'pos', 'feature'], 16)
    >>> one = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     dictionary=saes.dictionaries[1], **kw)
    >>> one.layers, bool((res.values[1] - one.values[0]).abs().max() < 1e-5), bool(res.values[1].abs().max() > 0)
    ([2], True, True)

    Args:
        {options}

    Returns:
        :class:`~mi_lenses.patching.result.PatchingResult` (``values``: ``[layers, *grid]``).
    """
    opts = options  # with_options merged the keywords into it; Experiment.prepare validates it
    exp = Experiment.prepare(model, clean, corrupted, opts, position_map=opts.position_map,
                             max_batch=opts.max_batch, progress=opts.progress)
    site = pair_site(exp, opts.what, opts.by, opts.layers, opts.dictionary)
    features = site.what == "features"
    steps = opts.integration_steps()
    if opts.method == "exact":
        run = feature_exact(exp, site) if features else exact_grid(exp, site)
        values = exp.normalise(run.raw)
        info = dict(engine=run.mode, cells_run=run.cells_run, cells_skipped=run.cells_skipped, passes=run.passes)
    elif features or opts.method == "ig":
        if features and opts.method == "eap_ig":
            raise LensInputError("method='eap_ig' attributes to the input embeddings' path, not to features: use "
                                 "method='ig' (integrated gradients at the features) or 'attribution'.")
        raw = (feature_gradients(exp, site, ig_steps=steps) if features
               else site_ig_grid(exp, site, ig_steps=steps))
        values = raw / exp.gap
        info = dict(engine="gradient", passes=len(site.layers) if steps else 1)
        if steps:
            info.update(ig_steps=steps)
    else:
        grad = gradient_grid(exp, site, ig_steps=steps)
        values = grad.values / exp.gap
        info = dict(engine="gradient", passes=1)
        if steps:
            info.update(completeness=(grad.completeness / exp.gap, exp.span), ig_steps=steps)
    return exp.finish(PatchingResult(
        **exp.result_fields(), what=opts.what, by=site.by, method=opts.method, values=values.float().cpu(),
        layers=site.layers, grid_axes=["layer", *site.grid_axes], **info))


def pair_site(exp: Experiment, what: str, by: str | None, layers: IndexSpec, dictionary: Any = None) -> Site:
    """The site of ``what``/``by`` over the pair's aligned positions (attention patterns need equal lengths;
    ``dictionary``: the dictionary, or the set of per-block dictionaries, whose features ``what="features"``
    patches, checked against the model)."""
    view, pair = exp.view, exp.pair
    S = pair.base.shape[1]
    heads = view.n_kv_heads if what in ("head_k", "head_v") else view.n_heads
    if what == "head_pattern" and not pair.same_length:
        raise LensInputError("attention patterns are patched whole over their key positions, which needs clean and "
                             "corrupted prompts of the same length with positions aligned one to one: patch "
                             "head_out, head_q, head_k or head_v instead.")
    if dictionary is not None:
        dictionary = as_dictionary(dictionary)
        if isinstance(dictionary, DictionarySet) and len(dictionary.dictionaries) == 1:
            dictionary = dictionary.dictionaries[0]  # a set of one: that dictionary
        check_dictionary(view, dictionary)
    return resolve_site(view, what, by, sizes={"pos": S, "head": heads, "neuron": view.d_mlp, "src": S,
                                               "d": view.d_model}, layers=layers, pos_map=pair.pos_map,
                        dictionary=dictionary)
