"""Reading features, the rest (issue 28): max-activating contexts over a corpus checked against brute force and
against ``features`` recomputed on each context's own sequence (padding never counted), the views of a feature over
a prompt's tokens, and the feature logit lens through a tuned lens (a zero-initialised one is the logit lens)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

import mi_lenses
from conftest import PROMPT, PROMPTS
from mi_lenses import Dictionary
from mi_lenses.errors import LensInputError

N = 24


def _dictionary(m, hook="blocks.1.hook_resid_post", seed=0, **kw) -> Dictionary:
    g, D = torch.Generator().manual_seed(seed), m.cfg.d_model
    return Dictionary(torch.randn(D, N, generator=g) * 0.4, torch.randn(N, generator=g) * 0.1 - 0.3,
                      torch.randn(N, D, generator=g) * 0.2, torch.zeros(D), hook=hook, **kw)


def _tokens(m, n_seq=5, seq_len=12, seed=1):
    return torch.randint(3, m.cfg.d_vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def test_contexts_are_the_true_top_k_and_each_value_is_the_features_own(llama_raw):
    m = llama_raw.model
    d, tokens = _dictionary(m), _tokens(m)
    c = mi_lenses.feature_contexts(m, d, tokens, top_k=6, context=3, batch_size=2, progress=False)
    whole = mi_lenses.features(m, tokens, d).activations  # [n_seq, seq_len, N]: brute force over the corpus
    flat = whole.reshape(-1, N).T
    assert c.features == list(range(N)) and c.values.shape == (N, 6) and c.window_ids.shape == (N, 6, 7)
    assert c.n_tokens == tokens.numel()
    assert torch.allclose(c.frequency, (flat != 0).float().mean(-1))
    fired_somewhere = 0
    for f in range(N):
        active = flat[f][flat[f] != 0]
        best = active.sort(descending=True).values[:6]
        got = c.values[f][~c.values[f].isnan()]
        assert torch.allclose(got, best, atol=1e-5), f  # the true top_k, descending, NaN where it fired less
        fired_somewhere += bool(len(best))
        for r in range(len(got)):
            s, p = int(c.sequences[f, r]), int(c.positions[f, r])
            again = mi_lenses.features(m, tokens[s: s + 1], d).activations[0, p, f]  # its own sequence, recomputed
            assert abs(float(again - c.values[f, r])) < 1e-4
            ids = c.window_ids[f, r]
            lo = max(p - 3, 0)
            assert ids[3] == tokens[s, p] and ids[3 - (p - lo): 3].tolist() == tokens[s, lo: p].tolist()
            real = ids >= 0
            assert torch.allclose(c.window_acts[f, r][real], whole[s, lo: lo + int(real.sum()), f], atol=1e-5)
    assert fired_somewhere > N // 2
    assert [v for _, v in c.top(top_k=3)] == sorted(c.max_activation.tolist(), reverse=True)[:3]


def test_texts_are_padded_and_padding_is_never_counted(llama_raw):
    m = llama_raw.model
    d = _dictionary(m, hook="blocks.0.hook_mlp_out", seed=3)
    texts = ["The capital of France is Paris", "A city", "Hi", "One two three four five six seven"]
    c = mi_lenses.feature_contexts(m, d, texts, features=[0, 1, 2, "F3"], top_k=50, context=2, batch_size=3,
                                   progress=False)
    per_text = [mi_lenses.features(m, t, d).activations[0, :, :4] for t in texts]
    assert c.n_tokens == sum(a.shape[0] for a in per_text)  # only the real tokens of each padded batch
    for f in range(4):
        every = torch.cat([a[:, f] for a in per_text])
        want = every[every != 0].sort(descending=True).values
        got = c.values[f][~c.values[f].isnan()]
        assert torch.allclose(got, want, atol=1e-5)  # every activation found once, no padding among them
        for r in range(len(got)):
            s, p = int(c.sequences[f, r]), int(c.positions[f, r])
            assert abs(float(per_text[s][p, f] - c.values[f, r])) < 1e-4
        assert math.isclose(float(c.frequency[f]), float((every != 0).float().mean()), rel_tol=1e-6)


def test_a_text_corpus_streams_and_the_views_work(llama_raw, tmp_path):
    m = llama_raw.model
    d = _dictionary(m)
    (tmp_path / "corpus.txt").write_text("The capital of France is Paris. The city of lights. " * 30)
    c = mi_lenses.feature_contexts(m, d, tmp_path / "corpus.txt", top_k=5, context=4, seq_len=16, max_tokens=128,
                                   progress=False)
    assert c.n_tokens == 128
    best = c.top(top_k=1)[0][0]
    data = c.to_dict(feature=best, top_k=3)
    (one,) = data["features"]
    assert one["label"] == best and len(one["contexts"]) == 3 and one["promoted"] and one["suppressed"]
    ctx = one["contexts"][0]
    assert ctx["activations"][ctx["at"]] == pytest.approx(one["max_activation"])
    assert json.loads(c.to_json(feature=best)) == c.to_dict(feature=best)
    page = c.to_html(feature=best)
    assert page.count("colored_tokens") + page.count("ColoredTokens") >= 1 and "font-weight:bold" in page
    assert "".join(ctx["tokens"]).strip()[:3] in page.replace("&nbsp;", " ")
    console = Console(width=160, record=True)
    console.print(c.table(top_k=2))
    assert best in console.export_text()
    frame = c.to_dataframe()
    assert set(frame["label"]) == {lab for lab, f in zip(c.labels, c.max_activation) if f != 0}
    with pytest.raises(LensInputError, match="was not collected"):
        c.to_dict(feature="F999")
    with pytest.raises(LensInputError, match="features must be"):
        mi_lenses.feature_contexts(m, d, tmp_path / "corpus.txt", features=[N], progress=False)


def test_the_feature_result_views_a_feature_over_the_tokens(llama_raw):
    m = llama_raw.model
    f = mi_lenses.features(m, PROMPTS, _dictionary(m))
    i = int(f.activations[0].abs().amax(0).argmax())
    rows = f.to_dict(feature=i)["positions"]
    n = len(f.str_tokens[0])
    assert [r["feature_activation"] for r in rows] == pytest.approx(f.activations[0, :n, i].tolist())
    assert f.to_dict(feature=f.labels[i]) == f.to_dict(feature=i)
    assert "colored_tokens" in f.fragment(feature=i).lower().replace("coloredtokens", "colored_tokens")
    assert "colored_tokens_multi" in f.fragment().lower().replace("coloredtokensmulti", "colored_tokens_multi")
    console = Console(width=200, record=True)
    console.print(f.table(feature=i))
    assert f.labels[i] in console.export_text()
    with pytest.raises(LensInputError, match="no feature"):
        f.table(feature="nope")


def test_the_feature_logit_lens_through_a_zero_tuned_lens_is_the_logit_lens(llama_raw):
    m = llama_raw.model
    d = _dictionary(m, hook="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out")
    plain = mi_lenses.feature_dla(m, PROMPT, d, answer=" city", top_k=4)
    lens = mi_lenses.TunedLens.from_model(m)  # zero-initialised: the identity at every row
    tuned = mi_lenses.feature_dla(m, PROMPT, d, answer=" city", top_k=4, lens=lens)
    assert plain.logit_lens and tuned.logit_lens.keys() == plain.logit_lens.keys()
    for i in plain.logit_lens:
        for side in ("promoted", "suppressed"):
            assert [t for t, _ in tuned.logit_lens[i][side]] == [t for t, _ in plain.logit_lens[i][side]]
            assert [v for _, v in tuned.logit_lens[i][side]] == pytest.approx([v for _, v in
                                                                              plain.logit_lens[i][side]], abs=1e-5)
    assert torch.equal(tuned.values, plain.values)  # the attribution itself does not depend on the lens
    # a trained-looking lens: its map A at row 2 (the output of block 1) reads the decoder direction first
    with torch.no_grad():
        lens.weight[2] = torch.randn(m.cfg.d_model, m.cfg.d_model, generator=torch.Generator().manual_seed(5))
        lens.bias[2] = 100.0  # a bias is a state's, not a direction's: it must not change the result
    through = mi_lenses.feature_dla(m, PROMPT, d, answer=" city", top_k=4, lens=lens)
    view = mi_lenses.ModelView(m)
    i = next(iter(through.logit_lens))
    v = (d.W_dec[i] + d.W_dec[i] @ lens.weight[2].T).detach()
    logits = v @ view.decoder.W
    assert through.logit_lens[i]["promoted"][0][0] == view.id_to_str(int(logits.argmax()))
    assert through.logit_lens[i]["promoted"][0][1] == pytest.approx(float(logits.max()), rel=1e-4)
    c = mi_lenses.feature_contexts(m, d, _tokens(m), features=[i], top_k=3, lens=lens, progress=False)
    assert c.logit_lens[i] == through.logit_lens[i] and c.lens_name == "tuned lens"
    with pytest.raises(LensInputError, match="affine lens"):
        mi_lenses.feature_dla(m, PROMPT, d, answer=" city", lens=mi_lenses.LogitLens())
