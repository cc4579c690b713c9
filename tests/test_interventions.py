"""Every analysis on the model as the user has hooked it, against brute force under the same hooks: the lenses decode
the hooked residual stream (checked with the model's own ``ln_final`` and ``unembed``), DLA's parts sum to the hooked
model's logit difference with each hook's edit a part of its own (checked against TransformerLens's own stacking of
the hooked cache), attention shows the hooked patterns, Patchscopes verify, patching equals TransformerLens's
``patching`` run under the same hooks, the report runs; results name the hooks; the user's hooks stay, in order.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from conftest import PROMPT, hook_counts

import mi_lenses
from mi_lenses.errors import LensInputError
from tolerance import EPS, TIGHT

ANSWER, WRONG = "Paris", " city"
CLEAN, CORRUPTED = "The capital of France is", "The capital of Rome is"


def zero_head(head: int):
    def hook(z, hook=None):
        z[:, :, head] = 0.0
        return z

    return hook


def zero(t, hook=None):
    return torch.zeros_like(t)


def _tl_pair(m):
    """The clean and corrupted tokens, the clean cache and TransformerLens's metric, under the hooks active now."""
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    a, w = m.to_single_token(ANSWER), m.to_single_token(WRONG)
    with torch.no_grad():
        cl, cc = m.run_with_cache(ct)
        xl = m(xt)
    c, x = float(cl[0, -1, a] - cl[0, -1, w]), float(xl[0, -1, a] - xl[0, -1, w])
    return xt, cc, c, lambda lg: ((lg[:, -1, a] - lg[:, -1, w]).mean() - x) / (c - x)


def _ld(m, logits):
    a, w = m.to_single_token(ANSWER), m.to_single_token(WRONG)
    return float(logits.detach()[0, -1, a] - logits.detach()[0, -1, w])


def test_dla_under_a_head_ablation(tiny):
    """The standard ablation (one head of hook_z zeroed): no VerificationError; the head's value is 0 and its source
    positions are unavailable (with the reason); every value is the hooked model's."""
    m = tiny.model
    tokens = m.to_tokens(PROMPT)
    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero_head(1))]):
        before = hook_counts(m)
        with torch.no_grad():
            hooked = m(tokens)
        res = mi_lenses.direct_logit_attribution(m, PROMPT, answer=ANSWER, wrong=WRONG)
        assert hook_counts(m) == before
        with torch.no_grad():
            assert torch.equal(m(tokens), hooked)  # the user's hook is still there, and still first
        _, cache = m.run_with_cache(tokens)
    assert res.active_hooks == ("blocks.1.attn.hook_z",)
    assert float(res.actual[0]) == pytest.approx(_ld(m, hooked), abs=1024 * EPS)
    assert float(res.total[0]) == pytest.approx(_ld(m, hooked), abs=8192 * EPS)
    assert float(res.heads[0, 1, 1]) == 0.0 and "L1H1" in res.sources_unavailable
    assert "hook_z" in res.sources_unavailable["L1H1"]
    assert torch.isnan(res.sources[0, 1, 1]).all()
    with pytest.raises(LensInputError, match="unavailable"):
        res.head_sources(1, 1)
    ok = ~torch.isnan(res.sources.sum(-1))
    assert torch.allclose(res.sources.sum(-1)[ok], res.heads[ok], atol=128 * EPS)
    assert not res.interventions  # zeroing z breaks no sum: attn_out is computed from the hooked z
    if tiny.compat:  # brute force: TransformerLens stacks the hooked cache's heads itself
        a, w = m.to_single_token(ANSWER), m.to_single_token(WRONG)
        d = (m.W_U[:, a] - m.W_U[:, w]).detach()
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L*H, 1, d]
        ref = (stack[:, 0] @ d).view(m.cfg.n_layers, m.cfg.n_heads)
        assert torch.allclose(res.heads[0], ref, atol=1024 * EPS)
    page = res.to_html()
    assert "blocks.1.attn.hook_z" in page and "unavailable" in page
    assert json.loads(res.to_json())["hooks"] == ["blocks.1.attn.hook_z"]


