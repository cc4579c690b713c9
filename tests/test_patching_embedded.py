"""Circuit analysis on the embedded SmolLM2-135M (slow): the issue's acceptance call against TransformerLens's
``patching`` (on a subset of layers: its loop is one forward pass per cell) and the standard head ablation under
which DLA and the report used to raise. Tutorial 07 runs in ``tests/test_tutorials.py``, as every tutorial."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from conftest import hook_counts

import mi_lenses
from tolerance import EPS

pytestmark = pytest.mark.slow

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When John and Mary went to the store, Mary gave a drink to"


def _metric(m):
    a, w = m.to_single_token(" Mary"), m.to_single_token(" John")
    with torch.no_grad():
        cl, cc = m.run_with_cache(m.to_tokens(CLEAN))
        xl = m(m.to_tokens(CORRUPTED))
    c, x = float(cl[0, -1, a] - cl[0, -1, w]), float(xl[0, -1, a] - xl[0, -1, w])
    return (lambda lg: ((lg[:, -1, a] - lg[:, -1, w]).mean() - x) / (c - x)), cc


def test_acceptance_call_equals_transformer_lens(smol):
    import pandas as pd
    from transformer_lens import patching

    res = mi_lenses.activation_patching(smol, CLEAN, CORRUPTED, answer=" Mary", wrong=" John", what="resid_pre")
    L, S = smol.cfg.n_layers, smol.to_tokens(CLEAN).shape[1]
    assert res.values.shape == (L, S) and res.engine == "replay"
    metric, clean_cache = _metric(smol)
    layers = [9, L - 1]  # TransformerLens's loop on a subset: one forward pass per cell
    cells = pd.DataFrame([(l, p) for l in layers for p in range(S)], columns=["layer", "pos"])
    with contextlib.redirect_stderr(io.StringIO()):
        ref = patching.generic_activation_patch(smol, smol.to_tokens(CORRUPTED), clean_cache, metric,
                                                patch_setter=patching.layer_pos_patch_setter,
                                                activation_name="resid_pre", index_df=cells).view(len(layers), S)
    assert torch.allclose(res.values[layers], ref.cpu(), atol=1024 * EPS)
    att = mi_lenses.activation_patching(smol, CLEAN, CORRUPTED, answer=" Mary", wrong=" John", what="resid_pre",
                                        method="attribution")
    assert att.values.shape == (L, S)
    heads = mi_lenses.activation_patching(smol, CLEAN, CORRUPTED, answer=" Mary", wrong=" John", what="head_out",
                                          layers=[23])
    assert heads.top(1)[0][0] == "L23H3"  # the head the README and tutorial 05 name


def test_head_ablation_no_longer_breaks_dla_and_the_report(smol, tmp_path):
    """The issue's case: zero head 3 of blocks.23.attn.hook_z inside ``with model.hooks(...)``."""

    def ablate(z, hook=None):
        z[:, :, 3] = 0.0
        return z

    before = hook_counts(smol)
    with smol.hooks(fwd_hooks=[("blocks.23.attn.hook_z", ablate)]):
        inside = hook_counts(smol)
        with torch.no_grad():
            hooked = smol(smol.to_tokens(CLEAN))
        dla = mi_lenses.direct_logit_attribution(smol, CLEAN, answer=" Mary", wrong=" John")
        rep = mi_lenses.report(smol, CLEAN, answer=" Mary", wrong=" John", sections=["logit_lens", "dla", "attention"],
                               progress=False)
        assert hook_counts(smol) == inside
    assert hook_counts(smol) == before
    a, w = smol.to_single_token(" Mary"), smol.to_single_token(" John")
    assert float(dla.actual[0]) == pytest.approx(float(hooked[0, -1, a] - hooked[0, -1, w]), abs=8192 * EPS)
    assert float(dla.heads[0, 23, 3]) == 0.0 and "L23H3" in dla.sources_unavailable
    assert rep.dla.active_hooks == ("blocks.23.attn.hook_z",) and "blocks.23.attn.hook_z" in rep.to_html()

    def zero(out, hook=None):
        return torch.zeros_like(out)

    with smol.hooks(fwd_hooks=[("blocks.23.hook_attn_out", zero)]):
        dla = mi_lenses.direct_logit_attribution(smol, CLEAN, answer=" Mary", wrong=" John")
    assert "blocks.23.hook_attn_out" in dla.interventions
