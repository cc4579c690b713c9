"""Patchscopes on tiny random models (5 architectures, raw bridge and compatibility mode).

Oracles: the untouched HF copy of each model with a plain torch forward hook on its decoder layer (independent of
TransformerLens), TransformerLens's own ``generate`` (cached and uncached), the unpatched run, and ``view.decode``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CORPUS, PROMPT, hook_counts
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.models.view import ModelView
from mi_lenses.patchscopes import Source, Target, fit, fit_map, paired_states, patchscope, presets, sweep
from mi_lenses.patchscopes import run as ps_run
from mi_lenses.patchscopes.spec import placeholder_positions
from tolerance import EPS, TIGHT

TARGET = "Hello world, x and the lazy dog"  # placeholder in the middle: positions after i* depend on the patch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's spinning threads make
    each tiny forward ~40x slower (0.6 s vs 0.016 s measured). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ HF oracle
def _hf_layers(hf):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        mod = hf
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
            return mod
        except AttributeError:
            continue
    raise AssertionError(type(hf))


def _hf_states(tm, tokens, layer):
    """Output of decoder layer ``layer`` of the HF model (= TL's resid_post up to TL's weight processing)."""
    got = {}

    def grab(mod, args, out):
        got["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = _hf_layers(tm.hf)[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            logits = tm.hf(tokens).logits
    finally:
        handle.remove()
    return got["h"], logits


def _hf_patched_logits(tm, tokens, layer, positions, vector):
    def patch(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, positions] = vector
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = _hf_layers(tm.hf)[layer].register_forward_hook(patch)
    try:
        with torch.no_grad():
            return tm.hf(tokens).logits
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------ identities
def test_self_patch_changes_nothing(tiny):
    """Patching a state into the same prompt, layer and position changes neither readout nor generation."""
    m = tiny.model
    view = ModelView(m)
    tokens = view.to_tokens(PROMPT)
    with torch.no_grad():
        ref = m(tokens)[0, -1].float().log_softmax(-1)
    unpatched = m.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                           use_past_kv_cache=False,
                           return_type="tokens")[0, tokens.shape[1]:]
    for layer in range(view.n_layers):
        for pos in (1, tokens.shape[1] - 2, tokens.shape[1] - 1):
            res = patchscope(m, Source(PROMPT, layers=layer, position=pos), Target(PROMPT, positions=pos),
                             max_new_tokens=4, stop_at_eos=False)
            assert torch.allclose(res.top_logprobs[0], ref[res.top_ids[0]], atol=128 * EPS), (layer, pos)
            assert int(res.top_ids[0, 0]) == int(ref.argmax())
            assert torch.equal(res.generated_ids[0], unpatched.cpu()), (layer, pos)


def _state(view, tokens, layer, pos):
    states, _ = ps_run.source_states(view, view.batch(tokens), [layer])
    return states[layer][0, pos]


def test_patch_matches_hf_oracle(tiny):
    """Source state of one prompt patched into another: equals the same patch done on the HF model by hand."""
    m = tiny.model
    view = ModelView(m)
    src_tokens, tgt_tokens = view.to_tokens(PROMPT), view.to_tokens(TARGET)
    (i_star,) = placeholder_positions(view, TARGET, "x")
    for layer in range(view.n_layers):
        res = patchscope(m, Source(PROMPT, layers=layer, position=2), Target(TARGET, placeholder="x"), top_k=8)
        h, _ = _hf_states(tiny, src_tokens, layer)
        hf = _hf_patched_logits(tiny, tgt_tokens, layer, [i_star], h[0, 2])[0, -1].log_softmax(-1)
        assert torch.allclose(res.top_logprobs[0], hf[res.top_ids[0]], atol=2048 * EPS), layer
        assert torch.equal(res.top_ids[0, :3], hf.topk(3).indices)
        if layer < view.n_layers - 1:  # (at the last layer a patch before the last position cannot reach it)
            with torch.no_grad():
                clean = m(tgt_tokens)[0, -1].log_softmax(-1)
            assert (clean[res.top_ids[0]] - res.top_logprobs[0]).abs().max() > 1e-3  # the patch did something


def test_last_layer_patch_is_the_decoded_state(tiny):
    """l* = L-1 at the last target position: the target's next-token distribution is decode(h) exactly."""
    m = tiny.model
    view = ModelView(m)
    L = view.n_layers
    for layer in range(L):
        res = patchscope(m, Source(PROMPT, layers=layer, position=3), presets.identity().replace(layer=L - 1))
        h = _state(view, view.to_tokens(PROMPT), layer, 3)
        expect = view.decode(h).log_softmax(-1)
        assert torch.allclose(res.top_logprobs[0], expect[res.top_ids[0]], atol=1024 * EPS)
        if layer == L - 1:  # the source's own prediction at position 3
            assert bool(res.prec_at_1[0]) and float(res.surprisal[0]) == pytest.approx(-float(expect.max()), abs=1024 * EPS)


