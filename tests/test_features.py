"""Dictionaries and reading features (issue 28, part 1): every activation and hook on tiny random models, both
identities (``decode(encode(x)) + error == x``; features + bias + skip + error == the component's DLA from
``mi_lenses.direct_logit_attribution``), every file format, the refusals, a user's hooks, a post-norm Gemma 2 with
JumpReLU, and the owning libraries as oracles: SAELens in the TransformerLens 3.9 environment (a subprocess of
``.venv-tl3``: ``tests/oracle_saelens.py``) and EleutherAI sparsify in this one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mi_lenses
from conftest import PROMPT, PROMPTS
from mi_lenses import Dictionary, DictionarySet
from mi_lenses.errors import LensInputError
from mi_lenses.features.processing import RAW

ROOT = Path(__file__).resolve().parents[1]
TL3_PYTHON = ROOT / ".venv-tl3" / "bin" / "python"
N = 48  # features


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _dictionary(m, hook, hook_out=None, seed=0, skip=False, **kw) -> Dictionary:
    width = m.cfg.n_heads * m.cfg.d_head if hook.endswith("hook_z") else m.cfg.d_model
    d_out = width if hook_out is None else m.cfg.d_model
    return Dictionary(_rand(width, N, scale=0.4, seed=seed), _rand(N, scale=0.1, seed=seed + 1),
                      _rand(N, d_out, scale=0.2, seed=seed + 2), _rand(d_out, scale=0.05, seed=seed + 3), hook=hook,
                      hook_out=hook_out, W_skip=_rand(d_out, width, scale=0.1, seed=seed + 4) if skip else None, **kw)


ACTIVATIONS = {"relu": {}, "jumprelu": {"threshold": torch.full((N,), 0.15)}, "topk": {"k": 5},
               "batchtopk": {"k": 4.0}}
HOOKS = [("blocks.1.hook_mlp_out", None, False), ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True),
         ("blocks.1.hook_resid_mid", "blocks.1.mlp.hook_out", False), ("blocks.1.hook_attn_out", None, False),
         ("blocks.1.attn.hook_z", None, False), ("blocks.1.hook_resid_post", None, False)]


def _component(dla, hook_out: str, layer: int = 1):
    """The DLA value of what a dictionary writes at ``hook_out`` (block ``layer``)."""
    if "mlp" in hook_out:
        return dla.mlps[:, layer]
    if hook_out.endswith("hook_z"):
        return dla.heads[:, layer].sum(-1)
    if hook_out.endswith("hook_attn_out"):
        return dla.attn_out[:, layer]
    upto = layer + 1 if hook_out.endswith("resid_post") else layer
    mid = dla.attn_out[:, layer] if hook_out.endswith("resid_mid") else 0
    return dla.embed.sum(-1) + dla.attn_out[:, :upto].sum(-1) + dla.mlps[:, :upto].sum(-1) + mid


# ------------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hook,hook_out,skip", HOOKS, ids=[h[0].split(".", 2)[2] + ("->" + h[1] if h[1] else "")
                                                           for h in HOOKS])
def test_features_and_dla_identities(tiny_pair, activation, hook, hook_out, skip):
    m = tiny_pair.model
    norm = "layer_norm" if activation == "relu" and hook_out is None else "none"
    d = _dictionary(m, hook, hook_out, skip=skip, activation=activation, normalize_activations=norm,
                    **ACTIVATIONS[activation])
    f = mi_lenses.features(m, PROMPTS, d)
    B, S = m.to_tokens(PROMPTS).shape
    assert f.activations.shape == (B, S, N) and f.error.shape == (B, S, d.d_in if hook_out is None else d.d_out)
    assert f.verify() is f and (f.l0 > 0).any()
    pad = torch.tensor([[p >= o + len(t) for p in range(S)] for o, t in zip(f.offsets, f.str_tokens)])
    assert not f.activations[pad].any() and not f.error[pad].any()  # padding is never encoded
    if activation == "topk":
        assert int(f.l0.max()) <= 5
    r = mi_lenses.feature_dla(m, PROMPTS, d, answer=" city", wrong="Paris")
    dla = mi_lenses.direct_logit_attribution(m, PROMPTS, answer=" city", wrong="Paris")
    assert r.values.shape == (B, N) and r.verify() is r
    assert torch.allclose(r.total, _component(dla, d.writes), atol=1e-5), (r.total, _component(dla, d.writes))
    assert torch.equal(r.values != 0, f.activations[torch.arange(B), [o + len(t) - 1 for o, t in
                                                                      zip(f.offsets, f.str_tokens)]] != 0)
    assert (r.skip is not None) == skip


def test_the_feature_logit_lens_reads_the_decoder_direction(llama_raw):
    m = llama_raw.model
    d = _dictionary(m, "blocks.1.hook_resid_post")
    r = mi_lenses.feature_dla(m, PROMPT, d, answer=" city", top_k=3)
    (label, _), = r.top(1)
    i = int(label[1:])
    view = mi_lenses.ModelView(m)
    logits = d.W_dec[i] @ view.decoder.W  # RMSNorm: the gain is in W
    assert r.logit_lens[i]["promoted"][0][0] == view.id_to_str(int(logits.argmax()))
    assert r.logit_lens[i]["suppressed"][0][0] == view.id_to_str(int(logits.argmin()))
    assert "promotes" in str(r.table()) or r.to_dict()["top_features"][0]["promoted"]


def test_a_users_hook_stays_and_is_read(llama_raw):
    m = llama_raw.model
    d = _dictionary(m, "blocks.1.hook_mlp_out")

    def zero(act, hook):
        return torch.zeros_like(act)

    m.add_hook("blocks.1.hook_mlp_out", zero)
    try:
        f = mi_lenses.features(m, PROMPT, d)
        r = mi_lenses.feature_dla(m, PROMPT, d, answer=" city")
        assert f.active_hooks == ("blocks.1.hook_mlp_out",) and r.active_hooks == f.active_hooks
        assert mi_lenses.models.interventions.active_hooks(m) == ["blocks.1.hook_mlp_out"]  # theirs stays
        expected = d.encode(torch.zeros(1, m.cfg.d_model))[0]  # the hooked model's activation: zero
        assert torch.allclose(f.activations[0], expected.expand_as(f.activations[0]))
        assert abs(float(r.component[0])) < 1e-6
    finally:
        m.reset_hooks()
    assert mi_lenses.models.interventions.active_hooks(m) == []  # and ours never stayed


def test_gemma2_post_norms_with_jumprelu(builder, tmp_path_factory):
    import archs

    folder = tmp_path_factory.mktemp("tiny_gemma2")
    archs.build("gemma2", builder.tok).save_pretrained(folder)
    builder.tok.save_pretrained(folder)
    m = mi_lenses.load_model(folder)
    dla = mi_lenses.direct_logit_attribution(m, PROMPT, answer=" city")
    for hook, hook_out in (("blocks.1.hook_mlp_out", None), ("blocks.1.mlp.hook_out", None),
                           ("blocks.1.ln2.hook_out", "blocks.1.mlp.hook_out"),
                           ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")):
        d = _dictionary(m, hook, hook_out, activation="jumprelu", threshold=torch.full((N,), 0.1))
        mi_lenses.features(m, PROMPT, d)
        r = mi_lenses.feature_dla(m, PROMPT, d, answer=" city")
        assert abs(float(r.total[0] - dla.mlps[0, 1])) < 1e-5, hook  # through the frozen post-norm


# ------------------------------------------------------------------------------------------------ formats
def _same(a: Dictionary, b: Dictionary) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x.flatten(), y.flatten())), name
    for name in ("hook", "hook_out", "activation", "k", "apply_b_dec_to_input", "normalize_activations"):
        assert getattr(a, name) == getattr(b, name), name


def test_our_format_and_saelens_format_round_trip(llama_raw, tmp_path):
    m = llama_raw.model
    cases = {"jumprelu": _dictionary(m, "blocks.0.hook_resid_post", activation="jumprelu",
                                     threshold=torch.rand(N), apply_b_dec_to_input=True),
             "topk": _dictionary(m, "blocks.1.hook_mlp_out", activation="topk", k=3,
                                 normalize_activations="constant_norm_rescale"),
             "skip_transcoder": _dictionary(m, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", skip=True)}
    for name, d in cases.items():
        for fmt in ("mi_lenses", "saelens"):
            path = mi_lenses.save_dictionary(d, tmp_path / fmt / name, format=fmt, model=m)
            back = mi_lenses.load_dictionary(path)
            _same(d, back)
            assert back.meta["format"] == fmt
    cfg = json.loads((tmp_path / "saelens" / "topk" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["metadata"]["hook_name"] == "blocks.1.hook_mlp_out"
    s = DictionarySet([_dictionary(m, f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.hook_mlp_out", seed=l)
                       for l in range(m.cfg.n_layers)], {(0, 2): _rand(N, m.cfg.d_model, seed=9)})
    back = mi_lenses.load_dictionary(mi_lenses.save_dictionary(s, tmp_path / "set"))
    assert isinstance(back, DictionarySet) and torch.equal(back.cross[(0, 2)], s.cross[(0, 2)])
    for a, b in zip(s.dictionaries, back.dictionaries):
        _same(a, b)
    with pytest.raises(LensInputError, match="one dictionary per folder"):
        mi_lenses.save_dictionary(s, tmp_path / "x", format="saelens")


def test_circuit_tracer_transcoder_sets_and_cross_layer_transcoders(llama_raw, tmp_path):
    """Files written in circuit-tracer's layouts (``TranscoderSet.to_safetensors`` + config.yaml,
    ``CrossLayerTranscoder.to_safetensors``, GemmaScope 2's keys) load, and read exactly as circuit-tracer computes."""
    m = llama_raw.model
    L, D = m.cfg.n_layers, m.cfg.d_model
    plt, clt, gs2 = tmp_path / "plt", tmp_path / "clt", tmp_path / "gs2"
    for p in (plt, clt, gs2):
        p.mkdir()
    (plt / "config.yaml").write_text("model_kind: transcoder_set\nmodel_name: tiny\nfeature_input_hook: "
                                     "hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")
    (clt / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: ln2.hook_normalized\n"
                                     "feature_output_hook: mlp.hook_out\n")
    W_dec = {}
    for l in range(L):
        save_file({"W_enc": _rand(N, D, scale=0.4, seed=l), "W_dec": _rand(N, D, scale=0.2, seed=l + 10),
                   "b_enc": _rand(N, scale=0.1, seed=l + 20), "b_dec": _rand(D, scale=0.05, seed=l + 30),
                   "W_skip": _rand(D, D, scale=0.1, seed=l + 40),
                   "activation_function.threshold": torch.full((N,), 0.1)}, str(plt / f"layer_{l}.safetensors"))
        save_file({"w_enc": _rand(D, N, scale=0.4, seed=l), "w_dec": _rand(N, D, scale=0.2, seed=l + 10),
                   "b_enc": _rand(N, scale=0.1, seed=l + 20), "b_dec": _rand(D, scale=0.05, seed=l + 30),
                   "threshold": torch.full((N,), 0.1)}, str(gs2 / f"layer_{l}.safetensors"))
        save_file({f"W_enc_{l}": _rand(N, D, scale=0.4, seed=l + 50), f"b_enc_{l}": _rand(N, scale=0.1, seed=l),
                   f"b_dec_{l}": _rand(D, scale=0.05, seed=l + 60)}, str(clt / f"W_enc_{l}.safetensors"))
        W_dec[l] = _rand(N, L - l, D, scale=0.2, seed=l + 70)
        save_file({f"W_dec_{l}": W_dec[l]}, str(clt / f"W_dec_{l}.safetensors"))
    sets = {name: mi_lenses.load_dictionary(p) for name, p in (("plt", plt), ("clt", clt), ("gs2", gs2))}
    assert sets["clt"].is_cross_layer and len(sets["clt"].cross) == L * (L - 1) // 2
    assert sets["plt"].dictionaries[1].hook == "blocks.1.hook_resid_mid"
    dla = mi_lenses.direct_logit_attribution(m, PROMPTS, answer=" city")
    for name, s in sets.items():
        f = mi_lenses.features(m, PROMPTS, s)
        assert f.activations.shape[-1] == L * N and f.error.shape[0] == L
        r = mi_lenses.feature_dla(m, PROMPTS, s, answer=" city")
        assert torch.allclose(r.total, dla.mlps.sum(-1), atol=1e-5), name  # every MLP's DLA, summed
    # circuit-tracer's CLT reconstruction: recon[j] = sum_{i<=j} acts_i @ W_dec_i[:, j - i] + b_dec_j
    _, cache = m.run_with_cache(m.to_tokens(PROMPT))
    x = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(L)])
    acts = [torch.nn.functional.relu(x[l] @ _rand(N, D, scale=0.4, seed=l + 50).T + _rand(N, scale=0.1, seed=l))
            for l in range(L)]
    f = mi_lenses.features(m, PROMPT, sets["clt"])
    for j in range(L):
        recon = sum(acts[i] @ W_dec[i][:, j - i] for i in range(j + 1)) + _rand(D, scale=0.05, seed=j + 60)
        assert torch.allclose(cache[f"blocks.{j}.mlp.hook_out"][0] - f.error[j, 0], recon, atol=1e-5)


