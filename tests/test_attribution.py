"""Direct logit attribution: identities, independent oracles (HF logits, TransformerLens 4.3), power tests, errors.

Tiny models: every architecture of conftest (LayerNorm/RMSNorm, MHA/GQA, tied/untied, biases, parallel blocks), raw
bridge and compatibility mode. The embedded SmolLM2 tests are marked slow.
"""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from conftest import PROMPT, PROMPTS, hook_counts

from mi_lenses.attribution import direct_logit_attribution, neuron_attribution, required_hooks
from mi_lenses.attribution import directions as directions_mod
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.models.view import ModelView
from tolerance import EPS, TIGHT

ANSWER, WRONG = "Paris", " city"  # single tokens of the tiny tokenizer
ROW_ANSWERS, ROW_WRONGS = ["Paris", " city", "The"], [" is", "The", " city"]


def _ids(tiny, *toks):
    return [tiny.model.to_single_token(t) for t in toks]


def _run(tiny, prompt=PROMPT, **kw):
    kw.setdefault("answer", ANSWER)
    kw.setdefault("wrong", WRONG)
    return direct_logit_attribution(tiny.model, prompt, **kw)


# ------------------------------------------------------------------------------------------------ identities
def test_identities_hold_and_match_hf_logits(tiny):
    res = _run(tiny)  # check=True: verify() runs inside
    res.verify(atol=1024 * EPS, rtol=128 * EPS)
    # independent oracle: the untouched HF model's own logit difference
    tokens = tiny.model.to_tokens(PROMPT)
    with torch.no_grad():
        hf_logits = tiny.hf(tokens).logits[0, -1]
    a, w = _ids(tiny, ANSWER, WRONG)
    assert float(res.actual[0]) == pytest.approx(float(hf_logits[a] - hf_logits[w]), abs=1024 * EPS)
    assert float(res.total[0]) == pytest.approx(float(res.actual[0]), abs=1024 * EPS)
    # explicit sums, independent of verify()
    assert torch.allclose(res.sources.sum(-1), res.heads, atol=128 * EPS)
    mlp_bias = res.mlp_bias if res.mlp_bias is not None else 0.0
    assert torch.allclose(res.neurons.sum(-1) + mlp_bias, res.mlps, atol=128 * EPS)
    assert res.sources.shape == (1, res.n_layers, res.n_heads, tokens.shape[1])
    cfg = tiny.model.cfg
    assert res.neurons.shape == (1, cfg.n_layers, cfg.d_mlp)
    assert res.embed_labels == (["embed", "pos_embed"] if tiny.arch == "gpt2" else ["embed"])


def test_batch_with_per_row_answers_equals_single_runs(tiny):
    res = _run(tiny, PROMPTS, answer=ROW_ANSWERS, wrong=ROW_WRONGS)
    assert res.n_batch == 3
    for b, prompt in enumerate(PROMPTS):
        one = _run(tiny, prompt, answer=ROW_ANSWERS[b], wrong=ROW_WRONGS[b])
        assert res.positions[b] == len(one.str_tokens[0]) - 1  # last real token of a right-padded row
        assert torch.allclose(res.values()[b], one.values()[0], atol=128 * EPS)
        assert torch.allclose(res.neurons[b], one.neurons[0], atol=128 * EPS)
        n = len(one.str_tokens[0])
        assert torch.allclose(res.sources[b, ..., :n], one.sources[0], atol=128 * EPS)
        assert float(res.sources[b, ..., n:].abs().sum()) == 0.0  # padding is never read
    mean = res.to_dict(batch=None)
    assert mean["sources"] == {} and mean["actual"] == pytest.approx(float(res.actual.mean()), abs=TIGHT)
    assert mean["total"] == pytest.approx(mean["actual"], abs=8192 * EPS)
    # mean over prompts
    assert res.top(3, batch=None)[0][1] == pytest.approx(
        float(res.values().mean(0)[[c.label for c in res.components()].index(res.top(1, batch=None)[0][0])]))