def test_verify_passes_and_catches_a_broken_patch(tiny, monkeypatch):
    from mi_lenses.patchscopes import verify

    verify(tiny.model)
    monkeypatch.setattr(ps_run, "write_hooks", lambda *a, **k: [])  # a patch that never happens
    with pytest.raises(VerificationError, match="identity prompt"):
        verify(tiny.model)


def test_kv_cache_path_is_used(tiny):
    """The cached path must really run on every bridge (transformers >= 5.24 needs the argument-name shim), and a
    cached continuation must equal the full forward pass."""
    m = tiny.model
    kv = ModelView(m).kv
    assert kv is not None
    tokens = m.to_tokens(PROMPT)
    before = hook_counts(m)
    with torch.no_grad():
        full = m(tokens)
        _, cache = kv.forward(tokens[:, :3])
        tail, cache = kv.forward(tokens[:, 3:], cache)
    assert kv.length(cache) == tokens.shape[1]
    torch.testing.assert_close(tail, full[:, 3:], atol=1024 * EPS, rtol=1024 * EPS)
    assert hook_counts(m) == before


def test_a_cache_that_fails_is_reported_and_a_bug_is_not_hidden(tiny, monkeypatch):
    """The once-per-model probe: a cached pass that fails the way an unsupported model does (TypeError: an argument
    it does not take) falls back to recomputing, with a warning naming why; any other exception raises."""
    from mi_lenses.models import kv as kv_module

    m = tiny.model
    adapter = type(kv_module.kv_cache(m))

    def unsupported(self, tokens, cache=None):
        raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")

    def bug(self, tokens, cache=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(kv_module, "_PROBED", type(kv_module._PROBED)())
    monkeypatch.setattr(adapter, "forward", unsupported)
    with pytest.warns(UserWarning, match="KV cache of this model is not used .*TypeError: forward.. got an unexpected"):
        assert kv_module.kv_cache(m) is None
    monkeypatch.setattr(kv_module, "_PROBED", type(kv_module._PROBED)())
    monkeypatch.setattr(adapter, "forward", bug)
    with pytest.raises(ZeroDivisionError):
        kv_module.kv_cache(m)


@pytest.mark.parametrize("every_step", [False, True])
def test_cached_generation_equals_uncached(tiny, every_step):
    m = tiny.model
    src = Source(PROMPT, layers=list(range(ModelView(m).n_layers)), position=-2)
    for tgt in (Target(TARGET, placeholder="x"), presets.identity()):
        kw = dict(max_new_tokens=6, patch_every_step=every_step, stop_at_eos=False)
        a = patchscope(m, src, tgt, use_kv_cache=True, **kw)
        b = patchscope(m, src, tgt, use_kv_cache=False, **kw)
        assert torch.equal(a.generated_ids, b.generated_ids)
        assert torch.allclose(a.top_logprobs, b.top_logprobs, atol=128 * EPS) and torch.equal(a.top_ids, b.top_ids)
        s1 = patchscope(m, src, tgt, do_sample=True, seed=7, use_kv_cache=True, **kw)
        s2 = patchscope(m, src, tgt, do_sample=True, seed=7, use_kv_cache=False, **kw)
        assert torch.equal(s1.generated_ids, s2.generated_ids)


def test_every_step_differs_from_prompt_only(tiny_pair):
    m = tiny_pair.model
    src = Source(PROMPT, layers=0, position=-1)
    a = patchscope(m, src, presets.identity(), max_new_tokens=6, stop_at_eos=False)
    b = patchscope(m, src, presets.identity(), max_new_tokens=6, stop_at_eos=False, patch_every_step=True)
    assert torch.equal(a.generated_ids[0, :1], b.generated_ids[0, :1])  # same first token (prompt pass)
    assert not torch.equal(a.generated_ids, b.generated_ids)


def test_generation_matches_transformer_lens_generate(tiny_pair):
    """Our loop vs TL's generate (cached and uncached), unpatched and with a seq_len-gated patch hook."""
    m = tiny_pair.model
    view = ModelView(m)
    tokens = view.to_tokens(TARGET)
    (i_star,) = placeholder_positions(view, TARGET, "x")
    vec = _state(view, view.to_tokens(PROMPT), 1, 2)
    ours = patchscope(m, Source(PROMPT, layers=1, position=2), Target(TARGET, placeholder="x"), max_new_tokens=6,
                      stop_at_eos=False).generated_ids[0]

    def hook(resid, hook):
        if resid.shape[1] > i_star:  # the prompt pass (cached) or every pass (uncached)
            resid[:, i_star] = vec
        return resid

    from mi_lenses.models.kv import native_cache_works

    # TL's own cached generate skips the cache under transformers >= 5.24 (its attention bridges read the old
    # argument name): it is an oracle only where its cache works natively.
    for cache in (True, False) if native_cache_works(m) else (False,):
        with m.hooks(fwd_hooks=[("blocks.1.hook_resid_post", hook)]):
            theirs = m.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                                use_past_kv_cache=cache, return_type="tokens")[0, tokens.shape[1]:]
        assert torch.equal(ours, theirs.cpu()), cache


