"""Long prompts in bounded memory: no engine keeps a ``[..., pos, pos]`` tensor it does not show (structural checks
of what a forward pass caches), and every faster path equals the path it replaces: fused attention for the lenses,
the pattern rows DLA keeps, the last query rows of ``attention(last_queries=)`` and the report's long-prompt mode.
No timing is asserted (``benchmarks/bench_long_prompt.py`` measures them)."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

import mi_lenses
import mi_lenses.models.batch as batch_module
import mi_lenses.models.view as view_module
from conftest import PROMPTS
from mi_lenses.models import fused, masks
from mi_lenses.models.view import ModelView
from oracles import close
from tolerance import EPS, TIGHT

LONG = ("one two three four five six seven eight nine ten The quick brown fox jumps over the lazy dog. "
        "The capital of France is Paris. Hello world, hello lens! ") * 4


def _tokens(m, n: int = 60):
    return m.to_tokens(LONG)[:, :n]


@contextlib.contextmanager
def _recorded_caches(monkeypatch):
    """Every cache a forward pass of ours returns (its keys and tensors), and whether the attention was fused."""
    seen: list[dict] = []
    real = batch_module.run_with_cache

    def spy(view, batch, names, **kw):
        logits, cache = real(view, batch, names, **kw)
        seen.append({"S": batch.shape[1], "cache": {k: cache[k] for k in cache.keys()}})
        return logits, cache

    monkeypatch.setattr(batch_module, "run_with_cache", spy)
    monkeypatch.setattr(view_module, "run_with_cache", spy)  # ModelView.run_with_cache (the report, Patchscopes)
    yield seen


def _square(cache: dict, S: int) -> list[str]:
    """Cached tensors with two position axes (``[..., pos, pos]``); a pooled image is at most ``THUMBNAIL`` a side
    whatever the prompt's length (here the prompt is shorter)."""
    return [k for k, t in cache.items()
            if t.ndim >= 2 and t.shape[-1] == S and t.shape[-2] == S and not k.endswith(":thumbnail")]


@contextlib.contextmanager
def _count_pattern_calls(m):
    """How often a hook point holding a pattern or scores ran (a spy on the points' forward, not a TransformerLens hook,
    which would itself count as a hook inside the attention)."""
    calls = [0]
    points = [getattr(b.attn, name) for b in m.blocks for name in ("hook_pattern", "hook_attn_scores")]
    for p in points:
        real = p.forward

        def forward(x, real=real):
            calls[0] += 1
            return real(x)

        p.forward = forward
    try:
        yield calls
    finally:
        for p in points:
            del p.forward


def _eager(monkeypatch):
    monkeypatch.setattr(batch_module, "fused_attention", lambda *a, **k: contextlib.nullcontext())


# ------------------------------------------------------------------------------------- the lens: fused attention
def test_lens_builds_no_attention_pattern_and_equals_the_eager_pass(tiny, monkeypatch):
    """Where TransformerLens re-implements the attention (the llama and qwen2 bridges), the lens's forward pass runs
    fused attention: no hook_pattern / hook_attn_scores point runs, nothing [pos, pos] is cached, and every
    statistic equals the eager pass's (top-k ids exactly)."""
    m = tiny.model
    tokens = _tokens(m)
    S = tokens.shape[1]
    fused._probe(ModelView(m))  # once per model, an eager pass and a fused one on a few tokens
    with _count_pattern_calls(m) as calls, _recorded_caches(monkeypatch) as seen:
        fast = mi_lenses.logit_lens(m, tokens, progress=False)
    assert not _square(seen[0]["cache"], S)
    reimplemented = fused._attentions(m) is not None
    assert (calls[0] == 0) == reimplemented, f"{tiny.id}: pattern hooks ran {calls[0]} times"
    _eager(monkeypatch)
    with _count_pattern_calls(m) as calls:
        slow = mi_lenses.logit_lens(m, tokens, progress=False)
    assert calls[0] > 0
    assert torch.equal(fast.top_ids, slow.top_ids)
    for what in ("kl", "entropy", "logsumexp", "cross_entropy"):
        close(getattr(fast, what), getattr(slow, what), f"{tiny.id} {what}", 64 * EPS)
    fast.verify()