def test_cache_path_and_vector_direction(tiny):
    model = tiny.model
    res = _run(tiny)
    logits, cache = model.run_with_cache(model.to_tokens(PROMPT))
    from_cache = direct_logit_attribution(model, cache=cache, logits=logits, answer=ANSWER, wrong=WRONG)
    assert torch.allclose(from_cache.values(), res.values(), atol=TIGHT)
    no_logits = direct_logit_attribution(model, cache=cache, answer=ANSWER, wrong=WRONG)
    assert no_logits.actual_source == "resid" and float(no_logits.actual[0]) == pytest.approx(float(res.actual[0]),
                                                                                           abs=1024 * EPS)
    # a vector direction read like a W_U column gives the same parts, minus the b_U constant
    a, w = _ids(tiny, ANSWER, WRONG)
    v = (model.W_U[:, a] - model.W_U[:, w]).detach()
    vec = direct_logit_attribution(model, PROMPT, direction=v)
    assert torch.allclose(vec.heads, res.heads, atol=TIGHT) and torch.allclose(vec.neurons, res.neurons, atol=TIGHT)
    b_U = res.constants.get("b_U", torch.zeros(1))
    assert float(vec.total[0]) == pytest.approx(float(res.actual[0] - b_U[0]), abs=1024 * EPS)
    # a plain residual projection (no final norm): parts sum to resid_final . v
    raw = direct_logit_attribution(model, PROMPT, direction=v, through_final_norm=False)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    assert float(raw.total[0]) == pytest.approx(float(resid @ v), rel=1024 * EPS, abs=1024 * EPS)


def test_raw_and_compat_agree(builder, tiny):
    """TransformerLens's weight processing changes weights but not any component's direct effect, except that folding
    value biases moves them from the heads into b_O (so heads are compared where there is no b_V)."""
    if tiny.mode == "compat":
        pytest.skip("compared from the raw side")
    raw = _run(tiny)
    compat = _run(builder.get(tiny.arch, "compat"))
    for name in ("embed", "mlps", "neurons", "attn_out", "actual", "total"):
        assert torch.allclose(getattr(raw, name), getattr(compat, name), atol=256 * EPS), name
    has_b_V = getattr(tiny.model.blocks[0].attn, "b_V", None) is not None
    if not has_b_V:
        assert torch.allclose(raw.heads, compat.heads, atol=256 * EPS)
        assert torch.allclose(raw.sources, compat.sources, atol=256 * EPS)


# ------------------------------------------------------------------------------------------------ TL 4.3 oracles
def test_matches_transformer_lens_dla(tiny):
    from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

    model = tiny.model
    if not tiny.compat:
        with pytest.raises(ValueError, match="compatibility"):
            tl_dla(model, PROMPT, answer_tokens=ANSWER, incorrect_tokens=WRONG, unit="head")
        pytest.skip("TL refuses raw bridges (ours is checked against compat by test_raw_and_compat_agree)")
    res = _run(tiny)
    L, H = res.n_layers, res.n_heads
    tl_heads = tl_dla(model, PROMPT, answer_tokens=ANSWER, incorrect_tokens=WRONG, unit="head")
    assert tl_heads.labels[: L * H] == [f"L{l}H{h}" for l in range(L) for h in range(H)]
    att = tl_heads.attribution.detach().reshape(len(tl_heads.labels), -1)[:, 0]
    assert torch.allclose(att[: L * H].view(L, H), res.heads[0], atol=128 * EPS)
    attn_bias = res.attn_bias[0].sum() if res.attn_bias is not None else 0.0
    remainder = res.embed[0].sum() + attn_bias + res.mlps[0].sum()
    assert float(att[-1]) == pytest.approx(float(remainder), abs=1024 * EPS)

    comp = tl_dla(model, PROMPT, answer_tokens=ANSWER, incorrect_tokens=WRONG, unit="component")
    catt = dict(zip(comp.labels, comp.attribution.detach().reshape(len(comp.labels), -1)[:, 0].tolist()))
    for i, label in enumerate(res.embed_labels):
        assert catt[label] == pytest.approx(float(res.embed[0, i]), abs=128 * EPS)
    for l in range(L):
        attn = float(res.heads[0, l].sum() + (res.attn_bias[0, l] if res.attn_bias is not None else 0.0))
        assert catt[f"{l}_attn_out"] == pytest.approx(attn, abs=128 * EPS)
        assert catt[f"{l}_mlp_out"] == pytest.approx(float(res.mlps[0, l]), abs=128 * EPS)