def test_refusals_name_both_sides(llama_raw, builder, tmp_path):
    m = llama_raw.model
    d = _dictionary(m, "blocks.1.hook_mlp_out")
    other = builder.get("gpt2", "compat").model
    with pytest.raises(LensInputError, match=r"width 48.*width 32"):  # gpt2's d_model is 32
        mi_lenses.features(other, PROMPT, d)
    with pytest.raises(LensInputError, match="is in block 7, but .* has 3 blocks"):
        mi_lenses.features(m, PROMPT, _dictionary(m, "blocks.7.hook_mlp_out"))
    path = mi_lenses.save_dictionary(d, tmp_path / "fp", model=m)
    twin = builder.get("llama_tied", "raw").model  # the same widths, another unembedding
    with pytest.raises(LensInputError, match="fitted for another model"):
        mi_lenses.features(twin, PROMPT, path)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "sae.pt").write_bytes(b"not read")
    with pytest.raises(LensInputError, match="never pickles"):
        mi_lenses.load_dictionary(tmp_path / "pickled")
    with pytest.raises(LensInputError, match="feature DLA reads"):
        mi_lenses.feature_dla(m, PROMPT, _dictionary(m, "blocks.1.mlp.hook_pre", hook_out="blocks.1.mlp.hook_post"),
                              answer=" city")