# ------------------------------------------------------------------------------------------------ sweeps
@pytest.mark.parametrize("target_layers", [None, "same"])
def test_sweep_equals_per_pair_loop(tiny_pair, target_layers):
    m = tiny_pair.model
    L = ModelView(m).n_layers
    prompts = ["The quick brown fox", "Hello world, hello lens!"]
    tgt = Target(TARGET, placeholder="x")
    the = int(ModelView(m).to_tokens(" lazy", prepend_bos=False)[0, 0])  # any tracked token id
    sw = sweep(m, prompts, tgt, target_layers=target_layers, positions=[0, -1, 2], chunk=5, progress=False,
               answer=the)
    nocache = sweep(m, prompts, tgt, target_layers=target_layers, positions=[0, -1, 2], use_kv_cache=False,
                    progress=False, answer=the)
    assert torch.equal(sw.top1_ids, nocache.top1_ids)
    assert torch.allclose(sw.surprisal, nocache.surprisal, atol=128 * EPS, equal_nan=True)
    assert len(sw.positions) == 6
    for a, l in enumerate(range(L)):
        for b, l2 in enumerate(range(L)):
            if target_layers == "same" and l2 != l:
                continue
            col = 0 if target_layers == "same" else b
            for p, (bi, pos) in enumerate(sw.positions):
                one = patchscope(m, Source(prompts[bi], layers=l, position=pos), tgt.replace(layer=l2), top_k=the + 1)
                assert float(sw.prec_at_1[a, col, p]) == float(one.prec_at_1[0])
                assert float(sw.surprisal[a, col, p]) == pytest.approx(float(one.surprisal[0]), abs=128 * EPS)
                assert int(sw.top1_ids[a, col, p]) == int(one.top_ids[0, 0])
                lp_the = one.top_logprobs[0][one.top_ids[0] == the]
                assert float(sw.answer_prob[a, col, p]) == pytest.approx(float(lp_the.exp()), abs=128 * EPS)
    d = sw.to_dict()
    assert len(d["prec_at_1"]) == L and len(d["prec_at_1"][0]) == L and d["source_layers"] == list(range(L))
    frame = sw.to_dataframe()
    assert len(frame) == (L if target_layers == "same" else L * L) * 6
    assert "<table" in sw.to_html() and "Precision@1" in sw.to_html()


