"""Session fixtures over the tiny models of :mod:`tiny` (architectures, raw and folded) and the embedded SmolLM2."""

from __future__ import annotations

import pytest

from tiny import (  # noqa: F401  (re-exported: tests import these from conftest)
    ARCHS,
    CORPUS,
    MODES,
    PROMPT,
    PROMPTS,
    VOCAB_SIZE,
    TinyModel,
    _Builder,
    _train_tokenizer,
    hook_counts,
)


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run single-threaded (intra-op threads only contend, 2-5x slower on a 2-core machine); tests marked
    ``slow`` (the embedded SmolLM2, subprocesses) keep torch's default."""
    import torch

    n = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    tok = _train_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
    assert len(tok) == VOCAB_SIZE
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    return tok


@pytest.fixture(scope="session")
def builder(tokenizer) -> _Builder:
    return _Builder(tokenizer)


@pytest.fixture(scope="session", params=[(a, m) for a in ARCHS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request, builder) -> TinyModel:
    """Every architecture, raw and in compatibility mode."""
    return builder.get(*request.param)


@pytest.fixture(scope="session", params=[("llama_gqa", "raw"), ("gpt2", "compat")], ids=lambda p: f"{p[0]}-{p[1]}")
def tiny_pair(request, builder) -> TinyModel:
    """Two contrasting models (RMS/GQA raw, LN/MHA folded) for the option and error tests."""
    return builder.get(*request.param)


@pytest.fixture(scope="session")
def llama_raw(builder) -> TinyModel:
    return builder.get("llama_gqa", "raw")


@pytest.fixture(scope="session")
def hf_folder(builder, tmp_path_factory):
    """The tiny llama saved as an HF folder, loadable by ``load_model`` (also in subprocesses and the CLI)."""
    folder = tmp_path_factory.mktemp("tiny_llama_hf")
    builder.hf("llama_gqa").save_pretrained(folder)
    builder.tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (mark its tests ``slow``)."""
    import mi_lenses

    return mi_lenses.load_model()