def test_a_dictionary_read_under_other_weight_processing_is_refused(builder, tmp_path):
    """Compatibility mode folds each norm's gain into the MLP (``mlp.hook_in`` loses it) and, on LayerNorm models,
    centres the residual stream: a dictionary read the other way would be silently wrong, so it is refused by name;
    hooks that processing leaves alone (the MLP's output on an RMSNorm model, ``hook_z``) are not."""
    raw, compat = builder.get("llama_gqa", "raw").model, builder.get("llama_gqa", "compat").model
    _, c_raw = raw.run_with_cache(raw.to_tokens(PROMPT))
    _, c_compat = compat.run_with_cache(compat.to_tokens(PROMPT))
    assert not torch.allclose(c_raw["blocks.1.mlp.hook_in"], c_compat["blocks.1.mlp.hook_in"], atol=1e-3)
    tc = _dictionary(raw, "blocks.1.mlp.hook_in", hook_out="blocks.1.mlp.hook_out")
    raw_path = mi_lenses.save_dictionary(tc, tmp_path / "raw", model=raw)
    assert mi_lenses.load_dictionary(raw_path).meta["processing"] == RAW
    mi_lenses.features(raw, PROMPT, raw_path).verify()
    with pytest.raises(LensInputError, match=r"mlp.hook_in with the norm's gain applied.*compatibility_mode=False"):
        mi_lenses.features(compat, PROMPT, raw_path)
    compat_path = mi_lenses.save_dictionary(tc, tmp_path / "compat", model=compat)
    with pytest.raises(LensInputError, match=r"without the norm's gain.*compatibility_mode=True"):
        mi_lenses.feature_dla(raw, PROMPT, compat_path, answer=" city")
    # sparsify reads the Hugging Face modules: its transcoders are raw, refused in compatibility mode
    d = mi_lenses.Dictionary(tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, hook="blocks.1.mlp.hook_in",
                             hook_out="blocks.1.mlp.hook_out", activation="topk", k=5,
                             meta={"processing": RAW})
    with pytest.raises(LensInputError, match="silently wrong"):
        mi_lenses.features(compat, PROMPT, d)
    # SAELens says how its model was loaded (from_pretrained's defaults: folded), and we write it back
    sl = mi_lenses.save_dictionary(_dictionary(raw, "blocks.1.mlp.hook_in", hook_out="blocks.1.mlp.hook_out"),
                                   tmp_path / "sl", format="saelens", model=compat)
    cfg = json.loads((sl / "cfg.json").read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"fold_ln": True, "center_writing_weights": False,
                                                               "fold_value_biases": True}
    assert mi_lenses.load_dictionary(sl).meta["processing"]["norm_folded"] is True
    mi_lenses.features(compat, PROMPT, sl).verify()
    # an MLP's output on an RMSNorm model and hook_z are the same in both modes: not refused
    out = mi_lenses.save_dictionary(_dictionary(raw, "blocks.1.hook_mlp_out"), tmp_path / "out", model=raw)
    mi_lenses.features(compat, PROMPT, out).verify()
    # a LayerNorm model in compatibility mode has a mean-free residual stream
    g_raw, g_compat = builder.get("gpt2", "raw").model, builder.get("gpt2", "compat").model
    res = mi_lenses.save_dictionary(_dictionary(g_compat, "blocks.1.hook_resid_post"), tmp_path / "res",
                                    model=g_compat)
    mi_lenses.features(g_compat, PROMPT, res).verify()
    with pytest.raises(LensInputError, match=r"resid_post mean-free.*compatibility_mode=True"):
        mi_lenses.features(g_raw, PROMPT, res)
    z = mi_lenses.save_dictionary(_dictionary(g_compat, "blocks.1.attn.hook_z"), tmp_path / "z", model=g_compat)
    assert mi_lenses.load_dictionary(z).meta["processing"]["value_bias_folded"] is True
    mi_lenses.features(g_compat, PROMPT, z).verify()
    with pytest.raises(LensInputError, match=r"hook_z without the value bias"):  # compat moved b_V into b_O
        mi_lenses.features(g_raw, PROMPT, z)
    z = mi_lenses.save_dictionary(_dictionary(raw, "blocks.1.attn.hook_z"), tmp_path / "z_llama", model=raw)
    mi_lenses.features(compat, PROMPT, z).verify()  # no value biases: hook_z is the same in both modes