def test_neurons_match_stack_neuron_results(tiny):
    if not tiny.compat:
        pytest.skip("TransformerLens's stacking ignores a raw bridge's final-norm gain; raw is checked via compat")
    model = tiny.model
    tokens = model.to_tokens(PROMPTS, padding_side="right")
    logits, cache = model.run_with_cache(tokens)
    a, w = _ids(tiny, ANSWER, WRONG)
    d = (model.W_U[:, a] - model.W_U[:, w]).detach()
    L, N = model.cfg.n_layers, model.cfg.d_mlp
    # every position: projected path
    tl = cache.stack_neuron_results(L, apply_ln=True, project_output_onto=d)  # [L*N, B, S]
    ours = neuron_attribution(model, cache, answer=ANSWER, wrong=WRONG).values  # [L, B, P, N]
    B, S = tokens.shape
    assert torch.allclose(ours.permute(0, 3, 1, 2).reshape(L * N, B, S), tl, atol=128 * EPS)
    # and TL's plain path (full [neurons, batch, pos, d_model]) projected afterwards
    plain = cache.stack_neuron_results(L, apply_ln=True) @ d
    assert torch.allclose(ours.permute(0, 3, 1, 2).reshape(L * N, B, S), plain, atol=128 * EPS)
    # the single-position engine on a one-prompt run
    res = _run(tiny)
    _, cache1 = model.run_with_cache(model.to_tokens(PROMPT))
    tl1 = cache1.stack_neuron_results(L, pos_slice=-1, apply_ln=True, project_output_onto=d)  # [L*N, 1]
    assert torch.allclose(res.neurons[0].reshape(-1), tl1[:, 0], atol=128 * EPS)


def test_neuron_attribution_on_raw_matches_engine(tiny):
    model = tiny.model
    _, cache = model.run_with_cache(model.to_tokens(PROMPT))
    res = _run(tiny)
    every = neuron_attribution(model, cache, answer=ANSWER, wrong=WRONG)
    assert torch.allclose(every.values[:, 0, -1], res.neurons[0], atol=TIGHT)
    sel = neuron_attribution(model, cache, answer=ANSWER, wrong=WRONG, layers=[-1], positions=[0, -1])
    assert torch.allclose(sel.values[0], every.values[-1][:, [0, -1]], atol=TIGHT)
    n = every.values.shape[2]
    assert sel.layers == [model.cfg.n_layers - 1] and sel.positions == [0, n - 1]
    assert every.positions == list(range(n))
    label, value = sel.top(1)[0]  # the labels name the block and the cache position
    assert value == float(sel.values[0, 0].flatten()[sel.values[0, 0].abs().flatten().argmax()])
    assert label.startswith(f"L{model.cfg.n_layers - 1}N") and label.endswith(("@0", f"@{n - 1}"))


# ------------------------------------------------------------------------------------------------ power tests
@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_ignoring_the_final_norm_gain_fails_on_raw(builder, arch, monkeypatch):
    tiny = builder.get(arch, "raw")
    before = hook_counts(tiny.model)
    real = ModelView(tiny.model).decoder
    gainless = dataclasses.replace(real, gain=torch.ones_like(real.gain))
    monkeypatch.setattr(ModelView, "decoder", property(lambda self: gainless))
    with pytest.raises(VerificationError, match="enable_compatibility_mode"):
        _run(tiny)
    assert hook_counts(tiny.model) == before
    # a raw bridge whose gain cannot be read is refused, not silently attributed
    unread = dataclasses.replace(real, gain=None, bias=None)
    monkeypatch.setattr(ModelView, "decoder", property(lambda self: unread))
    with pytest.raises(LensInputError, match=r"enable_compatibility_mode\(\)"):
        _run(tiny)


def test_ignoring_layernorm_centring_fails(builder, monkeypatch):
    tiny = builder.get("gpt2", "raw")
    monkeypatch.setattr(directions_mod, "centred_vectors", lambda view, d: d.vectors.float())
    with pytest.raises(VerificationError):
        _run(tiny)


