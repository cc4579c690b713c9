"""Issue 28, part 3: interventions on a dictionary's features (the error kept: a no-op is bit-identical, also while
generating), feature-level activation patching (exact, attribution, integrated gradients) and integrated gradients
at the patched site for every ``what`` (completeness), on tiny random models of both worlds."""

from __future__ import annotations

import pytest
import torch

import mi_lenses
from mi_lenses import Dictionary
from mi_lenses.errors import LensInputError
from mi_lenses.models.interventions import active_hooks

CLEAN, CORRUPTED = "The capital of France is", "The capital of Rome is"
ANSWER, WRONG = "Paris", " city"
N = 40


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _sae(m, hook="blocks.1.hook_resid_post", seed=0, **kw) -> Dictionary:
    D = m.cfg.d_model
    return Dictionary(_rand(D, N, scale=0.5, seed=seed), _rand(N, scale=0.1, seed=seed + 1),
                      _rand(N, D, scale=0.3, seed=seed + 2), _rand(D, scale=0.05, seed=seed + 3), hook=hook, **kw)


def _transcoder(m, seed=5) -> Dictionary:
    D = m.cfg.d_model
    return Dictionary(_rand(D, N, scale=0.5, seed=seed), _rand(N, scale=0.1, seed=seed + 1),
                      _rand(N, D, scale=0.3, seed=seed + 2), _rand(D, scale=0.05, seed=seed + 3),
                      hook="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out",
                      W_skip=_rand(D, D, scale=0.05, seed=seed + 4))


DICTS = {"sae": lambda m: _sae(m), "layer_norm_topk_sae": lambda m: _sae(m, normalize_activations="layer_norm",
                                                                       activation="topk", k=6),
         "skip_transcoder": _transcoder}


@pytest.fixture(scope="module", params=[("gpt2", "raw"), ("llama_gqa", "compat")], ids=lambda p: f"{p[0]}-{p[1]}")
def m(request, builder):
    return builder.get(*request.param).model


# ------------------------------------------------------------------------------------------------ interventions
@pytest.mark.parametrize("kind", list(DICTS))
def test_a_no_op_intervention_is_bit_identical_and_an_edit_is_exact(m, kind):
    d = DICTS[kind](m)
    tokens = m.to_tokens(CLEAN)
    with torch.no_grad():
        plain, cache = m.run_with_cache(tokens)
        acts = d.encode(cache[d.hook])
        live = int(acts[0, -1].argmax())
        for edits in ({live: lambda a: a}, {live: lambda a: 1.0 * a}, {0: lambda a: a, live: lambda a: a + 0.0}):
            with mi_lenses.intervene(m, d, edits):
                assert torch.equal(m(tokens), plain)
        # an edit writes exactly (acts' - acts) @ W_dec * scale into the output, the error kept
        with mi_lenses.intervene(m, d, {live: lambda a: 3 * a}) as iv:
            _, edited = m.run_with_cache(tokens, names_filter=[d.writes])
        _, scale, _ = d._stats(cache[d.hook])
        scale = torch.ones_like(scale) if d.is_transcoder else scale
        want = cache[d.writes] + (2 * acts[..., live, None]) * d.decoder_rows()[live] * scale
        assert (edited[d.writes] - want).abs().max() < 1e-4 * (1 + float(want.abs().max()))
        assert "features" in repr(iv)
        with mi_lenses.intervene(m, d, {live: 0.0}, positions=[-1]):   # ablation at the last position only
            _, ab = m.run_with_cache(tokens, names_filter=[d.writes])
        diff = (ab[d.writes] - cache[d.writes]).abs().amax(-1)[0]
        assert float(diff[:-1].max()) == 0.0 and float(diff[-1]) > 0
    assert active_hooks(m) == []


def test_user_hooks_stay_and_ours_leave_on_an_exception(m):
    d = _sae(m)
    tokens = m.to_tokens(CLEAN)
    seen = []
    m.add_hook("blocks.0.hook_resid_post", lambda t, hook: seen.append(1))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with mi_lenses.intervene(m, d, {1: 10.0}):
                m(tokens)
                raise RuntimeError("boom")
        assert seen and active_hooks(m) == ["blocks.0.hook_resid_post"]
    finally:
        m.reset_hooks()
    assert active_hooks(m) == []


def test_bad_edits_are_refused(m):
    d = _sae(m)
    for bad in ({N: 1.0}, {}, {1: "x"}, {True: 1.0}):
        with pytest.raises(LensInputError):
            mi_lenses.intervene(m, d, bad)


