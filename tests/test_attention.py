"""attention(): patterns, diagnostics and q·k terms on the tiny models of every architecture, raw and folded, against
the model's own hooks, brute force, TransformerLens's head detector and the untouched HF model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mi_lenses
from conftest import PROMPT, PROMPTS, hook_counts
from mi_lenses.errors import LensInputError, VerificationError
from oracles import close
from tolerance import EPS, TIGHT

REPEAT = "one two three one two three one two three"


def _patterns(m, tokens):
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    return cache, [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(m.cfg.n_layers)]


def test_patterns_and_qk_terms_are_the_models_own(tiny):
    """Every pattern equals hook_pattern, and every q·k term row sums to hook_attn_scores (after rotary, the
    right KV head under GQA), its softmax to the pattern row."""
    m = tiny.model
    tokens = m.to_tokens(PROMPT)
    res = mi_lenses.attention(m, PROMPT)
    cache, pats = _patterns(m, tokens)
    n = tokens.shape[1]
    assert tuple(res.patterns.shape) == (1, m.cfg.n_layers, m.cfg.n_heads, n, n)
    for l in range(m.cfg.n_layers):
        close(res.patterns[0, l], pats[l][0], f"{tiny.id} pattern L{l}", TIGHT)
        scores = cache[f"blocks.{l}.attn.hook_attn_scores"][0]
        for h in range(m.cfg.n_heads):
            for q in (0, n // 2, n - 1):
                terms = res.qk_terms(l, h, q)
                assert terms.kv_head == h // (m.cfg.n_heads // mi_lenses.ModelView(m).n_kv_heads)
                assert terms.products.shape == (q + 1, m.cfg.d_head)
                close(terms.products.sum(-1), scores[h, q, : q + 1], f"{tiny.id} L{l}H{h} q{q} scores", 128 * EPS)
                close(terms.probs, pats[l][0, h, q, : q + 1], f"{tiny.id} L{l}H{h} q{q} softmax", 128 * EPS)
                close(terms.pattern, terms.probs, f"{tiny.id} L{l}H{h} q{q} stored row", 128 * EPS)
    assert float(res.score_error.max()) < 128 * EPS


def test_patterns_match_the_hf_model(tiny):
    """The untouched HF model's eager attention probabilities, as an independent oracle (every layer and head)."""
    m = tiny.model
    res = mi_lenses.attention(m, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        tokens = m.to_tokens(prompt)
        with torch.no_grad():
            att = tiny.hf(tokens, output_attentions=True).attentions
        n = tokens.shape[1]
        assert res.lengths[b] == n
        for l, a in enumerate(att):
            close(res.patterns[b, l, :, :n, :n], a[0], f"{tiny.id} prompt {b} layer {l} vs HF", 128 * EPS)
        assert torch.isnan(res.patterns[b, :, :, n:]).all() and torch.isnan(res.patterns[b, :, :, :, n:]).all()


def test_diagnostics_equal_brute_force(tiny_pair):
    m = tiny_pair.model
    res = mi_lenses.attention(m, [REPEAT, PROMPT])
    for b, prompt in enumerate([REPEAT, PROMPT]):
        _, pats = _patterns(m, m.to_tokens(prompt))
        for l, p in enumerate(pats):
            p = p[0].double()  # [H, n, n]
            n = p.shape[-1]
            for h in range(m.cfg.n_heads):
                rows = [p[h, q] for q in range(1, n)]
                sink = sum(float(r[0]) for r in rows) / (n - 1)
                prev = sum(float(p[h, q, q - 1]) for q in range(1, n)) / (n - 1)
                ent = sum(-sum(float(x) * math.log2(float(x)) for x in r[: q + 1] if x > 0)
                          for q, r in enumerate(rows, 1)) / (n - 1)
                assert float(res.sink[b, l, h]) == pytest.approx(sink, abs=128 * EPS)
                assert float(res.previous_token[b, l, h]) == pytest.approx(prev, abs=128 * EPS)
                assert float(res.entropy_bits[b, l, h]) == pytest.approx(ent, abs=1024 * EPS)


def test_previous_token_score_agrees_with_transformer_lens_head_detector(tiny_pair):
    """TransformerLens's ``detect_head(..., "previous_token_head")`` ("mul") divides the same attention mass by all
    ``n`` rows where we average the ``n - 1`` rows that have a previous token."""
    from transformer_lens.head_detector import detect_head

    m = tiny_pair.model
    res = mi_lenses.attention(m, PROMPT, induction_length=0)
    theirs = detect_head(m, PROMPT, "previous_token_head")
    n = res.lengths[0]
    close(res.previous_token[0] * (n - 1) / n, theirs, f"{tiny_pair.id} previous-token vs detect_head", 128 * EPS)


def test_induction_score_agrees_with_transformer_lens_detection_pattern(tiny_pair):
    """On each repeated random sequence, TL's induction detection pattern (token after an earlier occurrence) scores
    the same attention mass over all rows; ours averages the second copy's ``len(r)`` rows."""
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        get_induction_head_detection_pattern,
    )

    m = tiny_pair.model
    res = mi_lenses.attention(m, PROMPT, induction_length=12, induction_batch=3, seed=7)
    tokens = res.induction_tokens
    r = res.induction_length
    assert r == 12 and tokens.shape[0] == 3
    assert torch.equal(tokens[:, -r:], tokens[:, -2 * r:-r])  # r repeated
    assert all(len(set(row[-r:].tolist())) == r for row in tokens)  # distinct tokens: no spurious duplicates
    theirs = torch.zeros(m.cfg.n_layers, m.cfg.n_heads)
    for row in tokens:
        _, pats = _patterns(m, row[None])
        det = get_induction_head_detection_pattern(row[None].cpu())
        for l, p in enumerate(pats):
            for h in range(m.cfg.n_heads):
                theirs[l, h] += compute_head_attention_similarity_score(
                    p[0, h], det, exclude_bos=False, exclude_current_token=False, error_measure="mul")
    theirs *= tokens.shape[1] / r / tokens.shape[0]
    close(res.induction, theirs, f"{tiny_pair.id} induction vs TL detection pattern", 128 * EPS)
    again = mi_lenses.attention(m, PROMPT, induction_length=12, induction_batch=3, seed=7)
    assert torch.equal(again.induction_tokens, tokens)


