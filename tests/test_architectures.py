"""The architecture matrix (see :mod:`arch_matrix`): tiny random models of every decoder architecture of
TransformerLens 4.3's registry that transformers builds, and variants (98 configurations), booted with
``mi_lenses.load_model(folder)`` raw and in compatibility mode, every feature checked against the HF model
alone; and the support page generated from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import arch_matrix as AM
from archs import SPECS
from tolerance import EPS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"

pytestmark = pytest.mark.skipif(
    __import__("mi_lenses").models.loading.tl_major() < 4, reason="the matrix boots TransformerBridges (TL 4.x)")


@pytest.fixture(scope="module")
def matrix(tokenizer, tmp_path_factory):
    return AM.Matrix(tokenizer, tmp_path_factory.mktemp("archs"))


CELLS = [(n, m, f) for n in SPECS for m in AM.MODES for f in AM.FEATURES]


@pytest.mark.parametrize("name,mode,feature", CELLS, ids=[f"{n}-{m}-{f.replace(' ', '_')}" for n, m, f in CELLS])
def test_cell(matrix, name, mode, feature):
    want = AM.expected(name, mode, feature)
    if want.startswith("probe: ") and not AM.PARITY_PROBE:
        pytest.xfail(f"TransformerLens's bridge disagrees with HF ({want[7:]}): the load-time parity probe refuses it")
    assert AM.outcome(matrix, name, mode, feature) == want


def test_support_page_is_the_expectation_table():
    """docs/architectures.md is generated (scripts/support_table.py) from this matrix: its table must be the
    expectation table; regenerate the page when the table changes."""
    page = PAGE.read_text(encoding="utf-8")
    assert AM.render_table(AM.expected_table()) in page, \
        "docs/architectures.md is out of date: run .venv/bin/python scripts/support_table.py"
    assert "Run on TransformerLens " in page


def test_post_ln_model_has_no_resid_mid(matrix):
    """OPT-350m normalises its residual stream after each sublayer: a resid_mid lens is refused with the fix."""
    import mi_lenses

    m = matrix.model("opt_350m", "raw")
    with pytest.raises(mi_lenses.LensInputError, match="post-LN"):
        mi_lenses.logit_lens(m, matrix.entry("opt_350m").tokens, point="resid_mid")


NEURON_CASES = [(n, m) for n in ("gemma2", "olmo2", "opt_350m", "granite", "mixtral", "qwen2_moe",
                                  # --- issue 26: MLA and MoE (shared experts and scaling factors, a router with a
                                  # bias argument, experts without act_fn, a block-level scale, post-norms)
                                  "deepseek_v3", "ernie4_5_moe", "afmoe", "gpt_oss", "laguna")
                for m in AM.MODES]


@pytest.mark.parametrize("name,mode", NEURON_CASES, ids=[f"{n}-{m}" for n, m in NEURON_CASES])
def test_neuron_attribution_at_every_position_equals_dla(matrix, name, mode):
    """neuron_attribution (every position at once, the direction carried through post-norms, post-LN norms,
    multipliers, experts) equals the DLA's neurons at each position, which the matrix checks against HF."""
    import torch

    import mi_lenses

    m = matrix.model(name, mode)
    entry = matrix.entry(name)
    with torch.no_grad():
        # (only the hooks it reads: with hooks on ln2, TransformerLens's post-LN OPT bridge breaks its own forward)
        logits, cache = m.run_with_cache(entry.tokens, names_filter=mi_lenses.attribution.required_hooks(m))
    attr = mi_lenses.neuron_attribution(m, cache, answer=entry.answer, wrong=entry.wrong).values
    for pos in (1, entry.tokens.shape[1] - 1):
        res = mi_lenses.direct_logit_attribution(m, entry.tokens, answer=entry.answer, wrong=entry.wrong,
                                                 position=pos, progress=False)
        AM.close(attr[:, 0, pos], res.neurons[0], f"{name}-{mode} neuron_attribution at position {pos} vs DLA", 128 * EPS)


def test_bridge_wiring_is_not_a_user_hook(matrix):
    """TransformerLens 4.3 wires permanent hooks of its own into OPT's fc-split MLP at boot: they are not the user's
    interventions (DLA would otherwise read residual points whose caching breaks OPT-350m's flattened MLP region)."""
    import mi_lenses
    from mi_lenses.models.interventions import active_hooks

    m = matrix.model("opt_350m", "raw")
    assert any(p.fwd_hooks for p in m.hook_dict.values()), "TL no longer wires hooks at boot: drop this test"
    assert active_hooks(m) == []
    kill = lambda out, hook: out * 0.0  # noqa: E731
    with m.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", kill)]):
        assert active_hooks(m) == ["blocks.1.hook_mlp_out"]
        res = mi_lenses.direct_logit_attribution(m, matrix.entry("opt_350m").tokens, answer=AM.ANSWER,
                                                 wrong=AM.WRONG)
    assert res.active_hooks == ("blocks.1.hook_mlp_out",) and "blocks.1.hook_mlp_out" in res.interventions



HOOKED_CASES = [(n, m) for n in ("gemma2", "olmo2", "granite", "mixtral", "opt_350m") for m in AM.MODES]