def test_dla_under_a_zeroed_attention_output(tiny):
    m = tiny.model
    tokens = m.to_tokens(PROMPT)
    m.add_hook("blocks.0.hook_attn_out", zero)
    try:
        before = hook_counts(m)
        with torch.no_grad():
            hooked = m(tokens)
        res = mi_lenses.direct_logit_attribution(m, PROMPT, answer=ANSWER, wrong=WRONG)
        assert hook_counts(m) == before
    finally:
        m.reset_hooks()
    edit = res.interventions["blocks.0.hook_attn_out"]
    attn = res.heads[0, 0].sum() + (res.attn_bias[0, 0] if res.attn_bias is not None else 0.0)
    assert float(edit[0]) == pytest.approx(-float(attn), abs=1024 * EPS)  # the layer wrote nothing
    assert float(res.total[0]) == pytest.approx(_ld(m, hooked), abs=8192 * EPS)
    assert ("edit@blocks.0.hook_attn_out", float(edit[0])) in res.top(100)
    res.verify()


def test_dla_under_a_steering_vector(builder):
    """A vector added to the residual stream is an edit whose value is its direct effect; checked with
    TransformerLens's own final-norm application on the hooked cache (compatibility mode)."""
    m = builder.get("llama_gqa", "compat").model
    v = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def steer(x, hook=None):
        return x + v

    tokens = m.to_tokens(PROMPT)
    with m.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", steer)]):
        res = mi_lenses.direct_logit_attribution(m, PROMPT, answer=ANSWER, wrong=WRONG)
        hooked, cache = m.run_with_cache(tokens)
    a, w = m.to_single_token(ANSWER), m.to_single_token(WRONG)
    d = (m.W_U[:, a] - m.W_U[:, w]).detach()
    ref = cache.apply_ln_to_stack(v.view(1, 1, -1).expand(1, tokens.shape[1], -1), layer=-1)[0, -1] @ d
    assert float(res.interventions["blocks.1.hook_resid_pre"][0]) == pytest.approx(float(ref), abs=1024 * EPS)
    assert float(res.total[0]) == pytest.approx(_ld(m, hooked), abs=8192 * EPS)


def test_every_analysis_under_the_users_hooks(tiny_pair, tmp_path):
    from transformer_lens import patching

    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    L = m.cfg.n_layers

    def copy_pattern(p, hook=None):  # head 0 looks where head 1 looks
        p = p.clone()
        p[:, 0] = p[:, 1]
        return p

    user = [("blocks.0.attn.hook_pattern", copy_pattern), (f"blocks.{L - 1}.attn.hook_z", zero_head(0))]
    with m.hooks(fwd_hooks=user):
        before = hook_counts(m)
        with torch.no_grad():
            hooked_logits, cache = m.run_with_cache(tokens)
        # lenses: every row is the hooked residual decoded by the model's own final norm and unembedding
        lens = mi_lenses.logit_lens(m, PROMPT, return_logits=True)
        rows = [cache[r.hook_name] for r in mi_lenses.ModelView(m).residual_rows()]
        with torch.no_grad():
            brute = torch.stack([m.unembed(m.ln_final(x)) for x in rows]).log_softmax(-1)
        assert torch.allclose(lens.logits[:, 0].log_softmax(-1), brute[:, 0], atol=1024 * EPS)
        assert lens.active_hooks == ("blocks.0.attn.hook_pattern", f"blocks.{L - 1}.attn.hook_z")
        # attention: the hooked patterns
        att = mi_lenses.attention(m, PROMPT, induction_length=0)
        assert torch.allclose(att.patterns[0, 0, 0], att.patterns[0, 0, 1]) and att.active_hooks
        # Patchscopes: a state patched into its own hooked run changes nothing
        mi_lenses.patchscopes.verify(m)
        sw = mi_lenses.sweep(m, PROMPT, positions=[-1], target_layers="same", progress=False)
        assert sw.active_hooks == lens.active_hooks
        # patching equals TransformerLens's loop under the same hooks
        xt, cc, _, metric = _tl_pair(m)
        res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, what="head_out",
                                            progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            ref = patching.get_act_patch_attn_head_out_all_pos(m, xt, cc, metric).cpu()
        assert torch.allclose(res.values, ref, atol=1024 * EPS) and res.engine == "replay"
        assert float(res.values[L - 1, 0]) == pytest.approx(0.0, abs=TIGHT)  # the ablated head cannot matter
        # the report, and no hook of ours left behind
        rep = mi_lenses.report(m, PROMPT, wrong=WRONG, sections=["logit_lens", "dla", "attention"], progress=False)
        assert rep.active_hooks == lens.active_hooks and "hook_pattern" in rep.to_html(tmp_path / "r.html")
        assert hook_counts(m) == before
        with torch.no_grad():
            assert torch.allclose(m(tokens), hooked_logits)
    mi_lenses.logit_lens(m, PROMPT)
    assert mi_lenses.logit_lens(m, PROMPT).active_hooks == ()


