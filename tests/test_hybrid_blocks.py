"""State-space and hybrid blocks beyond the architecture matrix's cells: a Patchscope generates the HF model's own
greedy continuation (KV caches with state-space / linear-attention layers, or recomputation where a cache cannot
continue several tokens), attention refuses blocks without heads by name, neuron attribution reads the MLPs there are.
"""

from __future__ import annotations

import warnings

import arch_matrix as AM
import pytest
import torch

pytestmark = pytest.mark.skipif(
    __import__("mi_lenses").models.loading.tl_major() < 4, reason="TransformerBridges (TL 4.x)")


@pytest.fixture(scope="module")
def matrix(tokenizer, tmp_path_factory):
    return AM.Matrix(tokenizer, tmp_path_factory.mktemp("hybrids"))


@pytest.mark.parametrize("name", ["mamba", "jamba", "qwen3_next", "lfm2"])
def test_identity_patchscope_generates_the_hf_continuation(matrix, name):
    import mi_lenses

    m, entry = matrix.model(name, "raw"), matrix.entry(name)
    tokens, n = entry.tokens[:, :5], 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Jamba: "the KV cache of this model is not used" (it recomputes)
        res = mi_lenses.patchscope(m, mi_lenses.Source(tokens, layers=[0, 1], position=2),
                                   mi_lenses.Target(tokens, positions=2), max_new_tokens=n)
    seq = tokens
    with torch.no_grad():
        for _ in range(n):  # HF's greedy continuation, one full forward pass per token
            seq = torch.cat([seq, entry.hf(seq).logits[:, -1:].argmax(-1)], -1)
    for r in range(2):
        assert res.generated_ids[r].tolist() == seq[0, 5:].tolist()


def test_attention_refuses_blocks_without_heads(matrix):
    import mi_lenses

    m, entry = matrix.model("jamba", "raw"), matrix.entry("jamba")
    with pytest.raises(mi_lenses.LensInputError, match=r"blocks 0 \(SSM\) have no attention heads"):
        mi_lenses.attention(m, entry.tokens, layers=[0], induction_length=0)
    with pytest.raises(mi_lenses.LensInputError, match="no attention heads"):
        mi_lenses.attention(matrix.model("mamba", "raw"), entry.tokens, induction_length=0)


@pytest.mark.parametrize("name", ["bamba", "mamba"])
def test_neuron_attribution_on_hybrids_equals_dla(matrix, name):
    import mi_lenses

    m, entry = matrix.model(name, "raw"), matrix.entry(name)
    with torch.no_grad():
        _, cache = m.run_with_cache(entry.tokens, names_filter=mi_lenses.attribution.required_hooks(m))
    attr = mi_lenses.neuron_attribution(m, cache, answer=entry.answer, wrong=entry.wrong).values
    res = mi_lenses.direct_logit_attribution(m, entry.tokens, answer=entry.answer, wrong=entry.wrong, progress=False)
    AM.close(attr[:, 0, -1, : res.neurons.shape[-1]], res.neurons[0], f"{name} neuron_attribution vs DLA")
    assert res.top(1, kinds="mixer")[0][0].startswith("Mixer")
