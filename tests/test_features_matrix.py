"""Issue 28 on the architecture matrix (:mod:`arch_matrix`): on every configuration, raw and in compatibility mode,
whose blocks have an MLP that direct logit attribution reads as a part of its own, a small random dictionary on one
middle layer's MLP (an SAE on ``hook_mlp_out``; where the bridge exposes ``mlp.hook_in``/``mlp.hook_out``, a skip
transcoder from the MLP's input to its output) gives the exact identities of :mod:`mi_lenses.features`:

* ``features().verify()``: ``decode(encode(x)) + error == x``;
* ``feature_dla().verify()`` (features + bias + skip + error == the dictionary's output on the logit direction), and
  that total equals ``direct_logit_attribution(...).mlps`` of the layer within the matrix tolerance (the matrix checks
  that value against the HF model alone);
* ``intervene`` with a no-op edit leaves the logits bit-identical, and clamping one feature changes the MLP output by
  exactly ``(a' - a) W_dec``.

Where direct logit attribution is refused by name (``arch_matrix.FEATURE_REFUSED``: a part *other* than the MLPs
is missing or wrong), the MLP's value is compared with the HF brute force of :mod:`arch_oracle` instead: feature DLA
of an MLP dictionary needs none of the missing parts. On Bloom and MPT the HF MLP module adds the residual stream
itself, so the bridge's ``mlp.hook_out`` holds ``hook_resid_post``: a transcoder writing it is a residual-stream
dictionary, and its total is the residual state's direct value (asserted as such).

Not run (the reason is in the test id): configurations ``load_model`` refuses, blocks without an MLP (state-space
models) and MLPs that are one part of a block TransformerLens wraps whole or exposes without ``hook_mlp_out``
(RecurrentGemma, Zamba 2, RWKV, Nemotron-H). On Gemma 4 (DLA refused by name, and the HF oracle does not model its
final norm) feature DLA is checked by its own ``verify()`` only; on raw NanoChat it is refused (the final norm's gain
is not readable, as for DLA).

The inner loop (``-m "not slow"``) runs one configuration per mechanism family (``SAMPLE``) in both modes; the other
configurations are marked ``slow`` (building and booting all of them takes about a minute on two cores).
"""

from __future__ import annotations

import arch_matrix as AM
import pytest
import torch
from archs import SPECS
from tolerance import EPS

pytestmark = pytest.mark.skipif(
    __import__("mi_lenses").models.loading.tl_major() < 4, reason="the matrix boots TransformerBridges (TL 4.x)")

N = 24  # features

# One configuration per mechanism the MLP's way to the logit depends on (run in the inner loop).
SAMPLE = {
    "gpt2": "LayerNorm, learned positions, Conv1D MLP",
    "llama": "RMSNorm, gated MLP",
    "phi": "parallel attention and MLP, no ln2",
    "gemma2": "sublayer post-norms, soft-capped logits",
    "granite": "residual multiplier (hook_mlp_out holds the scaled contribution)",
    "opt_350m": "post-LN blocks, project_out, no final norm",
    "cohere": "parallel block, logit scale",
    "mixtral": "mixture of experts",
    "qwen2_moe": "MoE with a gated shared expert",
    "deepseek_v3": "latent attention, dense first block, MoE with shared experts",
    "gpt_oss": "MoE with biases and clamped experts (compatibility mode falls back to raw)",
    "jamba": "hybrid: SSM block with an MLP",
    "granitemoehybrid": "hybrid: shared_mlp beside the MoE",
    "jetmoe": "mixture of attention experts wrapped whole, MoE MLP",
}

# Configurations without an MLP DLA reads as a part of its own at hook_mlp_out.
NO_MLP = {
    "mamba": "no MLP (state-space blocks)",
    "mamba2": "no MLP (state-space blocks)",
    "falcon_mamba": "no MLP (state-space blocks)",
    "recurrent_gemma": "MLP inside blocks TransformerLens wraps whole",
    "zamba2": "MLP inside blocks TransformerLens wraps whole",
    "rwkv": "channel-mix is one part between resid_mid and resid_post (no hook_mlp_out)",
    "nemotron_h": "MLP blocks are one part between resid_pre and resid_post (no hook_mlp_out)",
}