def test_patching_under_hooks_after_the_blocks_runs_whole_passes(tiny_pair):
    """A user's hook on the final norm is outside what block replay runs: whole forward passes, the same numbers as
    TransformerLens's loop under that hook."""
    from transformer_lens import patching

    m = tiny_pair.model

    def warm(x, hook=None):
        return 1.5 * x

    with m.hooks(fwd_hooks=[("ln_final.hook_normalized", warm)]):
        xt, cc, c, metric = _tl_pair(m)
        res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            ref = patching.get_act_patch_resid_pre(m, xt, cc, metric).cpu()
        att = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, method="attribution")
    assert res.engine == "forward" and torch.allclose(res.values, ref, atol=1024 * EPS)
    assert res.clean_value == pytest.approx(c, abs=1024 * EPS) and att.clean_value == pytest.approx(c, abs=1024 * EPS)



def test_patching_under_a_hook_that_edits_one_batch_row(tiny_pair):
    """A hook written for one prompt (``z[0, :, 0] = 0``) acts on batch row 0: TransformerLens's loops run each patch
    as its own batch, so every patched run is hooked; ours must be too, though it stacks many patches per pass."""
    from transformer_lens import patching

    m = tiny_pair.model

    def row0(z, hook=None):
        z = z.clone()
        z[0, :, 0] = 0.0
        return z

    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", row0)]):
        xt, cc, c, metric = _tl_pair(m)
        res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, progress=False)
        heads = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, what="head_out",
                                              progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            ref = patching.get_act_patch_resid_pre(m, xt, cc, metric).cpu()
            ref_heads = patching.get_act_patch_attn_head_out_all_pos(m, xt, cc, metric).cpu()
    assert torch.allclose(res.values, ref, atol=1024 * EPS) and torch.allclose(heads.values, ref_heads, atol=1024 * EPS)
    assert res.passes > 1  # one cell per pass, in the base prompts' order


def test_attribution_under_a_plain_torch_hook_on_the_unembedding(tiny_pair):
    """A plain torch hook (not a hook point) scaling the logits by 1.5 scales the logit difference of both runs, so the
    normalised attribution is unchanged and the runs' values are 1.5x: the gradient must come through the hooked
    unembedding, not the decoder's copy of it."""
    m = tiny_pair.model
    kw = dict(answer=ANSWER, wrong=WRONG, method="attribution", progress=False)
    plain = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="head_out", **kw)
    handle = m.unembed.register_forward_hook(lambda module, args, out: 1.5 * out)
    try:
        hooked = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="head_out", **kw)
        edges = mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG)
    finally:
        handle.remove()
    plain_edges = mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG)
    assert hooked.corrupted_value == pytest.approx(1.5 * plain.corrupted_value, rel=1024 * EPS)
    assert torch.allclose(hooked.values, plain.values, atol=1024 * EPS)
    assert torch.allclose(edges.scores.nan_to_num(), plain_edges.scores.nan_to_num(), atol=1024 * EPS)


def test_a_bfloat16_model_under_hooks_reports_only_real_edits(builder, tmp_path):
    """Under a user's hooks a bfloat16 model's rounding (z vs pattern · v, patterns vs softmax(q · k), the cached states
    vs their sum) is not an edit: a no-op hook reports nothing, a zeroed head still marks that head."""
    builder.hf("llama_gqa").save_pretrained(tmp_path)
    builder.tok.save_pretrained(tmp_path)
    m = mi_lenses.load_model(tmp_path, dtype=torch.bfloat16)
    kw = dict(answer=ANSWER, wrong=WRONG)
    with m.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x * 1.0)]):
        res = mi_lenses.direct_logit_attribution(m, CLEAN, **kw)
        att = mi_lenses.attention(m, CLEAN, induction_length=0)
    assert res.interventions == {} and res.sources_unavailable == {} and att.qk_unavailable == {}
    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero_head(1))]):
        res = mi_lenses.direct_logit_attribution(m, CLEAN, **kw)
    assert list(res.sources_unavailable) == ["L1H1"] and float(res.heads[0, 1, 1]) == 0.0