def test_ragged_batches_equal_single_runs(tiny_pair):
    """Text, right-padded and left-padded tokens with their mask: each prompt's patterns, diagnostics and q·k terms
    equal its single run, counted in its own tokens; padding is NaN, never a number."""
    m = tiny_pair.model
    singles = [mi_lenses.attention(m, p, induction_length=0) for p in PROMPTS]
    rows = [m.to_tokens(p)[0] for p in PROMPTS]
    S = max(len(r) for r in rows)
    runs = {"text": mi_lenses.attention(m, PROMPTS, induction_length=0)}
    for side in ("left", "right"):
        tokens = torch.full((len(rows), S), m.tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
            tokens[b, sl], mask[b, sl] = r, 1
        runs[side] = mi_lenses.attention(m, tokens, attention_mask=mask, induction_length=0)
    for name, res in runs.items():
        for b, one in enumerate(singles):
            n = one.lengths[0]
            assert res.lengths[b] == n and res.str_tokens[b] == one.str_tokens[0]
            close(res.patterns[b, ..., :n, :n], one.patterns[0], f"{tiny_pair.id} {name} prompt {b}", 128 * EPS)
            for field in ("sink", "entropy", "previous_token"):
                close(getattr(res, field)[b], getattr(one, field)[0], f"{tiny_pair.id} {name} {field} {b}", 128 * EPS)
            t, u = res.qk_terms(1, 2, -1, batch=b), one.qk_terms(1, 2, -1)
            close(t.scores, u.scores, f"{tiny_pair.id} {name} q·k prompt {b}", 1024 * EPS)
            assert torch.isnan(res.patterns[b, ..., n:, :]).all()
        assert "NaN" not in res.to_json(batch=len(PROMPTS) - 1)


def test_from_the_users_cache(tiny_pair):
    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    ref = mi_lenses.attention(m, PROMPT, induction_length=0)
    _, cache = m.run_with_cache(tokens)
    for res in (mi_lenses.attention(m, tokens, cache=cache, induction_length=0),
                mi_lenses.attention(m, cache, induction_length=0)):  # a cache where the prompt goes
        assert torch.equal(res.patterns, ref.patterns)
        close(res.qk_terms(0, 1).scores, ref.qk_terms(0, 1).scores, "from a cache", TIGHT)
    assert mi_lenses.attention(m, tokens, cache=cache, induction_length=0).str_tokens == ref.str_tokens
    assert mi_lenses.attention(m, cache=cache, induction_length=0).str_tokens[0][0] == "[0]"
    _, single = m.run_with_cache(tokens, remove_batch_dim=True)
    assert torch.equal(mi_lenses.attention(m, tokens, cache=single, induction_length=0).patterns, ref.patterns)
    # a cache of the patterns only: everything but the q·k terms, and a message naming the fix
    _, small = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    res = mi_lenses.attention(m, tokens, cache=small, induction_length=0)
    assert torch.equal(res.patterns, ref.patterns) and res.q is None
    with pytest.raises(LensInputError, match="keeps no queries and keys"):
        res.qk_terms(0, 0)
    assert "No neuron view" in res.to_html()
    _, none = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(LensInputError, match="lacks the hook 'blocks.0.attn.hook_pattern'.*without a names_filter"):
        mi_lenses.attention(m, tokens, cache=none)


def test_the_identity_checks_catch_wrong_queries_and_keys(builder, monkeypatch):
    """A wrong score scale, a wrong rotary and a wrong GQA mapping are caught by verify() (run on every call)."""
    import mi_lenses.models.view as view_mod

    m = builder.get("neox", "raw").model  # rotary through hook_cos/hook_sin: our own rotation is checked
    mi_lenses.attention(m, PROMPT, induction_length=0)
    with monkeypatch.context() as mp:
        mp.setattr(view_mod, "_rotate", lambda x, cos, sin: x)
        with pytest.raises(VerificationError, match="hook_attn_scores"):
            mi_lenses.attention(m, PROMPT, induction_length=0)
    with monkeypatch.context() as mp:
        mp.setattr(mi_lenses.ModelView, "attn_scale", lambda self, layer: 0.5)
        with pytest.raises(VerificationError, match="hook_attn_scores"):
            mi_lenses.attention(builder.get("llama_gqa", "compat").model, PROMPT, induction_length=0)
    gqa = mi_lenses.attention(builder.get("llama_gqa", "raw").model, PROMPT, induction_length=0)
    gqa.k = gqa.k.flip(3)  # KV heads swapped: query heads read the wrong keys
    with pytest.raises(VerificationError, match="softmax"):
        gqa.verify()


def test_bad_input_names_the_fix_and_hooks_are_removed(tiny_pair):
    m = tiny_pair.model
    before = hook_counts(m)
    for kwargs, match in [(dict(layers=[9]), "layer 9 is out of range"),
                          (dict(induction_length=-1), "induction_length must be an int >= 0"),
                          (dict(induction_batch=0), "induction_batch must be an int >= 1"),
                          (dict(induction_length=40), "needs .* positions but the model has n_ctx=64")]:
        with pytest.raises(LensInputError, match=match):
            mi_lenses.attention(m, PROMPT, **kwargs)
    with pytest.raises(LensInputError, match="pass a prompt"):
        mi_lenses.attention(m)
    res = mi_lenses.attention(m, PROMPT, layers=[-1, 0])
    assert res.layers == [0, m.cfg.n_layers - 1] and res.patterns.shape[1] == 2
    with pytest.raises(LensInputError, match="is not in this result"):
        res.qk_terms(1 if m.cfg.n_layers > 2 else 5, 0)
    with pytest.raises(LensInputError, match="head 99 is out of range"):
        res.qk_terms(0, 99)
    with pytest.raises(LensInputError, match="query 50 is out of range"):
        res.qk_terms(0, 0, 50)
    assert hook_counts(m) == before


def test_outputs(llama_raw, tmp_path, capsys):
    m = llama_raw.model
    res = mi_lenses.attention(m, [REPEAT, PROMPT])
    page = res.to_html(tmp_path / "a.html", batch=1)
    assert page.count("var CircuitsVis=") == 1 and 'CircuitsVis.AttentionHeads' in page
    assert page.count('alt="L') == m.cfg.n_layers * m.cfg.n_heads  # the model view: one thumbnail per head
    assert "Neuron view" in page and "ColoredTokens" in page and "<div/>" not in page
    data = json.loads(res.to_json(tmp_path / "a.json", batch=1))
    assert data["tokens"] == res.str_tokens[1] and len(data["sink"]) == m.cfg.n_layers
    assert "patterns" not in data and len(res.to_dict(patterns=True)["patterns"][0][0]) == res.lengths[0]
    frame = res.to_dataframe()
    assert len(frame) == 2 * m.cfg.n_layers * m.cfg.n_heads
    pat = res.to_dataframe("patterns")
    n0, n1 = res.lengths
    assert len(pat) == m.cfg.n_layers * m.cfg.n_heads * (n0 * (n0 + 1) + n1 * (n1 + 1)) // 2
    for value in ("sink", "entropy", "previous_token", "induction"):
        res.print(value=value, width=120)
    terms = res.qk_terms(2, 5, batch=1)
    terms.print()
    assert "score = " in capsys.readouterr().out
    assert terms.top_dims(top_k=3)[0][1] == max(terms.products[int(terms.probs.argmax())].tolist(), key=abs)
    assert len(terms.to_dataframe()) == terms.products.numel()
    assert "most attended of" not in terms.fragment() and "the 3 most attended of" in terms.fragment(max_keys=3)