# ------------------------------------------------------------------------------------------------ maps
def test_fit_recovers_planted_affine_map(builder):
    src = builder.get("llama_gqa", "raw").model  # d_model 48
    X, _ = paired_states(src, CORPUS, 1, max_tokens=200)
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(48, 32, generator=g), torch.randn(32, generator=g)
    f = fit(X, X @ A + b)
    assert torch.allclose(f.weight, A, atol=8192 * EPS) and torch.allclose(f.bias, b, atol=8192 * EPS)
    assert f.r2 == pytest.approx(1.0, abs=1e-9)
    noisy = fit(X, X @ A + b + 0.1 * torch.randn(X.shape[0], 32, generator=g), holdout=0.2)
    assert 0.9 < noisy.r2 < 1.0
    # the fit must fail for a relation it cannot express
    bad = fit(X, (X @ A).tanh() * 5, holdout=0.2)
    assert bad.r2 < 0.9


def test_fit_map_same_layer_is_the_identity(builder):
    """A map from a layer to itself, fitted on the model's own states, is the identity (R^2 = 1)."""
    m = builder.get("gpt2", "compat").model  # d_model 32
    f = fit_map(m, CORPUS, 1, target_layer=1, holdout=0.25)
    assert torch.allclose(f.weight, torch.eye(32), atol=8192 * EPS) and f.bias.abs().max() < 8192 * EPS
    assert f.r2 == pytest.approx(1.0, abs=TIGHT)
    with pytest.raises(LensInputError, match="cannot determine an affine map"):
        fit(torch.randn(10, 32), torch.randn(10, 32))


def test_map_save_load_roundtrip(tmp_path):
    f = fit(torch.randn(100, 5), torch.randn(100, 3))
    g = type(f).load(f.save(tmp_path / "m.safetensors"))
    assert torch.equal(f.weight, g.weight) and torch.equal(f.bias, g.bias) and f.r2 == g.r2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cross_model_patchscope(builder):
    """M = llama_gqa (d 48), M* = llama_tied (d 32): fitted map, patched run equals the HF oracle with f(h)."""
    a, t = builder.get("llama_gqa", "raw"), builder.get("llama_tied", "compat")
    f = fit_map(a.model, CORPUS, 1, target_model=t.model, target_layer=0, ridge=1e-3)
    assert f.d_in == 48 and f.d_out == 32
    tgt = Target(TARGET, placeholder="x", model=t.model, layer=0, map=f)
    res = patchscope(a.model, Source(PROMPT, layers=1, position=3), tgt, max_new_tokens=3, stop_at_eos=False)
    assert res.top_ids.shape == (1, 5) and res.generated_ids.shape == (1, 3)
    view_t = ModelView(t.model)
    h, _ = _hf_states(a, ModelView(a.model).to_tokens(PROMPT), 1)
    (i_star,) = placeholder_positions(view_t, TARGET, "x")
    # compat mode centres the residual of the target; TL's patched state is f(h) in TL's basis, HF's in HF's. With
    # RMSNorm models (no centring) both bases agree, so the oracle is exact here.
    hf = _hf_patched_logits(t, view_t.to_tokens(TARGET), 0, [i_star], f(h[0, 3]))[0, -1].log_softmax(-1)
    assert torch.allclose(res.top_logprobs[0], hf[res.top_ids[0]], atol=2048 * EPS)
    with pytest.raises(LensInputError, match="d_model 48 and the target model 32"):
        patchscope(a.model, Source(PROMPT, layers=1), tgt.replace(map=None))
    with pytest.raises(LensInputError, match="needs \\[2, 32\\]"):
        patchscope(a.model, Source(PROMPT, layers=1), tgt.replace(map=lambda x: x))
    sw = sweep(a.model, PROMPT, tgt, source_layers=[1], target_layers=[0], positions=[3], progress=False)
    assert torch.equal(sw.top1_ids[0, 0, :1], res.top_ids[:, 0])


# ------------------------------------------------------------------------------------------------ spec checks
def test_placeholder_positions(tiny_pair):
    view = ModelView(tiny_pair.model)
    T = view.to_tokens(presets.IDENTITY_PROMPT).shape[1]
    assert placeholder_positions(view, presets.IDENTITY_PROMPT, "?") == [T - 1]
    tokens = view.to_tokens(TARGET)[0]
    (i,) = placeholder_positions(view, TARGET, "x")
    assert "x" in view.id_to_str(int(tokens[i]))
    sel = presets.selfie()
    allx = placeholder_positions(view, sel.prompt, "x", occurrence="all")
    assert len(allx) == 5 and all("x" in view.id_to_str(int(view.to_tokens(sel.prompt)[0, p])) for p in allx)