def test_steering_changes_generation_and_a_no_op_does_not(m):
    d = _sae(m)
    tokens = m.to_tokens(CLEAN)
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False)
    with torch.no_grad():
        plain = m.generate(tokens, **kw)
        with mi_lenses.intervene(m, d, {2: lambda a: a}):
            same = m.generate(tokens, **kw)
        f = mi_lenses.features(m, CLEAN, d)
        peak = float(f.activations[..., :, 2].max())   # steering: clamp to k x its maximum over the prompt
        with mi_lenses.intervene(m, d, {2: 40.0 * max(peak, 0.5)}):
            steered = m.generate(tokens, **kw)
    assert torch.equal(plain, same)
    assert not torch.equal(plain[:, tokens.shape[1]:], steered[:, tokens.shape[1]:])
    assert active_hooks(m) == []


# ------------------------------------------------------------------------------------------------ feature patching
@pytest.mark.parametrize("kind", list(DICTS))
def test_feature_patching_exact_attribution_and_ig(m, kind):
    d = DICTS[kind](m)
    kw = dict(answer=ANSWER, wrong=WRONG, what="features", dictionary=d, progress=False)
    exact = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", **kw)
    attr = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", method="attribution", **kw)
    assert exact.values.shape == attr.values.shape == (1, len(exact.pos_labels), N) and exact.layers == [1]
    # cells whose activations agree in both runs are the base run, exactly; attribution gives them 0
    silent = exact.values == 0
    assert exact.cells_skipped > 0 and bool((attr.values[silent] == 0).all())
    # attribution is linear: any grid sums to the same total
    for by in ("layer_feature", "layer_pos", "layer"):
        other = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by=by, method="attribution", **kw)
        assert abs(float(other.values.sum() - attr.values.sum())) < 1e-4
    # attribution against exact (single features move the metric a little: near-linear)
    run = exact.values != 0
    x, y = exact.values[run], attr.values[run]
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert corr > 0.5, corr  # random tiny models: 0.55 to 0.99 (the layer-norm TopK SAE lowest)
    # integrated gradients at the features: the sum over every cell tends to patching all features at once
    whole = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer", **kw)
    ig = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", method="ig", ig_steps=32, **kw)
    assert ig.ig_steps == 32
    gap_attr = abs(float(attr.values.sum() - whole.values[0]))
    gap_ig = abs(float(ig.values.sum() - whole.values[0]))
    assert gap_ig < 2e-2 * max(1.0, abs(float(whole.values[0]))) and gap_ig <= gap_attr + 1e-6, (gap_ig, gap_attr)
    assert active_hooks(m) == []


def test_feature_patching_refusals(m):
    d = _sae(m)
    kw = dict(answer=ANSWER, wrong=WRONG, progress=False)
    with pytest.raises(LensInputError, match="dictionary"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="features", **kw)
    with pytest.raises(LensInputError, match="dictionary"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="resid_pre", dictionary=d, **kw)
    with pytest.raises(LensInputError, match="block 1"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="features", dictionary=d, layers=[0], **kw)
    with pytest.raises(LensInputError, match="eap_ig"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="features", dictionary=d, method="eap_ig", **kw)


# ------------------------------------------------------------------------------------------------ per-site IG
def test_site_ig_completeness_on_a_cut(m):
    """Every position of resid_pre at a layer is a cut: IG at that site sums to the metric difference (1)."""
    kw = dict(answer=ANSWER, wrong=WRONG, what="resid_pre", method="ig", progress=False)
    errors = []
    for steps in (4, 64):
        res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, ig_steps=steps, **kw)
        errors.append(float((res.values.sum(-1) - 1.0).abs().max()))
    assert errors[1] < 1e-2 and errors[1] <= errors[0] + 1e-6, errors
    noise = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, ig_steps=64, mode="noise", **kw)
    assert float((noise.values.sum(-1) + 1.0).abs().max()) < 1e-2


@pytest.mark.parametrize("what", ["resid_mid", "attn_out", "mlp_out", "head_out", "head_q", "head_v",
                                  "head_pattern", "neurons"])
def test_site_ig_is_complete_for_every_what(m, what):
    """Patching a layer's whole activation is the end of IG's path: IG with by='layer' tends to exact patching with
    by='layer' at every layer, and any finer grid of IG sums to it (one gradient, partitioned)."""
    kw = dict(answer=ANSWER, wrong=WRONG, what=what, progress=False)
    exact = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer", **kw)
    ig = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer", method="ig", ig_steps=64, **kw)
    fine = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, method="ig", ig_steps=64, **kw)
    assert ig.method == "ig" and bool(torch.isfinite(fine.values).all())
    assert float((ig.values - exact.values).abs().max()) < 2e-2, (ig.values, exact.values)
    assert float((fine.values.flatten(1).sum(1) - ig.values).abs().max()) < 1e-4
    assert active_hooks(m) == []


