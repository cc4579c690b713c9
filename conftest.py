"""Doctests: every ``>>>`` example in ``mi_lenses`` runs on a tiny random Llama-style model (GQA, untied, RMSNorm,
BOS) booted offline as a TransformerBridge, in place of ``mi_lenses.load_model()``.

Its tokenizer (a byte-level BPE trained in the test session) makes " Paris", " capital" or " brown" single tokens, like
a real one. The namespace holds ``model``, ``mi_lenses``, ``torch``, ``ModelView``, ``TunedLens``, ``Source``,
``Target``, ``presets`` and ``tmp`` (an empty folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))


@pytest.fixture(scope="session")
def _doctest_model(tmp_path_factory):
    from tiny import DOC_VOCAB_SIZE, _Builder, _train_tokenizer

    tok = _train_tokenizer(tmp_path_factory.mktemp("doctest_tokenizer"), vocab_size=DOC_VOCAB_SIZE)
    return _Builder(tok).get("llama_gqa", "raw").model


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    if not isinstance(request.node, pytest.DoctestItem):
        return
    import torch

    import mi_lenses

    torch.manual_seed(0)
    doctest_namespace.update(model=request.getfixturevalue("_doctest_model"), mi_lenses=mi_lenses, torch=torch,
                             ModelView=mi_lenses.ModelView, TunedLens=mi_lenses.TunedLens, Source=mi_lenses.Source,
                             Target=mi_lenses.Target, presets=mi_lenses.presets,
                             tmp=request.getfixturevalue("tmp_path"))