def skip_reason(name: str, mode: str) -> str | None:
    if name in AM.REFUSED:
        return "load refused"
    want = AM.expected(name, mode, "DLA MLPs")
    if want.startswith("probe: ") and (name, mode) != ("qwen2_moe_square", "compat"):  # that one falls back to raw
        return "load refused by the parity probe"
    return NO_MLP.get(name)


def _id(name: str, mode: str) -> str:
    why = skip_reason(name, mode)
    return f"{name}-{mode}" + (f"-skip:{why.split(' (')[0].replace(' ', '_')}" if why else "")


CASES = [pytest.param(n, m, id=_id(n, m),
                      marks=[pytest.mark.skip(reason=skip_reason(n, m))] if skip_reason(n, m)
                      else [] if n in SAMPLE else [pytest.mark.slow])
         for n in SPECS for m in AM.MODES]


# DLA refused by name, and arch_oracle does not model the final norm (Gemma 4): feature DLA is checked by verify() only.
NO_ORACLE = {"gemma4"}

# HF's MLP module adds the residual stream (BloomMLP / MptMLP take it): the bridge's mlp.hook_out is hook_resid_post.
MLP_ADDS_RESIDUAL = {"bloom", "mpt"}


@pytest.fixture(autouse=True)
def _threads():
    """Single-threaded also for the ``slow`` configurations (overrides conftest's: these models are tiny)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def matrix(tokenizer, tmp_path_factory):
    return AM.Matrix(tokenizer, tmp_path_factory.mktemp("archs_features"))


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _dictionaries(m, layer, widths):
    """An SAE on the layer's ``hook_mlp_out`` and, where the bridge has ``mlp.hook_in``/``mlp.hook_out``, a skip
    transcoder from the MLP's input to its output (its decoder scaled to the output's size)."""
    from mi_lenses import Dictionary

    p = f"blocks.{layer}"
    out = {}
    D = widths[f"{p}.hook_mlp_out"]
    out["sae"] = Dictionary(_rand(D, N, scale=2.0 / D ** 0.5 / widths["rms:" + f"{p}.hook_mlp_out"], seed=1),
                            _rand(N, scale=0.1, seed=2), _rand(N, D, scale=0.2, seed=3), _rand(D, scale=0.05, seed=4),
                            hook=f"{p}.hook_mlp_out")
    if f"{p}.mlp.hook_in" in widths and f"{p}.mlp.hook_out" in widths:
        d_in, d_out = widths[f"{p}.mlp.hook_in"], widths[f"{p}.mlp.hook_out"]
        out["skip_transcoder"] = Dictionary(
            _rand(d_in, N, scale=2.0 / d_in ** 0.5 / widths["rms:" + f"{p}.mlp.hook_in"], seed=5),
            _rand(N, scale=0.1, seed=6), _rand(N, d_out, scale=0.2, seed=7), _rand(d_out, scale=0.05, seed=8),
            hook=f"{p}.mlp.hook_in", hook_out=f"{p}.mlp.hook_out", W_skip=_rand(d_out, d_in, scale=0.1, seed=9),
            activation="jumprelu", threshold=torch.full((N,), 0.05))
    return out


def _mlp_value(m, entry, name, mode, layer):
    """The MLP's direct logit attribution at ``layer``: direct_logit_attribution's (checked against HF by the
    matrix), or where DLA is refused by name the HF brute force of :mod:`arch_oracle`."""
    import arch_oracle as O
    from archs import HYBRID_SPECS

    import mi_lenses

    if (name, "DLA MLPs") not in AM.FEATURE_REFUSED:
        dla = mi_lenses.direct_logit_attribution(m, entry.tokens, answer=entry.answer, wrong=entry.wrong,
                                                 progress=False)
        resid = dla.embed[0].sum() + dla.attn_out[0, : layer + 1].sum() + dla.mlps[0, : layer + 1].sum()
        return dla.mlps[0, layer], resid
    with pytest.raises(mi_lenses.LensInputError, match="under TransformerLens"):
        mi_lenses.direct_logit_attribution(m, entry.tokens, answer=entry.answer, wrong=entry.wrong, progress=False)
    if name in NO_ORACLE:
        return None, None
    if name in HYBRID_SPECS:
        oracle = entry.once("hybrid", lambda: O.hybrid_oracle(name, entry.hf, entry.tokens, entry.answer, entry.wrong))
    else:
        folded = getattr(m, "compatibility_mode", False) and name not in O.VALUE_BIAS_KEPT
        oracle = O.dla_oracle(name, entry.hf, entry.tokens, entry.run, entry.answer, entry.wrong,
                              value_bias_folded=folded)
    return torch.as_tensor(oracle.mlps[layer]), None


@pytest.mark.parametrize("name,mode", CASES)
def test_feature_identities_on_the_matrix(matrix, name, mode):
    import mi_lenses
    from mi_lenses.models.interventions import active_hooks
    from mi_lenses.models.view import ModelView

    m, entry = matrix.model(name, mode), matrix.entry(name)
    tokens = entry.tokens
    view = ModelView(m)
    L = m.cfg.n_layers
    layer = next(l for l in [*range(L // 2, L), *range(L // 2)] if view.layout(l).mlp is not None)
    p = f"blocks.{layer}"
    names = [h for h in (f"{p}.hook_mlp_out", f"{p}.mlp.hook_in", f"{p}.mlp.hook_out", f"{p}.hook_resid_post")
             if h in view.hook_names]
    assert f"{p}.hook_mlp_out" in names, f"{name}: block {layer} has an MLP but no hook_mlp_out"
    with torch.no_grad():
        plain, cache = m.run_with_cache(tokens, names_filter=names)
    if f"{p}.mlp.hook_out" in names:
        adds = torch.equal(cache[f"{p}.mlp.hook_out"], cache[f"{p}.hook_resid_post"])
        assert adds == (name in MLP_ADDS_RESIDUAL), f"{name}: mlp.hook_out is {'' if adds else 'not '}resid_post"
    widths = {h: cache[h].shape[-1] for h in names}
    widths.update({"rms:" + h: float(cache[h].pow(2).mean().sqrt()) + 1e-6 for h in names})
    no_final_gain = name == "nanochat" and mode == "raw"  # raw NanoChat: the final norm's gain is not readable
    want, resid = (None, None) if no_final_gain else _mlp_value(m, entry, name, mode, layer)
    for kind, d in _dictionaries(m, layer, widths).items():
        what = f"{name}-{mode} {kind} on {d.hook}"
        f = mi_lenses.features(m, tokens, d)
        assert f.verify() is f, what
        acts = f.activations[0]  # [S, N]
        assert acts[-1].any(), f"{what}: no feature is active at the last position (the test's dictionary)"
        if no_final_gain:
            with pytest.raises(mi_lenses.LensInputError, match="final norm gain"):
                mi_lenses.feature_dla(m, tokens, d, answer=entry.answer, wrong=entry.wrong)
        else:
            r = mi_lenses.feature_dla(m, tokens, d, answer=entry.answer, wrong=entry.wrong)
            assert r.verify() is r, what
            assert (r.skip is not None) == (d.W_skip is not None), what
            ref, label = want, f"the MLP {layer}'s DLA"
            if name in MLP_ADDS_RESIDUAL and d.writes.endswith("mlp.hook_out"):
                ref, label = resid, f"resid_post {layer}'s direct value"
            if ref is not None:
                AM.close(r.total[0], ref, f"{what}: feature DLA total vs {label}")
                AM.close(r.component[0], ref, f"{what}: the component's value vs {label}")

        live = int(acts[-1].argmax())
        with torch.no_grad():
            for edits in ({live: lambda a: a}, {live: lambda a: a + 0.0, (live + 1) % N: lambda a: 1.0 * a}):
                with mi_lenses.intervene(m, d, edits):
                    assert torch.equal(m(tokens), plain), f"{what}: a no-op intervention changed the logits"
            value = float(acts[:, live].max()) + 1.5
            with mi_lenses.intervene(m, d, {live: value}):
                edited_logits, edited = m.run_with_cache(tokens, names_filter=[d.writes])
        delta = (value - acts[:, live])[:, None] * d.W_dec[live]  # [S, d_out]: (a' - a) W_dec at every position
        got = edited[d.writes][0].float() - cache[d.writes][0].float()
        AM.close(got, delta, f"{what}: clamping feature {live} vs (a' - a) W_dec",
                 64 * EPS * (1 + float(delta.abs().max())))
        assert not torch.equal(edited_logits, plain), f"{what}: clamping a feature did not reach the logits"
    assert active_hooks(m) == []