def test_fused_attention_stays_off_where_it_would_change_what_runs(llama_raw, monkeypatch):
    """A hook inside an attention module (the user's, or a cached pattern), left padding or a failed probe keep the
    eager pass."""
    m = llama_raw.model
    view = ModelView(m)
    batch = view.batch(_tokens(m))
    resid = ["blocks.0.hook_resid_pre"]
    assert fused._eligible(view, batch, resid) and fused._probe(view)
    assert not fused._eligible(view, batch, resid + ["blocks.1.attn.hook_pattern"])
    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z)]):
        assert not fused._eligible(view, batch, resid)
    padded = view.batch(_tokens(m, 12), attention_mask=torch.tensor([[0, 0] + [1] * 10]))
    assert padded.left_padded and not fused._eligible(view, padded, resid)
    config = m.original_model.config
    for attr, value in (("sliding_window", 64), ("attention_chunk_size", 64)):  # masks the probe cannot see
        monkeypatch.setattr(config, attr, value, raising=False)
        monkeypatch.setattr(config, "layer_types", None, raising=False)
        monkeypatch.setattr(masks, "_READ", weakref.WeakKeyDictionary())  # read once per model: read it again
        assert not fused._eligible(view, batch, resid), attr
        monkeypatch.undo()
    assert fused._eligible(view, batch, resid)
    monkeypatch.setitem(fused._PROBED, m, False)
    assert isinstance(fused.fused_attention(view, batch, resid), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------- DLA: pattern rows
@pytest.mark.parametrize("position", [-1, 5])
def test_dla_keeps_pattern_rows_only_and_equals_the_full_cache(tiny, monkeypatch, position):
    """DLA's own forward pass caches no [pos, pos] tensor (each pattern is reduced to the attributed row), and its
    parts equal DLA on a full TransformerLens cache exactly; also for right-padded prompts."""
    m = tiny.model
    tokens = _tokens(m)
    S = tokens.shape[1]
    with _recorded_caches(monkeypatch) as seen:
        ours = mi_lenses.direct_logit_attribution(m, tokens, answer=7, position=position, progress=False)
    assert not _square(seen[0]["cache"], S)
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    full = mi_lenses.direct_logit_attribution(m, tokens, answer=7, position=position, cache=cache,
                                              logits=logits, progress=False)
    for a, b in zip(ours.values(), full.values()):
        assert torch.equal(a, b)
    assert torch.equal(ours.sources, full.sources)
    padded = mi_lenses.direct_logit_attribution(m, PROMPTS, answer=7, progress=False)
    for b, prompt in enumerate(PROMPTS):
        one = mi_lenses.direct_logit_attribution(m, prompt, answer=7, progress=False)
        n = one.sources.shape[-1]
        close(padded.sources[b, ..., :n], one.sources[0], f"{tiny.id} prompt {b} sources", TIGHT)


# -------------------------------------------------------------------------------------- attention: the last queries
def test_attention_last_queries_equals_the_full_patterns(tiny, monkeypatch):
    """attention(last_queries=Q): the kept rows, queries, q·k terms and every diagnostic equal the full result's, no
    [pos, pos] tensor is cached, and the pooled images are the patterns themselves when the prompt is short."""
    m = tiny.model
    tokens = _tokens(m)
    S, Q = tokens.shape[1], 8
    full = mi_lenses.attention(m, tokens, induction_length=0)
    with _recorded_caches(monkeypatch) as seen:
        last = mi_lenses.attention(m, tokens, induction_length=0, last_queries=Q)
    assert not _square(seen[0]["cache"], S)
    assert tuple(last.patterns.shape) == (1, m.cfg.n_layers, m.cfg.n_heads, Q, S) and last.first_query == [S - Q]
    for what in ("sink", "entropy", "previous_token"):
        close(getattr(last, what), getattr(full, what), f"{tiny.id} {what}", TIGHT)
    assert torch.equal(last.patterns, full.patterns[:, :, :, S - Q :])
    if full.q is not None:
        assert torch.equal(last.q, full.q[:, :, S - Q :])
        terms, ref = last.qk_terms(1, 0, -1), full.qk_terms(1, 0, -1)
        assert torch.equal(terms.products, ref.products) and torch.equal(terms.pattern, ref.pattern)
        close(last.score_error, full.score_error, f"{tiny.id} score error", TIGHT)
    for i in range(m.cfg.n_layers):  # S <= THUMBNAIL: the image is the pattern
        for h in range(m.cfg.n_heads):
            assert torch.equal(last.image(0, i, h), full.image(0, i, h))
    with pytest.raises(mi_lenses.LensInputError, match="was not kept"):
        last.qk_terms(0, 0, 3)
    last.verify()
    assert last.to_dict(patterns=True)["first_query"] == S - Q
    assert len(last.to_dataframe("patterns")) == m.cfg.n_layers * m.cfg.n_heads * sum(S - Q + j + 1 for j in range(Q))
    # the same from a whole TransformerLens cache, and for padded prompts
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    again = mi_lenses.attention(m, tokens, cache=cache, induction_length=0, last_queries=Q)
    assert torch.equal(again.patterns, last.patterns) and torch.equal(again.sink, last.sink)
    both = mi_lenses.attention(m, PROMPTS, induction_length=0)
    tails = mi_lenses.attention(m, PROMPTS, induction_length=0, last_queries=2)
    close(tails.entropy, both.entropy, f"{tiny.id} padded entropy", TIGHT)
    for b, n in enumerate(both.lengths):
        close(tails.patterns[b, :, :, :2], both.patterns[b, :, :, n - 2 : n], f"{tiny.id} prompt {b} rows", 0)


def test_long_pattern_images_are_pooled():
    """A prompt longer than the image: the kept thumbnail is the whole pattern max-pooled."""
    from mi_lenses.attn.engine import THUMBNAIL, _head_diagnostics

    n = THUMBNAIL + 57
    p = torch.rand(2, n, n).tril()
    p = p / p.sum(-1, keepdim=True)
    pooled = torch.nn.functional.adaptive_max_pool2d(p, (THUMBNAIL, THUMBNAIL))
    assert pooled.shape[-1] == THUMBNAIL
    sink, ent, prev = _head_diagnostics(p)
    rows = p[:, 1:]
    close(ent, -torch.special.xlogy(rows, rows).sum(-1).mean(-1), "chunked entropy", TIGHT)
    close(sink, rows[..., 0].mean(-1), "sink", TIGHT)
    close(prev, torch.diagonal(p, -1, -2, -1).mean(-1), "previous token", TIGHT)


# ------------------------------------------------------------------------------------------------ the report
def test_long_report_keeps_no_pattern_and_equals_the_short_path(llama_raw, monkeypatch):
    """Past LONG_PROMPT the report's one forward pass keeps no [pos, pos] tensor (the attention keeps the last
    queries' rows, DLA the last row, each reduced as the pattern passes; the Patchscope reads the same cache), the
    lens covers the last LONG_PROMPT positions, and every number equals the short path's."""
    from mi_lenses import reports

    m = llama_raw.model
    tokens = _tokens(m)
    S, Q = tokens.shape[1], 8
    short = mi_lenses.report(m, tokens, progress=False, patchscope_positions=3)
    monkeypatch.setattr(reports, "LONG_PROMPT", 16)
    monkeypatch.setattr(reports, "HEAD_VIEW_WINDOW", Q)
    with _recorded_caches(monkeypatch) as seen:
        long = mi_lenses.report(m, tokens, progress=False, patchscope_positions=3)
    assert not _square(seen[0]["cache"], S)
    assert len([s for s in seen if s["S"] == S]) == 1  # one forward pass over the prompt (the Patchscope's reuses it)
    att, ref = long.attention, short.attention
    assert att.first_query == [S - Q] and torch.equal(att.patterns, ref.patterns[:, :, :, S - Q :])
    for what in ("sink", "entropy", "previous_token", "induction", "k", "score_error"):
        close(getattr(att, what), getattr(ref, what), what, TIGHT)
    assert torch.equal(long.dla.sources, short.dla.sources) and torch.equal(long.dla.heads, short.dla.heads)
    # the lens at the last LONG_PROMPT positions, the same numbers as the whole prompt's there
    assert long.logit_lens.positions == list(range(S - 16, S))
    assert torch.equal(long.logit_lens.top_ids, short.logit_lens.top_ids[:, :, S - 16 :])
    close(long.logit_lens.kl, short.logit_lens.kl[:, :, S - 16 :], "lens KL", TIGHT)
    for a, b in zip(long.per_layer(), short.per_layer()):
        assert (a["top1"], a["rank_prediction"]) == (b["top1"], b["rank_prediction"])
    assert torch.equal(long.patchscope.prec_at_1, short.patchscope.prec_at_1)
    page = long.fragment()
    assert 'id="head-view"' in page and 'id="neuron-view"' in page and f"last {Q} tokens" in page
    assert f"last 16 of its {S} positions" in page