def test_feature_patching_results_have_every_view(m, capsys):
    d = _transcoder(m)
    res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, what="features",
                                        dictionary=d, by="layer_pos_feature", method="ig", ig_steps=2,
                                        progress=False)
    assert res.to_dict()["what"] == "features" and res.grid_axes == ["layer", "pos", "feature"]
    res.show()
    assert "<" in res.to_html()


# ------------------------------------------------------------------------------------------------ sets of dictionaries
def _set(m, widths=None):
    """One dictionary per block: an SAE on block 0's residual stream, skip transcoders on the later blocks (the last
    one narrower, so the feature axis is padded)."""
    L = m.cfg.n_layers
    widths = widths or [N] * (L - 1) + [N - 8]
    ds = [_sae(m, "blocks.0.hook_resid_post", seed=20)]
    for l in range(1, L):
        D = m.cfg.d_model
        s = 30 + 10 * l
        ds.append(Dictionary(_rand(D, widths[l], scale=0.5, seed=s), _rand(widths[l], scale=0.1, seed=s + 1),
                             _rand(widths[l], D, scale=0.3, seed=s + 2), _rand(D, scale=0.05, seed=s + 3),
                             hook=f"blocks.{l}.ln2.hook_normalized", hook_out=f"blocks.{l}.hook_mlp_out",
                             W_skip=_rand(D, D, scale=0.05, seed=s + 4)))
    return mi_lenses.DictionarySet(ds)


@pytest.mark.parametrize("method", ["exact", "attribution", "ig"])
def test_a_set_patches_every_layer_as_its_dictionary_alone(m, method):
    s = _set(m)
    L = m.cfg.n_layers
    kw = dict(answer=ANSWER, wrong=WRONG, what="features", by="layer_pos_feature", method=method, progress=False,
              **({"ig_steps": 4} if method == "ig" else {}))
    res = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=s, **kw)
    assert res.layers == list(range(L)) and res.grid_axes == ["layer", "pos", "feature"]
    assert res.values.shape == (L, len(res.pos_labels), N)
    run = skipped = 0
    for i, d in enumerate(s.dictionaries):
        one = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=d, **kw)
        assert one.layers == [i] and one.values.shape == (1, len(res.pos_labels), d.n_features)
        assert float(one.values.abs().max()) > 1e-3  # something to compare
        gap = float((res.values[i, :, : d.n_features] - one.values[0]).abs().max())
        assert gap < 1e-5, (i, gap)
        assert bool(res.values[i, :, d.n_features:].isnan().all())  # the narrower dictionary's padding
        run, skipped = run + one.cells_run, skipped + one.cells_skipped
    if method == "exact":
        assert (res.cells_run, res.cells_skipped) == (run, skipped) and res.cells_run > 0
    else:
        assert res.passes == (L if method == "ig" else 1)
    # coarser grids of the set: each layer's row is its dictionary's, and attribution sums any grid to one total
    for by in ("layer_feature", "layer_pos", "layer"):
        coarse = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=s, **{**kw, "by": by})
        last = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=s.dictionaries[-1], **{**kw, "by": by})
        assert coarse.values.shape[0] == L and coarse.grid_axes == ["layer", *([] if by == "layer" else [by[6:]])]
        row = coarse.values[-1, : last.values.shape[-1]] if by == "layer_feature" else coarse.values[-1]
        assert float((row - last.values[0]).abs().max()) < 1e-5
        if method == "attribution":  # linear: every layer's cells sum to the same total on any grid
            totals = coarse.values.reshape(L, -1).nansum(1) - res.values.reshape(L, -1).nansum(1)
            assert float(totals.abs().max()) < 1e-4
    assert active_hooks(m) == []