# ------------------------------------------------------------------------------------------------ oracles
def test_sparsify_oracle(llama_raw, tmp_path):
    """EleutherAI sparsify's own ``SparseCoder`` (encode: top-k of ReLU, decode, skip) against ours on its files:
    an SAE on a block's output and a skip transcoder on an MLP, also read off the model."""
    if importlib.util.find_spec("sparsify") is None:
        pytest.skip("eai-sparsify is not installed (pip install eai-sparsify==1.3.3; the test extra has it)")
    from sparsify import SparseCoder, SparseCoderConfig

    m = llama_raw.model
    D = m.cfg.d_model
    _, cache = m.run_with_cache(m.to_tokens(PROMPTS))
    for hookpoint, transcode in (("layers.1", False), ("layers.1.mlp", True)):
        sc = SparseCoder(D, SparseCoderConfig(num_latents=N, k=6, transcode=transcode, skip_connection=transcode))
        with torch.no_grad():
            for i, p in enumerate(sc.parameters()):
                p.copy_(_rand(*p.shape, scale=0.3, seed=i))
        sc.save_to_disk(tmp_path / hookpoint)
        d = mi_lenses.load_dictionary(tmp_path / hookpoint)
        assert d.hook == ("blocks.1.mlp.hook_in" if transcode else "blocks.1.hook_resid_post")
        assert d.meta["processing"] == RAW  # the Hugging Face modules
        x = cache[d.hook].flatten(0, 1)
        with torch.no_grad():
            top_acts, top_idx, _ = sc.encode(x)
            theirs = torch.zeros(x.shape[0], N).scatter_(-1, top_idx, top_acts)
            out = sc.decode(top_acts, top_idx) + (x @ sc.W_skip.mT if sc.W_skip is not None else 0)
        ours = d.encode(x)
        assert torch.allclose(ours, theirs, atol=1e-6) and torch.equal(ours != 0, theirs != 0)
        assert torch.allclose(d.decode(ours, x), out, atol=1e-5)
        f = mi_lenses.features(m, PROMPT, tmp_path / hookpoint)  # read off the model: one unpadded prompt
        x1 = m.run_with_cache(m.to_tokens(PROMPT))[1][d.hook][0]
        with torch.no_grad():
            a1, i1, _ = sc.encode(x1)
        assert torch.allclose(f.activations[0], torch.zeros(x1.shape[0], N).scatter_(-1, i1, a1), atol=1e-6)


@pytest.mark.slow
def test_saelens_oracle(tmp_path):
    """SAELens (TransformerLens 3.9 environment) loads our SAELens files with ``SAE.load_from_disk`` and gives the
    same feature activations (``HookedSAETransformer``) and reconstructions; we load its ``save_model`` files and
    encode/decode as it does (tests/oracle_saelens.py)."""
    if not TL3_PYTHON.exists():
        pytest.skip(".venv-tl3 is missing: bash scripts/setup.sh --tl3 creates it with sae-lens")
    has = subprocess.run([str(TL3_PYTHON), "-c", "import sae_lens"], capture_output=True, check=False)
    if has.returncode:
        pytest.skip(".venv-tl3 lacks sae-lens: bash scripts/setup.sh --tl3 installs it")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(TL3_PYTHON), str(ROOT / "tests" / "oracle_saelens.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line, done.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 17
    for case, r in results.items():
        assert r["activations"] <= 1e-6 and r["reconstruction"] <= 1e-5 and r["active"] > 0, (case, r)

