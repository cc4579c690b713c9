"""Dictionaries (SAEs, transcoders, per-layer and cross-layer transcoder sets) and reading features with them.

* :mod:`~mi_lenses.features.dictionary`: :class:`Dictionary` (one hook: encode, decode, the parts of its output) and
  :class:`DictionarySet`;
* :mod:`~mi_lenses.features.formats`: the files (SAELens, sparsify, circuit-tracer, ours), :func:`load_dictionary`
  and :func:`save_dictionary` here; :mod:`~mi_lenses.features.processing`: the weight processing a dictionary was
  read under, checked against the model; :mod:`~mi_lenses.features.default`: the default transcoders
  (``load_dictionary()`` without a path);
* :mod:`~mi_lenses.features.reading`: :func:`features` (activations per position and the reconstruction error);
* :mod:`~mi_lenses.features.dla`: :func:`feature_dla` (each feature's direct effect, summing exactly to the
  component's DLA) and the feature logit lens (through a tuned lens with ``lens=``);
* :mod:`~mi_lenses.features.contexts`: :func:`feature_contexts` (each feature's max-activating contexts over a
  corpus, its activation frequency and logit lens: the data of a feature dashboard);
* :mod:`~mi_lenses.features.options`: the options records of :func:`feature_contexts` and
  :func:`evaluate_dictionary` (:class:`FeatureContextsOptions`, :class:`DictionaryEvaluationOptions`);
* :mod:`~mi_lenses.features.train`: :func:`train_dictionary` (TopK SAEs and transcoders streamed from the model,
  :class:`DictionaryTrainConfig`); :mod:`~mi_lenses.features.evaluate`: :func:`evaluate_dictionary` (FVU, L0, dead
  features, cross-entropy spliced in, loss recovered);
* :mod:`~mi_lenses.features.intervene`: :func:`intervene` (ablate, clamp, scale or add features, the error kept;
  steering during generation). Feature-level patching is ``activation_patching(..., what="features",
  dictionary=...)``.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> d = Dictionary(torch.randn(model.cfg.d_model, 64, generator=g) * 0.3, torch.zeros(64),
    ...                torch.randn(64, model.cfg.d_model, generator=g) * 0.1, torch.zeros(model.cfg.d_model),
    ...                hook="blocks.1.hook_mlp_out")
    >>> path = save_dictionary(d, tmp / "sae", model=model)          # records the model's fingerprint
    >>> f = mi_lenses.features(model, "The capital of France is", load_dictionary(path))
    >>> f.activations.shape[-1], f.error.shape[-1] == model.cfg.d_model
    (64, True)
    >>> r = mi_lenses.feature_dla(model, "The capital of France is", d, answer=" Paris")
    >>> dla = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> abs(float(r.total[0] - dla.mlps[0, 1])) < 1e-4             # features + bias + error = the MLP's DLA
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mi_lenses.errors import LensInputError
from mi_lenses.features.default import default_transcoders
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.contexts import FeatureContexts, feature_contexts
from mi_lenses.features.dla import FeatureDLA, feature_dla, feature_logit_lens
from mi_lenses.features.evaluate import DictionaryEvaluation, evaluate_dictionary
from mi_lenses.features.formats import DictionaryFormat
from mi_lenses.features.formats import load as _load
from mi_lenses.features.intervene import Intervention, intervene
from mi_lenses.features.options import DictionaryEvaluationOptions, FeatureContextsOptions
from mi_lenses.features.formats import save as _save
from mi_lenses.features.reading import FeatureResult, check_dictionary, features, read_vectors
from mi_lenses.features.train import DictionaryTrainConfig, train_dictionary
from mi_lenses.features.processing import processing
from mi_lenses.models.identity import model_identity
from mi_lenses.models.loading import load_model
from mi_lenses.models.view import ModelView


def load_dictionary(
    path: str | os.PathLike | None = None,
    *,
    model: Any = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Dictionary | DictionarySet:
    """Load a dictionary folder: SAELens (``cfg.json`` + ``sae_weights.safetensors``), a sparsify hook folder
    (``cfg.json`` + ``sae.safetensors``, named by its module, e.g. ``layers.12.mlp``), circuit-tracer's transcoder
    sets and cross-layer transcoders (``config.yaml`` + ``layer_{i}.safetensors`` / ``W_enc_{i}``, ``W_dec_{i}``) or
    ours (``mi_dictionary.json``). Only safetensors are read, never pickles. Without a path: the default transcoders
    (:mod:`~mi_lenses.features.default`), as ``load_model()`` without a name is the embedded model.

    Args:
        path: the folder; None for the default transcoders of ``model``.
        model: without a path, the model whose default transcoders to load (default: the embedded model,
            ``mi_lenses.load_model()``); trained from the shipped text on the first call (minutes on 2 cores for the
            embedded model), then read from the cache.
        cache_dir: without a path, the cache root (default ``$MI_LENSES_CACHE`` or ``~/.cache/mi_lenses``).
        progress: without a path, show the training's progress bar.

    Returns:
        a :class:`Dictionary` (SAE or transcoder) or a :class:`DictionarySet` (per-layer or cross-layer transcoders).
    """
    if path is None:
        return default_transcoders(load_model() if model is None else model, cache_dir=cache_dir, progress=progress)
    if model is not None or cache_dir is not None:
        raise LensInputError("load_dictionary(path) reads the folder as it is: model= and cache_dir= only choose the "
                             "default transcoders (load_dictionary() without a path).")
    return _load(path)


def save_dictionary(
    dictionary: Dictionary | DictionarySet,
    path: str | os.PathLike,
    *,
    format: DictionaryFormat = "mi_lenses",
    model: Any = None,
) -> Path:
    """Write a dictionary into the folder ``path`` (atomically), in our format or SAELens's.

    Args:
        dictionary: a :class:`Dictionary` or (ours only) a :class:`DictionarySet`.
        path: the folder to write.
        format: ``"mi_lenses"`` (every field, a checksum, the model's identity) or ``"saelens"`` (``cfg.json`` +
            ``sae_weights.safetensors``, loadable by SAELens's ``SAE.load_from_disk``).
        model: the model the dictionary belongs to: its hooks are checked and its identity recorded (our format), so
            that the file is refused on another model.

    Returns:
        the folder.
    """
    meta: dict[str, Any] = {}
    if model is not None:
        view = ModelView(model)
        check_dictionary(view, dictionary)
        meta = {**model_identity(view), "processing": processing(view)}
    return _save(dictionary, path, format=format, meta=meta)


__all__ = [
    "Dictionary",
    "DictionaryEvaluation",
    "DictionaryEvaluationOptions",
    "DictionarySet",
    "DictionaryTrainConfig",
    "FeatureContexts",
    "FeatureContextsOptions",
    "FeatureDLA",
    "FeatureResult",
    "Intervention",
    "feature_contexts",
    "feature_dla",
    "feature_logit_lens",
    "features",
    "intervene",
    "load_dictionary",
    "read_vectors",
    "save_dictionary",
    "evaluate_dictionary",
    "train_dictionary",
]
