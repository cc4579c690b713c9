"""Attention knows its masks (mi_lenses.models.masks): sliding windows, chunks and learned attention sinks are read
from the model, shorter than the matrix prompt, and used by the patterns, the q·k terms and their verification."""

from __future__ import annotations

import pytest
import torch

import arch_matrix as AM
import mi_lenses
from archs import SPECS, WINDOW
from mi_lenses.models.masks import attention_masks, has_local_attention

pytestmark = pytest.mark.skipif(
    mi_lenses.models.loading.tl_major() < 4, reason="the matrix boots TransformerBridges (TL 4.x)")

# (window, chunk) of each layer as transformers builds the configuration
SPANS = {
    "mistral_window": [(WINDOW, None)] * 2, "phi3_window": [(WINDOW, None)] * 2,
    "starcoder2_window": [(WINDOW, None)] * 2, "qwen2_window": [(None, None), (WINDOW, None)],
    "gpt_neo_window": [(None, None), (WINDOW, None)], "gemma2_window": [(WINDOW, None), (None, None)],
    **{n: [(WINDOW, None), (None, None)] for n in ("cohere2_window", "exaone4_window", "gemma3_window",
                                                    "olmo3_window", "gpt_oss_window")},
    "llama4_chunked": [(None, WINDOW), (None, None)],
}


@pytest.fixture(scope="module")
def matrix(tokenizer, tmp_path_factory):
    return AM.Matrix(tokenizer, tmp_path_factory.mktemp("masks"))


def test_windows_are_shorter_than_the_matrix_prompt(tokenizer):
    assert set(SPANS) <= set(SPECS)
    assert len(tokenizer(AM.PROMPT)["input_ids"]) >= 3 * WINDOW


@pytest.mark.parametrize("name", sorted(SPANS))
def test_each_layer_mask_is_read_from_the_model(matrix, name):
    m = matrix.model(name, "raw")
    got = attention_masks(m)
    assert [(x.window, x.chunk) for x in got] == SPANS[name]
    assert has_local_attention(m)
    assert attention_masks(m) is got  # read once per model
    assert all((x.sinks is not None) == (name == "gpt_oss_window") for x in got)
    assert all((x.score_cap == 2.0) == (name == "gemma2_window") for x in got)


def test_a_pattern_outside_the_window_fails_verification(matrix):
    m, tokens = matrix.model("mistral_window", "raw"), matrix.entry("mistral_window").tokens
    res = mi_lenses.attention(m, tokens, induction_length=0)
    S = tokens.shape[1]
    terms = res.qk_terms(0, 1, S - 1)
    assert terms.visible.sum() == WINDOW and not terms.probs[~terms.visible].any()
    torch.testing.assert_close(terms.probs, terms.pattern, atol=1e-5, rtol=0)
    res.patterns[0, 0, 1, S - 1] = torch.full((S,), 1.0 / S)  # uniform over every earlier key: outside the window
    with pytest.raises(mi_lenses.VerificationError, match="sliding window of 4 keys"):
        res.verify()


def test_padded_prompts_keep_each_prompts_window(matrix):
    """Left and right padding: each prompt's patterns (verified against its window) equal the prompt's alone."""
    m = matrix.model("mistral_window", "raw")
    tokens = matrix.entry("mistral_window").tokens
    short = tokens[:, :9]
    alone = mi_lenses.attention(m, short, induction_length=0).patterns[0, :, :, :9, :9]
    for left in (True, False):
        pad = torch.zeros(1, 6, dtype=torch.long)
        row = torch.cat([pad, short], 1) if left else torch.cat([short, pad], 1)
        mask = torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1) if left else \
            torch.cat([torch.ones_like(short), torch.zeros_like(pad)], 1)
        both = mi_lenses.attention(m, torch.cat([tokens, row]), attention_mask=torch.cat([torch.ones_like(tokens),
                                                                                          mask]), induction_length=0)
        torch.testing.assert_close(both.patterns[1, :, :, :9, :9], alone, atol=1e-5, rtol=0)


def test_learned_sinks_take_the_rest_of_each_row(matrix):
    m, tokens = matrix.model("gpt_oss_window", "raw"), matrix.entry("gpt_oss_window").tokens
    res = mi_lenses.attention(m, tokens, induction_length=0)
    S = tokens.shape[1]
    assert res.learned_sink is not None and float(res.learned_sink[0, :, :, 1:].max()) > 1e-3
    torch.testing.assert_close(res.patterns[0].sum(-1) + res.learned_sink[0], torch.ones(2, 4, S))
    terms = res.qk_terms(0, 2, S - 1)
    assert terms.sink == pytest.approx(float(res.learned_sink[0, 0, 2, S - 1]), abs=1e-5)
    assert "learned_sink" in res.to_dict(patterns=True)