def test_wrong_gqa_mapping_fails(builder, monkeypatch):
    tiny = builder.get("llama_gqa", "raw")  # 6 query heads, 2 KV heads
    monkeypatch.setattr(ModelView, "expand_kv", lambda self, t, dim: t.repeat(1, 1, self.n_heads // t.shape[dim], 1))
    with pytest.raises(VerificationError, match="source positions"):
        _run(tiny)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors(tiny_pair):
    model = tiny_pair.model
    before = hook_counts(model)
    with pytest.raises(LensInputError, match=r"not a single token.*\[' ', 'Paris'\]"):
        direct_logit_attribution(model, PROMPT, answer=" Paris")
    with pytest.raises(LensInputError, match="wrong: .*not a single token"):
        direct_logit_attribution(model, PROMPT, answer="Paris", wrong=" capital")
    with pytest.raises(LensInputError, match=r"position 99 is out of range .* 0\.\.\d+"):
        direct_logit_attribution(model, PROMPT, answer=ANSWER, position=99)
    with pytest.raises(LensInputError, match="out of range"):
        direct_logit_attribution(model, PROMPTS, answer=ANSWER, position=-6)  # "A city" is shorter
    with pytest.raises(LensInputError, match=r"direction has shape \(7,\); expected \[d_model\]"):
        direct_logit_attribution(model, PROMPT, direction=torch.ones(7))
    with pytest.raises(LensInputError, match="got 2 answer tokens for 3 prompts"):
        direct_logit_attribution(model, PROMPTS, answer=["Paris", "The"])
    with pytest.raises(LensInputError, match="got 2 wrong tokens for 3 prompts"):
        direct_logit_attribution(model, PROMPTS, answer="Paris", wrong=["Paris", "The"])
    with pytest.raises(LensInputError, match="exactly one of answer"):
        direct_logit_attribution(model, PROMPT)
    with pytest.raises(LensInputError, match="exactly one of answer"):
        direct_logit_attribution(model, PROMPT, answer=ANSWER, direction=torch.ones(model.cfg.d_model))
    with pytest.raises(LensInputError, match="empty prompt"):
        direct_logit_attribution(model, "", answer=ANSWER)
    _, cache = model.run_with_cache(model.to_tokens(PROMPT), names_filter=lambda n: n.endswith("resid_post"))
    with pytest.raises(LensInputError, match="lacks .* hook"):
        direct_logit_attribution(model, cache=cache, answer=ANSWER)
    res = _run(tiny_pair)
    with pytest.raises(LensInputError, match="unknown kinds"):
        res.top(3, kinds="attention")
    with pytest.raises(LensInputError, match="does not exist"):
        res.head_sources(50, 0)
    assert hook_counts(model) == before


def test_other_position_matches_hf(tiny_pair):
    res = _run(tiny_pair, position=2)
    with torch.no_grad():
        hf_logits = tiny_pair.hf(tiny_pair.model.to_tokens(PROMPT)).logits[0, 2]
    a, w = _ids(tiny_pair, ANSWER, WRONG)
    assert res.positions == [2] and float(res.actual[0]) == pytest.approx(float(hf_logits[a] - hf_logits[w]), abs=1024 * EPS)
    assert torch.allclose(res.sources[0, ..., 3:], torch.zeros(1), atol=0)  # causal: nothing after the position
    with pytest.raises(LensInputError, match="through_final_norm=False only goes with direction"):
        _run(tiny_pair, through_final_norm=False)


def test_required_hooks_cache_is_enough(tiny_pair):
    model = tiny_pair.model
    names = set(required_hooks(model))
    logits, cache = model.run_with_cache(model.to_tokens(PROMPT), names_filter=lambda n: n in names)
    direct_logit_attribution(model, cache=cache, logits=logits, answer=ANSWER)  # verifies


# ------------------------------------------------------------------------------------------------ results
def test_top_labels_dataframe_and_dict(tiny_pair):
    res = _run(tiny_pair)
    labels = [c.label for c in res.components()]
    assert labels[0] == "embed" and "L0H0" in labels and "MLP0" in labels
    top = res.top(4)
    assert len(top) == 4 and all(abs(top[i][1]) >= abs(top[i + 1][1]) for i in range(3))
    assert all(label.startswith("L") and "H" in label for label, _ in res.top(3, kinds="head"))
    assert res.top(1, by="value")[0][1] == max(v for _, v in res.top(100))
    n_label, n_val = res.top_neurons(1)[0]
    l, n = (int(x) for x in n_label[1:].split("N"))
    assert n_val == pytest.approx(float(res.neurons[0, l, n]))
    assert res.top(1, kinds="neuron")[0][0] == n_label
    src = res.head_sources(0, 1)
    assert len(src) == len(res.str_tokens[0]) and sum(v for _, v in src) == pytest.approx(float(res.heads[0, 0, 1]),
                                                                                           abs=128 * EPS)
    df = res.to_dataframe()
    assert len(df) == len(labels) and df["value"].sum() == pytest.approx(float(res.total[0]), abs=1024 * EPS)
    assert len(res.to_dataframe("neurons")) == res.neurons.numel()
    assert len(res.to_dataframe("sources")) == res.n_layers * res.n_heads * len(res.str_tokens[0])
    d = res.to_dict(top_k=3)
    assert set(d) == {"metric", "total", "actual", "components", "top_neurons", "sources"}
    assert sum(c["value"] for c in d["components"]) == pytest.approx(d["total"], abs=1024 * EPS)
    assert d["total"] == pytest.approx(d["actual"], abs=8192 * EPS)
    assert len(d["top_neurons"]) == 3 and len(d["sources"]) == 3
    json.dumps(d)


def test_rendering_offline(tiny_pair, tmp_path):
    res = _run(tiny_pair, PROMPTS, answer=ANSWER, wrong=WRONG)
    out = tmp_path / "dla.html"
    html = res.to_html(out, batch=1)
    assert out.read_text(encoding="utf-8") == html
    assert "<script src=\"http" not in html and "unpkg.com" not in html
    for part in ("L0H0", "MLP0", "top neurons", "CircuitsVis.render("):
        assert part in html, part
    shown = res.show(batch=0, head=(0, 1))
    assert "CircuitsVis.render(" in shown._repr_html_()
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(res.table(top_k=5))
    text = console.export_text()
    assert "L0" in text
    # top_k parts, the "top neurons" separator, top_k neurons: one line each
    assert sum(line.startswith("│ ") for line in text.splitlines()) == 5 + 1 + 5


# ------------------------------------------------------------------------------------------------ embedded model
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.slow
def test_ioi_on_embedded_model(smol):
    res = direct_logit_attribution(smol, IOI, answer=" Mary", wrong=" John")
    res.verify()
    with torch.no_grad():
        logits = smol(smol.to_tokens(IOI))[0, -1]
    mary, john = smol.to_single_token(" Mary"), smol.to_single_token(" John")
    assert float(res.actual[0]) == pytest.approx(float(logits[mary] - logits[john]), abs=8192 * EPS)
    assert float(res.actual[0]) > 0  # the model prefers the indirect object
    top_heads = res.top(5, kinds="head", by="value")
    print("\nIOI logit difference", round(float(res.actual[0]), 3), "top heads:", top_heads)
    print("top neurons:", res.top_neurons(5))
    l, h = (int(x) for x in top_heads[0][0][1:].split("H"))
    src = dict((i, v) for i, (_, v) in enumerate(res.head_sources(l, h)))
    print(f"through L{l}H{h}:", [(t, round(v, 3)) for t, v in res.head_sources(l, h) if abs(v) > 0.05])
    assert top_heads[0][1] > 0 and sum(src.values()) == pytest.approx(top_heads[0][1], abs=8192 * EPS)


@pytest.mark.slow
def test_cli_json_contract(smol, tmp_path, capsys, monkeypatch):
    import mi_lenses.models.loading as loading
    from mi_lenses.cli import main as cli_main

    monkeypatch.setattr(loading, "_boot", lambda *a, **k: smol)  # reuse the loaded model

    out_json, out_html = tmp_path / "dla.json", tmp_path / "dla.html"
    rc = cli_main(["dla", IOI, "--answer", " Mary", "--wrong", " John", "--top-k", "4",
                   "--json", str(out_json), "--html", str(out_html)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "L" in printed and "verified" in printed
    data = json.loads(out_json.read_text())
    assert set(data) == {"metric", "total", "actual", "components", "top_neurons", "sources"}
    assert data["metric"] == "logit[' Mary'] - logit[' John']"
    n_tokens = len(smol.to_tokens(IOI)[0])
    assert len(data["components"]) == 1 + 30 * (9 + 1)  # embed, 9 heads + MLP per layer (no biases, no b_U)
    for c in data["components"] + data["top_neurons"]:
        assert set(c) == {"label", "kind", "layer", "head", "neuron", "value"}
    assert sum(c["value"] for c in data["components"]) == pytest.approx(data["total"], abs=1024 * EPS)
    assert data["total"] == pytest.approx(data["actual"], abs=8192 * EPS)
    assert len(data["top_neurons"]) == 4 and all(c["kind"] == "neuron" for c in data["top_neurons"])
    assert len(data["sources"]) == 4 and all(len(v) == n_tokens for v in data["sources"].values())
    assert out_html.exists()
    assert cli_main(["dla", IOI, "--answer", " Mxyzptlk"]) == 2  # not one token: one line, exit 2
    assert "not a single token" in capsys.readouterr().err