@pytest.mark.parametrize("name,mode", HOOKED_CASES, ids=[f"{n}-{m}" for n, m in HOOKED_CASES])
def test_dla_under_user_hooks_on_every_block_layout(matrix, name, mode):
    """Under a user's hooks DLA sums to the hooked model's logit difference on post-norm, residual-multiplier, MoE and
    post-LN models, or, where an edit at a sublayer output cannot be a part of its own (the blocks normalise or scale
    what they add), refuses with the reason and the fix, naming the hook as the user wrote it."""
    import mi_lenses
    import torch

    m, tokens = matrix.model(name, mode), matrix.entry(name).tokens
    a, w = m.to_single_token(AM.ANSWER), m.to_single_token(AM.WRONG)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    def scale(x, hook):
        return 1.7 * x

    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero_head), ("blocks.0.mlp.hook_post", scale)]):
        res = mi_lenses.direct_logit_attribution(m, tokens, answer=AM.ANSWER, wrong=AM.WRONG)  # verifies
        with torch.no_grad():
            logits = m(tokens)
    if not (getattr(m.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:  # Gemma 2: the logits before the cap
        assert float(res.actual[0]) == pytest.approx(float(logits[0, -1, a] - logits[0, -1, w]), abs=1024 * EPS)
    assert float(res.heads[0, 1, 1]) == 0.0
    # an edit of hook_mlp_out is a part of its own where DLA reads the MLP there (Mixtral, OPT-350m's post-LN blocks);
    # Gemma 2 / OLMo 2 (post-norms) and Granite (residual multiplier) add something else to the stream
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", scale)]):
        if name in ("mixtral", "opt_350m"):
            res = mi_lenses.direct_logit_attribution(m, tokens, answer=AM.ANSWER, wrong=AM.WRONG)
            assert "blocks.0.hook_mlp_out" in res.interventions
        else:
            with pytest.raises(mi_lenses.LensInputError, match="blocks.0.hook_mlp_out.*move the intervention"):
                mi_lenses.direct_logit_attribution(m, tokens, answer=AM.ANSWER, wrong=AM.WRONG, check=False)


@pytest.mark.parametrize("mode", AM.MODES)
def test_patching_refuses_single_heads_of_latent_attention(matrix, mode):
    """DeepSeek V2's multi-head latent attention: TransformerLens splits hook_z by cfg.d_head although each value head
    is wider, so patching head h would write another head's slice. Per-head patching, edges and paths are refused by
    name; block-level patching runs (and denoising every position of resid_pre at layer 0 gives the clean run)."""
    import mi_lenses

    m = matrix.model("deepseek_v2", mode)
    tokens = matrix.entry("deepseek_v2").tokens
    corrupted = tokens.flip(-1)
    kw = dict(answer=int(tokens[0, -1]), wrong=int(tokens[0, 1]))
    for call in (lambda: mi_lenses.activation_patching(m, tokens, corrupted, what="head_out", **kw),
                 lambda: mi_lenses.edge_attribution(m, tokens, corrupted, **kw),
                 lambda: mi_lenses.path_patching(m, tokens, corrupted, **kw)):
        with pytest.raises(mi_lenses.LensInputError, match="multi-head latent attention"):
            call()
    res = mi_lenses.activation_patching(m, tokens, corrupted, what="resid_pre", by="layer", layers=[0], **kw)
    assert abs(float(res.values[0]) - 1.0) < 64 * EPS


# --- issue 26: decoders and embeddings
def test_not_built_architectures_have_no_config_class():
    """The named skips (arch_matrix.NOT_BUILT) stay skips only while transformers has no config class for them."""
    import transformers

    for arch, cfg in AM.NOT_BUILT.items():
        assert not hasattr(transformers, cfg), f"transformers now has {cfg}: add {arch} to the matrix (tests/archs.py)"


def test_every_registry_decoder_is_in_the_matrix_or_named():
    """Every causal LM of TransformerLens's registry is a configuration of the matrix, an alias load_model
    boots under TransformerLens's spelling (gaps.ALIASES), another TransformerLens spelling of a matrix
    architecture (arch_matrix.ALIASED: the same adapter class), or named on the support page as not buildable
    here (arch_matrix.NOT_BUILT / REMOTE_ONLY), which stays true only while transformers has no such class."""
    import transformers
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES as REG

    from mi_lenses.models.gaps import ALIASES

    models = {spec.model for spec in SPECS.values()}
    for arch, cls in REG.items():
        if not arch.endswith("ForCausalLM"):
            continue
        if arch in AM.ALIASED:
            target = AM.ALIASED[arch]
            assert target in models and REG[target] is cls, f"{arch} is not an alias of {target}"
            assert not hasattr(transformers, arch), f"transformers now has {arch}: check it is {target}"
        elif arch in AM.REMOTE_ONLY:
            assert not hasattr(transformers, arch), f"transformers now has {arch}: add it to archs.py"
        else:
            assert arch in models or arch in AM.NOT_BUILT \
                or any(ALIASES.get(m) == arch for m in models), f"{arch} is neither in the matrix nor named"
    page = PAGE.read_text(encoding="utf-8")
    for arch in [*AM.REMOTE_ONLY, *AM.ALIASED, *AM.NOT_BUILT]:
        assert f"`{arch}`" in page, f"docs/architectures.md does not name {arch}"


def test_phimoe_boots_under_transformer_lens_spelling(matrix):
    """PhiMoE: TransformerLens registers PhiMoEForCausalLM, HF saves PhimoeForCausalLM (the same class): load_model
    boots it under TransformerLens's spelling and leaves the HF config as saved."""
    m = matrix.model("phimoe", "raw")
    assert m.original_model.config.architectures == ["PhimoeForCausalLM"]
# --- end
