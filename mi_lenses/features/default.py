"""The default transcoders: a skip transcoder for every block of a model, trained by mi_lenses from the text it ships.

``mi_lenses.load_dictionary()`` (no path) is to dictionaries what ``mi_lenses.load_model()`` is to models: on the
embedded SmolLM2-135M it returns a :class:`~mi_lenses.features.dictionary.DictionarySet` of 30 transcoders, trained on
the first call from ``mi_lenses.data.TRAIN_TEXT`` with :data:`DEFAULT_TRANSCODERS` and cached beside the de-quantised
model (``$MI_LENSES_CACHE/transcoders``); later calls read the cache in a second. The training is sized for a
first feature analysis on 2 CPU cores (minutes: the measured time and quality are in ``docs/features.md``); it
checkpoints as it goes, so an interrupted first call resumes where it stopped. The cache is keyed by the model's
identity (its unembedding fingerprint), its weight processing (:mod:`~mi_lenses.features.processing`: compatibility
mode or raw) and the recipe, so every model and mode gets its own set. Any model works: on a larger one the same
recipe takes proportionally longer.

Example:
    >>> tc = mi_lenses.load_dictionary(model=model, cache_dir=tmp, progress=False)   # trained once, then cached
    >>> len(tc.dictionaries) == model.cfg.n_layers, tc.dictionaries[0].kind, tc.dictionaries[0].W_skip is not None
    (True, 'skip transcoder', True)
    >>> again = mi_lenses.load_dictionary(model=model, cache_dir=tmp)                 # read from the cache
    >>> bool(torch.equal(again.dictionaries[1].W_enc, tc.dictionaries[1].W_enc))
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mi_lenses.data import TRAIN_TEXT
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.formats import load, save
from mi_lenses.features.processing import processing
from mi_lenses.features.train import DictionaryTrainConfig, train_dictionary
from mi_lenses.models.identity import model_identity, unembed_hash
from mi_lenses.models.loading import cache_root
from mi_lenses.models.view import ModelView

# The recipe of the default transcoders (measured on the embedded model: docs/features.md).
# Small batches and a higher learning rate than train_dictionary's defaults: 96 steps instead of 24 on the same tokens
# (measured on blocks 0, 15 and 28 of SmolLM2, every position trained and evaluated: held-out FVU 0.19 / 0.37 / 0.90
# against 0.68 / 0.65 / 1.00 with batches of 8 at the default learning rate, and the cross-entropy spliced in +0.46 /
# -0.01 / +0.11 bits against +4.31 / +0.01 / +1.56). The first position of each sequence is left out
# (exclude_first=1): block 11 writes a norm of 23,000 there against 32 elsewhere, and a transcoder trained on it wrote
# parts of it everywhere (+9.5 bits spliced in).
DEFAULT_TRANSCODERS = DictionaryTrainConfig(kind="transcoder", n_features=2048, k=32, skip=True, max_tokens=24576,
                                            seq_len=128, batch_size=2, lr=4e-3, checkpoint_every=16, seed=0)
FOLDER = "transcoders"


def recipe(view: ModelView) -> DictionaryTrainConfig:
    """:data:`DEFAULT_TRANSCODERS` for every block of ``view``'s model, its sequences cut to the model's context
    window where that is shorter."""
    n_ctx = int(getattr(view.cfg, "n_ctx", 0) or DEFAULT_TRANSCODERS.seq_len)
    return dataclasses.replace(DEFAULT_TRANSCODERS, layers=list(range(view.n_layers)),
                               seq_len=min(DEFAULT_TRANSCODERS.seq_len, n_ctx))


def default_folder(view: ModelView, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of ``view``'s model's default transcoders (model identity, processing and recipe)."""
    config = recipe(view)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    key = json.dumps({"model": unembed_hash(view), "processing": processing(view), "recipe": settings,
                      "data": TRAIN_TEXT.name}, sort_keys=True)
    name = "".join(c if c.isalnum() else "-" for c in view.name.split("/")[-1])
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / FOLDER / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def default_transcoders(model: Any, *, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> DictionarySet:
    """``model``'s default transcoders: read from the cache, or trained into it first (resuming an interrupted run).

    Args:
        model: a TransformerLens model (the embedded SmolLM2 is what the recipe is sized for).
        cache_dir: the cache root (default ``$MI_LENSES_CACHE`` or ``~/.cache/mi_lenses``).
        progress: show a progress bar while training.

    Returns:
        a :class:`~mi_lenses.features.dictionary.DictionarySet`, one skip transcoder per block, in block order.
    """
    view = ModelView(model)
    folder = default_folder(view, cache_dir)
    if (folder / "done.json").is_file():
        return load(folder / "set")
    partial, config = folder / "partial", recipe(view)
    resume = (partial / "checkpoint").is_dir()
    if progress:
        print(f"Training the default transcoders of {view.name} ({view.n_layers} blocks, {config.n_features} "
              f"features each, {config.max_tokens} tokens of {TRAIN_TEXT.name}) once"
              f"{' (resuming)' if resume else ''}; cached in {folder}")
    trained = train_dictionary(model, TRAIN_TEXT, partial, config, resume=resume, progress=progress)
    if isinstance(trained, Dictionary):  # a one-block model
        trained = DictionarySet([trained], meta={"training": trained.meta.get("training", {})})
    save(trained, folder / "set", meta={**model_identity(view), "processing": processing(view)})
    (folder / "done.json").write_text(json.dumps({"training": trained.meta.get("training", {})}, indent=1))
    shutil.rmtree(partial, ignore_errors=True)
    return load(folder / "set")