def test_presets_run(tiny_pair):
    m = tiny_pair.model
    n_ctx = m.cfg.n_ctx
    ran = 0
    for name, make in presets.PRESETS.items():
        tgt = make() if name != "selfie" else make(layer=0)
        if ModelView(m).to_tokens(tgt.prompt).shape[1] + 2 > n_ctx:  # the tiny tokenizer is nearly char-level
            with pytest.raises(LensInputError, match="context window"):
                patchscope(m, Source(PROMPT, layers=0), tgt, max_new_tokens=2)
            continue
        res = patchscope(m, Source(PROMPT, layers=0), tgt, max_new_tokens=2)
        assert res.target_name.startswith(name) and res.generated_ids.shape == (1, 2)
        ran += 1
    assert ran >= 4
    assert "Visual Basic Script" in presets.MULTI_HOP_QUERY and presets.MULTI_HOP_QUERY.endswith(
        presets.MULTI_HOP_FIRST_HOP[4:])


def test_bad_input_is_a_clear_error(tiny_pair):
    m = tiny_pair.model
    L = ModelView(m).n_layers
    ok = Source(PROMPT, layers=0)
    cases = [
        (Source(PROMPT, layers=0, position=99), None, "source position 99 is out of range"),
        (ok, Target(TARGET, positions=-99), "target position -99 is out of range"),
        (ok, Target("no placeholder here", placeholder="x"), "has no placeholder 'x'"),
        (ok, Target("Hello world", placeholder="He"), "merges with the text after it"),
        (Source(PROMPT, layers=L), None, f"source layer {L} is out of range"),
        (ok, presets.identity().replace(layer=-L - 1), "target layer"),
        (Source(PROMPT, layers="1"), None, "must be an int"),
        (ok, Target(TARGET, placeholder="x", map=lambda x: 1 / 0), "the map failed"),
        (Source("", layers=0), None, "empty prompt"),
    ]
    before = hook_counts(m)
    for src, tgt, msg in cases:
        with pytest.raises(LensInputError, match=msg):
            patchscope(m, src, tgt)
    with pytest.raises(LensInputError, match="top_k"):
        patchscope(m, ok, top_k=0)
    with pytest.raises(LensInputError, match="target_layers"):
        sweep(m, PROMPT, target_layers="diag", progress=False)
    assert hook_counts(m) == before


def test_no_hook_left_behind_on_exception(tiny_pair, monkeypatch):
    m = tiny_pair.model
    before = hook_counts(m)
    real = ps_run.write_hooks

    def exploding(*args, **kwargs):
        hooks = real(*args, **kwargs)

        def boom(resid, hook=None):
            raise RuntimeError("boom")

        return [(name, boom) for name, _ in hooks]

    monkeypatch.setattr(ps_run, "write_hooks", exploding)
    for kw in (dict(), dict(max_new_tokens=2), dict(use_kv_cache=False)):
        with pytest.raises(RuntimeError, match="boom"):
            patchscope(m, Source(PROMPT, layers=0), Target(TARGET, placeholder="x"), **kw)
        assert hook_counts(m) == before
    monkeypatch.undo()
    patchscope(m, Source(PROMPT, layers=0), max_new_tokens=2)
    assert hook_counts(m) == before


def test_result_rendering(tiny_pair, tmp_path):
    m = tiny_pair.model
    res = patchscope(m, Source(PROMPT, layers=[0, 1]), presets.attribute(max_new_tokens=3))
    d = res.to_dict()
    assert {"source_token", "generated", "top_tokens"} <= set(d) and len(d["top_tokens"]) == 5
    assert d["source_token"] == res.source_str_tokens[-1]
    frame = res.to_dataframe()
    assert len(frame) == 2 * 5 and set(frame.source_layer) == {0, 1}
    page = res.to_html(tmp_path / "ps.html")
    assert (tmp_path / "ps.html").read_text() == page and "generation" in page
    assert "generation" in res.show()._repr_html_()