def test_a_set_takes_a_layer_selection_and_has_every_view(m, capsys):
    s = _set(m, widths=[N] * m.cfg.n_layers)
    L = m.cfg.n_layers
    kw = dict(answer=ANSWER, wrong=WRONG, what="features", dictionary=s, progress=False)
    full = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", **kw)
    picked = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", layers=[-1, 0], **kw)
    assert picked.layers == [0, L - 1]
    assert float((picked.values - full.values[[0, L - 1]]).abs().max()) < 1e-5
    one = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, by="layer_pos_feature", layers=1, **kw)
    assert one.layers == [1] and float((one.values[0] - full.values[1]).abs().max()) < 1e-5
    # labels name the layer and the feature; every view works
    (label, value), = full.top(1)
    layer, pos, feature = torch.unravel_index(full.values.abs().argmax(), full.values.shape)
    assert value == float(full.values[layer, pos, feature])
    assert label.startswith(f"L{full.layers[int(layer)]}F{int(feature)} ") and label.endswith(f"@{int(pos)}")
    frame = full.to_dataframe()
    assert frame.columns.tolist() == ["layer", "pos", "feature", "label", "value"] and len(frame) == full.values.numel()
    assert sorted(set(frame["layer"])) == list(range(L))
    print(full)
    full.show()
    assert "feature" in capsys.readouterr().out
    assert "largest" in str(full.table()) or full.table() is not None
    assert f"L{full.layers[int(layer)]}F{int(feature)}" in full.to_html()
    assert full.to_dict()["layers"] == list(range(L))


def test_set_refusals(m):
    kw = dict(answer=ANSWER, wrong=WRONG, what="features", progress=False)
    L = m.cfg.n_layers
    s = _set(m)
    if L >= 3:  # a set without block 1: layers=[1] names what it has
        gappy = mi_lenses.DictionarySet([s.dictionaries[0], s.dictionaries[2]])
        with pytest.raises(LensInputError, match=r"no dictionary in block 1: layers= can be any of \[0, 2\]"):
            mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=gappy, layers=[1], **kw)
        assert mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=gappy, **kw).layers == [0, 2]
    with pytest.raises(LensInputError, match="eap_ig"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=s, method="eap_ig", **kw)
    with pytest.raises(LensInputError, match="only with what='features'"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, what="mlp_out", dictionary=s, answer=ANSWER, wrong=WRONG)
    # two SAEs on different hooks of one block: which one is the grid's layer 1 is ambiguous
    twins = mi_lenses.DictionarySet([_sae(m, "blocks.0.hook_resid_post"), _sae(m, "blocks.1.hook_resid_pre", seed=1),
                                     _sae(m, "blocks.1.hook_resid_post", seed=2)])
    with pytest.raises(LensInputError, match=r"2 dictionaries writing into block 1 .*for i in \[1, 2\]"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=twins, **kw)
    # a cross-layer transcoder: refused, naming what to use instead
    clt = mi_lenses.DictionarySet(_set(m, widths=[N] * L).dictionaries, {(0, L - 1): _rand(N, m.cfg.d_model, seed=3)})
    with pytest.raises(LensInputError, match=r"cross-layer transcoder.*feature_dla.*clt\.dictionaries\[i\]"):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, dictionary=clt, **kw)
    with pytest.raises(LensInputError, match="cross-layer transcoder"):
        mi_lenses.intervene(m, clt, {0: 1.0})


def test_intervene_on_a_set_is_each_member_at_its_own_hook(m):
    s = _set(m)
    L = m.cfg.n_layers
    first, last = s.dictionaries[0], s.dictionaries[-1]
    at = s.offsets[-1]
    tokens = m.to_tokens(CLEAN)
    with torch.no_grad():
        plain = m(tokens)
        with mi_lenses.intervene(m, s, {3: lambda a: a, at + 2: lambda a: 1.0 * a}):  # a no-op: bit-identical
            assert torch.equal(m(tokens), plain)
        with mi_lenses.intervene(m, s, {3: 5.0, f"L{L - 1}F2": lambda a: 3 * a}) as iv:   # an index and a label
            both = m(tokens)
        with mi_lenses.intervene(m, first, {3: 5.0}), mi_lenses.intervene(m, last, {2: lambda a: 3 * a}):
            nested = m(tokens)
        with mi_lenses.intervene(m, s, {at + 2: lambda a: 3 * a}):
            only_last = m(tokens)
        with mi_lenses.intervene(m, last, {2: lambda a: 3 * a}):
            alone = m(tokens)
    assert [p.dictionary for p in iv.parts] == [first, last] and f"L{L - 1}F2" in repr(iv)
    assert torch.equal(both, nested) and torch.equal(only_last, alone)
    assert float((both - plain).abs().max()) > 1e-4 and float((both - alone).abs().max()) > 1e-4
    with pytest.raises(LensInputError, match="edited twice"):
        mi_lenses.intervene(m, s, {at + 2: 1.0, f"L{L - 1}F2": 2.0})
    with pytest.raises(LensInputError, match="nor a label"):
        mi_lenses.intervene(m, s, {s.n_features: 1.0})
    assert active_hooks(m) == []
