"""The logit lens against independent oracles, on tiny random models of five architectures, raw and folded.

Oracles (none of them is mi_lenses code):

* **HF brute force**: ``hf(tokens, output_hidden_states=True)`` on an untouched copy of the HF model; every
  ``hidden_states[i]`` (the input of block ``i``) is decoded with the HF final norm module and ``lm_head``; the final
  row is the model's own logits. Every statistic is then recomputed in float64 from the full logits.
* **TL modules**: the bridge's own ``ln_final`` module, ``W_U`` and ``b_U`` applied to the bridge's cache (this also
  reaches ``resid_mid``, which HF does not expose).
* **TransformerLens 4.3** ``transformer_lens.tools.analysis.logit_lens`` on the same model and cache.
* **tuned-lens 0.2.0** ``LogitLens`` / ``PredictionTrajectory`` on the same HF weights.

In compatibility mode the bridge centres ``W_U``, so its logits equal the HF logits only up to a per-position constant:
comparisons there are in log-prob space (top-k, ranks, KL, entropy, CE are all shift invariant). Raw bridges are also
compared in logit space. Near-ties are handled explicitly: a top-k id or a rank must be right wherever the oracle's
logits are separated by more than the tolerance, and must lie within the tie bracket elsewhere.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import mi_lenses
from mi_lenses import LensInputError, ModelView, VerificationError, logit_lens, run_lens
from conftest import PROMPT, PROMPTS, hook_counts

from oracles import (  # noqa: F401
    TIE,
    TOL,
    assert_lens_matches,
    assert_no_hooks,
    assert_ranks,
    assert_topk,
    close,
    hf_final_norm,
    hf_lens_logits,
    next_ids_of,
    oracle_stats,
    same_result,
    target_ids_of,
)
from tolerance import EPS, TIGHT


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These models are tiny: intra-op threads only contend (3-10x slower on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# =============================================================================================== helpers
def tl_module_logits(model, cache, hook_names, positions=None) -> torch.Tensor:
    """Decode cached states with the bridge's own ``ln_final`` module and unembedding: ``[R, B, P, V]`` float64."""
    rows = []
    for name in hook_names:
        x = cache[name]
        if positions is not None:
            x = x[:, positions]
        y = model.ln_final(x) @ model.W_U
        if model.b_U is not None:
            y = y + model.b_U
        rows.append(y)
    return torch.stack(rows).double()


def pre_hooks(L: int) -> list[str]:
    return [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]


def single_token_strings(tokenizer, n: int) -> list[str]:
    """``n`` strings with a leading space that are exactly one token each."""
    out = []
    for i in range(3, len(tokenizer)):
        s = tokenizer.decode([i])
        if s.startswith(" ") and len(s) > 2 and tokenizer(s, add_special_tokens=False)["input_ids"] == [i]:
            out.append(s)
            if len(out) == n:
                return out
    raise AssertionError("tokenizer has too few single-token words")


@pytest.fixture(scope="session")
def targets(tokenizer):
    """Two single-token strings and one raw id."""
    words = single_token_strings(tokenizer, 2)
    return [*words, 7]


# =============================================================================================== 1. oracles
def test_fixture_models_are_what_we_think(tiny):
    """The fixtures themselves: architecture facts the other tests rely on (and the power of the norm checks)."""
    m, cfg = tiny.model, tiny.model.cfg
    view = ModelView(m)
    dec = view.decoder
    kind, gain, bias, eps = dec.kind, dec.gain, dec.bias, dec.eps
    hf_norm = hf_final_norm(tiny.hf)
    assert kind == ("RMS" if tiny.arch in ("llama_gqa", "llama_tied", "qwen2") else "LN")
    assert eps == pytest.approx(getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", None)))
    if tiny.arch == "llama_gqa":
        assert view.n_kv_heads < view.n_heads
    if tiny.compat:
        assert gain is None or torch.allclose(gain, torch.ones_like(gain))
        assert bias is None or not bias.any()
    else:  # the raw bridge carries the (perturbed) gain: the lens must apply it
        assert torch.equal(gain, hf_norm.weight.detach())
        assert (gain - 1).abs().max() > 0.5
        if kind == "LN":
            assert torch.equal(bias, hf_norm.bias.detach()) and bias.abs().max() > 0.2
    assert cfg.d_vocab == len(tiny.tokenizer) == view.d_vocab


def test_tokenizer_and_bos_handling(builder, tokenizer):
    """How TL 4.3 treats the offline tokenizer: it detects that the tokenizer prepends BOS, and strips it again on
    adapters whose default is not to prepend one (Qwen2, GPT-NeoX); targets are tokenized without BOS either way."""
    bos = tokenizer.bos_token_id
    llama, qwen = builder.get("llama_gqa", "raw").model, builder.get("qwen2", "raw").model
    assert llama.cfg.tokenizer_prepends_bos and qwen.cfg.tokenizer_prepends_bos
    assert llama.cfg.default_prepend_bos and not qwen.cfg.default_prepend_bos
    assert llama.to_tokens(PROMPT)[0, 0] == bos and qwen.to_tokens(PROMPT)[0, 0] != bos
    assert torch.equal(llama.to_tokens(PROMPT)[:, 1:], qwen.to_tokens(PROMPT))
    res = logit_lens(qwen, PROMPT, prepend_bos=True)
    assert res.str_tokens[0][0] == tokenizer.bos_token and res.tokens.shape[1] == llama.to_tokens(PROMPT).shape[1]
    word = single_token_strings(tokenizer, 1)[0]
    assert ModelView(llama).to_single_token(word) == ModelView(qwen).to_single_token(word)


def test_logit_lens_matches_hf_brute_force(tiny, targets):
    m = tiny.model
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    res = logit_lens(m, tokens, top_k=5, targets=targets)
    res.verify()  # final row == model logits
    assert res.labels == ["embed", *[f"{l}_pre" for l in range(1, L)], "final"]
    assert res.point == "resid_pre" and res.dtype == "float32"
    assert res.target_ids.tolist() == target_ids_of(tiny.tokenizer, targets)
    assert res.valid.all()
    ref = hf_lens_logits(tiny, tokens)
    assert_lens_matches(res, ref, next_ids_of(tokens), tiny.id, logit_space=not tiny.compat)
    # the final row is the model's own output: the top-1 at the final row has rank 0
    assert (res.final_top1_rank[-1] == 0).all()
    assert torch.all(res.kl[-1] == 0)


def test_decode_and_cache_match_hf_and_tl_modules(tiny):
    """``ModelView.decode`` (the simple, non-streamed path) against the bridge's ln_final module and against HF."""
    m = tiny.model
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    view = ModelView(m)
    hooks = pre_hooks(L)
    ours = torch.stack([view.decode(cache[h]) for h in hooks]).double()
    # final row: the model's own logits, exactly what the bridge returns (both modes)
    close(ours[-1], logits, f"{tiny.id} decode(final resid) == model logits", 128 * EPS)
    close(ours, tl_module_logits(m, cache, hooks), f"{tiny.id} decode == ln_final module @ W_U + b_U")
    hf_ref = hf_lens_logits(tiny, tokens)
    if tiny.compat:
        close(ours.log_softmax(-1), hf_ref.log_softmax(-1), f"{tiny.id} decode log-probs == HF")
    else:
        close(ours, hf_ref, f"{tiny.id} decode == HF norm + lm_head")
        # raw bridges carry the HF residual stream itself
        hs = tiny.hf(tokens, output_hidden_states=True).hidden_states
        for l in range(L):
            close(cache[f"blocks.{l}.hook_resid_pre"], hs[l], f"{tiny.id} resid_pre {l} == HF hidden_states[{l}]", 128 * EPS)


@pytest.mark.parametrize("fused", [True, False], ids=["flash-kernel", "materialised"])
def test_lse_grad_matches_autograd_through_the_full_decode(tiny, fused, monkeypatch):
    """``Decoder.lse_grad`` (the fused flash-attention pass that tuned-lens training runs on, and its materialised
    fallback) equals ``logsumexp`` of the full decode and its autograd gradient, on every architecture."""
    import mi_lenses.models.decode as decode

    if fused and not decode._flash_cpu_works():
        pytest.skip("this torch build has no working CPU flash-attention kernel (lse_grad materialises instead)")
    if not fused:
        monkeypatch.setattr(decode, "_FLASH_OK", [False])
    dec = ModelView(tiny.model).decoder
    xn = dec.normalize(torch.randn(13, tiny.model.cfg.d_model, generator=torch.Generator().manual_seed(3)))
    lse, grad = dec.lse_grad(xn)
    x = xn.clone().requires_grad_(True)
    ref = dec.logits(x, normalized=True).logsumexp(-1)
    ref.sum().backward()
    close(lse, ref.detach(), f"{tiny.id} lse", 128 * EPS)
    close(grad, x.grad, f"{tiny.id} d lse / d xn", 128 * EPS)


# =============================================================================================== 2. TL 4.3 logit_lens
def test_matches_transformer_lens_logit_lens(tiny, targets):
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

    m = tiny.model
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    ours = logit_lens(m, tokens, cache=cache, logits=logits, top_k=5, targets=targets).verify()
    tids = ours.target_ids.tolist()

    full = tl_logit_lens(m, cache=cache, positions=None, return_type="log_probs")
    top = tl_logit_lens(m, cache=cache, positions=None, top_k=5, return_type="log_probs")
    tgt = tl_logit_lens(m, cache=cache, positions=None, targets=tids, return_type="log_probs")
    # TL labels 0_pre .. (L-1)_pre, final_post are our rows embed, 1_pre .. (L-1)_pre, final
    assert top.labels == [f"{l}_pre" for l in range(L)] + ["final_post"]
    assert [lab.replace("0_pre", "embed").replace("final_post", "final") for lab in top.labels] == ours.labels
    ours_lp = ours.top_logits - ours.logsumexp[..., None]
    assert_topk(ours.top_ids, ours_lp, full.values, f"{tiny.id} vs TL full log-probs")
    # TL's own top-k ids equal ours wherever the oracle has no near-tie
    vals = full.values.double().topk(6, dim=-1).values
    separated = ((vals[..., :-1] - vals[..., 1:]) > TIE)
    separated = separated & torch.cat([torch.ones_like(separated[..., :1]), separated[..., :-1]], -1)
    assert (top.readout.top_ids == ours.top_ids)[separated].all()
    close(top.readout.values, ours_lp, f"{tiny.id} top-k log-probs vs TL")
    close(top.readout.entropy, ours.entropy, f"{tiny.id} entropy vs TL")
    # target ranks: TL's equal ours (bracketed by near-ties in TL's full log-probs)
    t_ids = ours.target_ids.view(1, 1, 1, -1).expand_as(ours.target_ranks)
    assert_ranks(ours.target_ranks, full.values, t_ids, f"{tiny.id} target ranks vs TL full")
    diff = tgt.readout.target_ranks != ours.target_ranks
    assert diff.float().mean() < 0.02, f"{tiny.id}: target ranks differ from TL's at {diff.nonzero()[:5].tolist()}"
    close(tgt.readout.values, ours.target_logprobs, f"{tiny.id} target log-probs vs TL")


def test_resid_mid_matches_transformer_lens_and_tl_modules(tiny):
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

    m = tiny.model
    if getattr(m.cfg, "parallel_attn_mlp", False):
        pytest.skip("parallel attention/MLP: no resid_mid (see test_resid_mid_on_parallel_block_names_the_cause)")
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    res = logit_lens(m, tokens, point="resid_mid", top_k=5)
    assert res.labels == ["embed", *[f"{l}_mid" for l in range(L)], "final"]
    hooks = ["blocks.0.hook_resid_pre", *[f"blocks.{l}.hook_resid_mid" for l in range(L)], pre_hooks(L)[-1]]
    ref = tl_module_logits(m, cache, hooks)
    assert_lens_matches(res, ref, next_ids_of(tokens), f"{tiny.id} resid_mid", logit_space=True)
    tl = tl_logit_lens(m, cache=cache, positions=None, incl_mid=True, return_type="log_probs")
    keep = [i for i, lab in enumerate(tl.labels) if lab in ("0_pre", "final_post") or lab.endswith("_mid")]
    assert_lens_matches(res, tl.values[keep], next_ids_of(tokens), f"{tiny.id} resid_mid vs TL", logit_space=False)


# =============================================================================================== 3. tuned-lens
@pytest.fixture(scope="session")
def tuned_lens_api():
    pytest.importorskip("tuned_lens")
    import tuned_lens.model_surgery as ms

    ms._transformer_lens_available = False  # tuned-lens 0.2.0 crashes probing TL 4.x's (absent) HookedTransformer
    from tuned_lens.nn.lenses import LogitLens
    from tuned_lens.plotting import PredictionTrajectory

    return ms, LogitLens, PredictionTrajectory


def _tuned_logit_lens(api, hf, monkeypatch):
    ms, LogitLens, _ = api
    try:
        return LogitLens.from_model(hf)
    except NotImplementedError:
        # tuned-lens 0.2.0 predates Qwen2: point its final-norm lookup at the module (its decode code is unchanged)
        monkeypatch.setattr(ms, "get_final_norm", lambda model: model.base_model.norm)
        return LogitLens.from_model(hf)


def test_matches_tuned_lens_logit_lens(tiny, targets, tuned_lens_api, monkeypatch):
    _, _, PredictionTrajectory = tuned_lens_api
    m = tiny.model
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    lens = _tuned_logit_lens(tuned_lens_api, tiny.hf, monkeypatch)
    res = logit_lens(m, tokens, top_k=5, targets=targets, return_logits=True)

    # per-layer logits: tuned-lens index i reads hidden_states[i] (i = 0 is the embeddings)
    with torch.no_grad():
        hs = tiny.hf(tokens, output_hidden_states=True).hidden_states
        theirs = torch.stack([lens(hs[i], i) for i in range(L)]).double()  # [L, 1, S, V]
    if tiny.compat:
        close(res.logits[:L].log_softmax(-1), theirs.log_softmax(-1), f"{tiny.id} log-probs vs tuned-lens")
    else:
        close(res.logits[:L], theirs, f"{tiny.id} logits vs tuned-lens")

    # its trajectory statistics (numpy, float32): KL to the model, entropy, CE to the next token, ranks
    seq = tokens[0].tolist()
    t0 = res.target_ids[0].item()
    traj = PredictionTrajectory.from_lens_and_model(lens, tiny.hf, input_ids=seq, targets=seq[1:] + [seq[0]])
    lp = torch.from_numpy(traj.log_probs).double()  # [L + 1, S, V]
    assert_topk(res.top_ids[:, 0], (res.top_logits - res.logsumexp[..., None])[:, 0], lp, f"{tiny.id} vs tuned-lens")
    close(res.kl[:, 0], torch.from_numpy(traj.forward_kl().stats), f"{tiny.id} KL vs tuned-lens forward_kl", 2048 * EPS)
    close(res.entropy[:, 0], torch.from_numpy(traj.entropy().stats), f"{tiny.id} entropy vs tuned-lens", 2048 * EPS)
    ce = torch.from_numpy(traj.cross_entropy().stats)[:, :-1]
    close(res.cross_entropy[:, 0, :-1], ce, f"{tiny.id} CE vs tuned-lens", 2048 * EPS)
    traj_t = PredictionTrajectory.from_lens_and_model(lens, tiny.hf, input_ids=seq, targets=[t0] * len(seq))
    their_rank = torch.from_numpy(traj_t.rank().stats).long() - 1  # tuned-lens ranks are 1-based
    diff = their_rank != res.target_ranks[:, 0, :, 0]
    assert diff.float().mean() < 0.02, f"{tiny.id}: ranks differ from tuned-lens at {diff.nonzero()[:5].tolist()}"


# =============================================================================================== 4. options
@pytest.fixture(scope="module")
def full_runs():
    """Memoised full (all rows, all positions) runs, per model."""
    return {}


def _full(tm, full_runs, targets):
    if tm.id not in full_runs:
        tokens = tm.model.to_tokens(PROMPT)
        full_runs[tm.id] = (tokens, logit_lens(tm.model, tokens, top_k=5, targets=targets, return_logits=True))
    return full_runs[tm.id]


@pytest.mark.parametrize("positions", [[0, 3, 5], [-1, -3], 4, -2, [0]], ids=str)
def test_positions_subset(tiny_pair, full_runs, targets, positions):
    tokens, full = _full(tiny_pair, full_runs, targets)
    S = tokens.shape[1]
    res = logit_lens(tiny_pair.model, tokens, positions=positions, top_k=5, targets=targets)
    pos = [p % S for p in ([positions] if isinstance(positions, int) else positions)]
    assert res.positions == pos
    assert res.top_ids.shape[2] == len(pos)
    for field in ("top_ids", "top_logits", "kl", "entropy", "cross_entropy", "final_top1_rank", "target_ranks"):
        what = f"{tiny_pair.id} positions={positions} {field}"
        close(getattr(res, field), getattr(full, field)[:, :, pos], what, 128 * EPS)
    assert torch.equal(res.final_top1, full.final_top1[:, pos])
    # cross-entropy is undefined (NaN) at the last position only
    assert torch.isnan(res.cross_entropy[..., [i for i, p in enumerate(pos) if p == S - 1]]).all()
    assert not torch.isnan(res.cross_entropy[..., [i for i, p in enumerate(pos) if p != S - 1]]).any()
    ref = hf_lens_logits(tiny_pair, tokens)[:, :, pos]
    assert_lens_matches(res, ref, next_ids_of(tokens, pos), f"{tiny_pair.id} positions={positions}",
                        logit_space=not tiny_pair.compat)


@pytest.mark.parametrize("layers", [[0, -1], [-1], [1], [-2, 0], 0, [2, 1]], ids=str)
def test_layers_subset(tiny_pair, full_runs, targets, layers):
    tokens, full = _full(tiny_pair, full_runs, targets)
    R = len(full.labels)
    res = logit_lens(tiny_pair.model, tokens, layers=layers, top_k=5, targets=targets)
    rows = sorted({l % R for l in ([layers] if isinstance(layers, int) else layers)})
    assert res.labels == [full.labels[r] for r in rows]
    for field in ("top_ids", "top_logits", "logsumexp", "kl", "entropy", "cross_entropy", "final_top1_rank",
                  "target_ranks", "target_logprobs"):
        close(getattr(res, field), getattr(full, field)[rows], f"{tiny_pair.id} layers={layers} {field}", 128 * EPS)
    if rows[-1] == R - 1:
        res.verify()
    else:  # KL is still taken against the final distribution, but there is nothing to verify against
        with pytest.raises(VerificationError, match="final row"):
            res.verify()


def test_resid_post_rows_are_resid_pre_states(tiny_pair, full_runs, targets):
    tokens, full = _full(tiny_pair, full_runs, targets)
    L = tiny_pair.model.cfg.n_layers
    res = logit_lens(tiny_pair.model, tokens, point="resid_post", top_k=5, targets=targets)
    assert res.labels == ["embed", *[f"{l}_post" for l in range(L - 1)], "final"]
    assert res.point == "resid_post"
    # blocks.l.hook_resid_post is blocks.{l+1}.hook_resid_pre: the same states, the same numbers
    assert torch.equal(res.top_ids, full.top_ids)
    for field in ("top_logits", "kl", "entropy", "cross_entropy"):
        close(getattr(res, field), getattr(full, field), f"{tiny_pair.id} resid_post {field}", TIGHT)
    res.verify()


def test_resid_mid_on_parallel_block_names_the_cause(builder):
    """GPT-NeoX runs attention and MLP in parallel: there is no resid_mid. The error must say so, not blame a cache
    the user never passed (and should come before a forward pass is paid for)."""
    m = builder.get("neox", "raw").model
    assert m.cfg.parallel_attn_mlp
    before = hook_counts(m)
    with pytest.raises(LensInputError) as err:
        logit_lens(m, PROMPT, point="resid_mid")
    assert_no_hooks(m, before, "resid_mid on a parallel block")
    msg = str(err.value)
    assert "parallel" in msg and "resid_pre" in msg, f"unhelpful message: {msg}"


def test_batched_prompts_right_padding_masked(tiny, targets):
    m = tiny.model
    batch = logit_lens(m, PROMPTS, top_k=5, targets=targets)
    assert batch.tokens.shape[0] == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = logit_lens(m, prompt, top_k=5, targets=targets)
        n = single.tokens.shape[1]
        assert batch.valid[i].tolist() == [p < n for p in batch.positions], f"{tiny.id} prompt {i} valid mask"
        assert batch.str_tokens[i] == single.str_tokens[0]
        assert torch.equal(batch.tokens[i, :n], single.tokens[0])
        for field in ("top_ids", "top_logits", "logsumexp", "kl", "entropy", "cross_entropy", "final_top1_rank",
                      "target_ranks", "target_logprobs"):
            close(getattr(batch, field)[:, i, :n], getattr(single, field)[:, 0], f"{tiny.id} prompt {i} {field}", 256 * EPS)
        # no cross-entropy against a pad token at the last real position
        assert torch.isnan(batch.cross_entropy[:, i, n - 1]).all()
    assert batch.mean_over_positions(batch.kl).shape == (len(batch.labels),)
    batch.verify()


def test_batched_prompts_ignore_tokenizer_padding_side(llama_raw, targets):
    """A user who set ``tokenizer.padding_side = "left"`` (e.g. for ``generate``) must still get right numbers: the
    lens documents right-padding and computes its valid mask as ``position < length``."""
    m = llama_raw.model
    singles = [logit_lens(m, p, top_k=5, targets=targets) for p in PROMPTS]
    old = m.tokenizer.padding_side
    m.tokenizer.padding_side = "left"
    try:
        batch = logit_lens(m, PROMPTS, top_k=5, targets=targets, check=False)
    finally:
        m.tokenizer.padding_side = old
    for i, single in enumerate(singles):
        n = single.tokens.shape[1]
        assert batch.str_tokens[i] == single.str_tokens[0], f"prompt {i}: token strings"
        close(batch.kl[:, i][batch.valid[i][None].expand(len(batch.labels), -1)],
              single.kl[:, 0, : int(batch.valid[i].sum())].flatten(), f"left padding, prompt {i}: KL", 2e-5)
        assert int(batch.valid[i].sum()) == n


def test_cache_path_runs_no_forward_and_is_identical(tiny_pair, targets):
    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    direct = logit_lens(m, tokens, top_k=5, targets=targets)
    L = m.cfg.n_layers
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n)
    calls = []
    handles = [m.blocks[0].register_forward_pre_hook(lambda *a: calls.append("block0")),
               m.embed.register_forward_pre_hook(lambda *a: calls.append("embed"))]
    try:
        m(tokens[:, :2])  # the counter works
        assert calls, "the forward counter does not see a forward pass"
        calls.clear()
        from_cache = logit_lens(m, tokens, cache=cache, logits=logits, top_k=5, targets=targets)
        only_cache = logit_lens(m, cache=cache, logits=logits, top_k=5, targets=targets, check=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [], f"the cache= path ran a forward pass: {calls}"
    same_result(from_cache, direct, f"{tiny_pair.id} cache= vs direct")
    from_cache.verify()
    # without tokens: no next token (CE is NaN), but the rest is identical and verify() still works via logits=
    assert torch.isnan(only_cache.cross_entropy).all()
    assert torch.equal(only_cache.top_ids, direct.top_ids)
    close(only_cache.kl, direct.kl, f"{tiny_pair.id} cache only, KL", TIGHT)
    only_cache.verify()
    assert len(only_cache.labels) == L + 1


def test_return_logits_equal_the_oracles(tiny, targets):
    m = tiny.model
    L = m.cfg.n_layers
    tokens = m.to_tokens(PROMPT)
    res = logit_lens(m, tokens, top_k=5, targets=targets, return_logits=True)
    assert res.logits.shape == (L + 1, 1, tokens.shape[1], m.cfg.d_vocab)
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    close(res.logits, tl_module_logits(m, cache, pre_hooks(L)), f"{tiny.id} return_logits vs ln_final module")
    hf_ref = hf_lens_logits(tiny, tokens)
    if tiny.compat:
        close(res.logits.log_softmax(-1), hf_ref.log_softmax(-1), f"{tiny.id} return_logits log-probs vs HF")
    else:
        close(res.logits, hf_ref, f"{tiny.id} return_logits vs HF")
    # consistent with the streamed statistics
    close(res.logits.logsumexp(-1), res.logsumexp, f"{tiny.id} logsumexp of returned logits", 128 * EPS)
    close(res.logits.gather(-1, res.top_ids), res.top_logits, f"{tiny.id} returned logits at top ids", 128 * EPS)
    # with a subset, the returned logits are that subset
    sub = logit_lens(m, tokens, layers=[1, -1], positions=[2, -1], return_logits=True)
    close(sub.logits, res.logits[[1, L]][:, :, [2, tokens.shape[1] - 1]], f"{tiny.id} subset logits", 128 * EPS)


TILE_PROMPTS = ["The quick brown fox", "A city"]
TILE_POSITIONS = [0, 1, 2, 5, -1]  # 2 prompts x 5 positions = 10 vectors: ragged chunks of 3, 4, ...


@pytest.mark.parametrize("vocab_tile,top_k", [(64, 5), (3, 10)], ids=lambda v: str(v))
def test_fused_reductions_equal_eager(tiny_pair, targets, vocab_tile, top_k):
    """The torch.compile'd tile reduction (used on large jobs) gives the eager numbers, and both equal brute force."""
    from mi_lenses.lenses.stream import fused_tile_update

    assert fused_tile_update() is not None, "torch.compile is unavailable: the fast path would silently be off"
    m = tiny_pair.model
    kw = dict(positions=TILE_POSITIONS, top_k=top_k, targets=targets, vocab_tile=vocab_tile, position_chunk=3)
    eager = logit_lens(m, TILE_PROMPTS, fused=False, **kw)
    fused = logit_lens(m, TILE_PROMPTS, fused=True, return_logits=True, **kw)
    same_result(fused, eager, f"{tiny_pair.id} fused vs eager, vocab_tile={vocab_tile}")
    v = fused.valid
    o = oracle_stats(fused.logits, next_ids_of(m.to_tokens(TILE_PROMPTS), fused.positions))
    close(fused.kl[:, v], o["kl"][:, v], "fused KL vs brute force")
    close(fused.entropy[:, v], o["entropy"][:, v], "fused entropy vs brute force")


@pytest.mark.parametrize(
    "vocab_tile,position_chunk,top_k",
    [(7, 3, 5), (1, 64, 3), (3, 4, 10), (320, 5, 5), (100_000, 1000, 5), (319, 2, 1)],
    ids=lambda v: str(v),
)
def test_tiling_gives_identical_results(tiny_pair, targets, vocab_tile, position_chunk, top_k):
    """Vocabulary tiles and position chunks of every awkward size (1, smaller than top_k, not dividing the
    vocabulary of 320, one short of it, larger than it) give the same numbers as one big tile."""
    m = tiny_pair.model
    kw = dict(positions=TILE_POSITIONS, top_k=top_k, targets=targets, return_logits=True)
    ref = logit_lens(m, TILE_PROMPTS, vocab_tile=4096, position_chunk=4096, **kw)
    res = logit_lens(m, TILE_PROMPTS, vocab_tile=vocab_tile, position_chunk=position_chunk, **kw)
    assert not ref.valid.all() and ref.valid.any()  # the short prompt is padded at the selected positions
    same_result(res, ref, f"{tiny_pair.id} vocab_tile={vocab_tile} position_chunk={position_chunk} top_k={top_k}")
    close(res.logits[:, res.valid], ref.logits[:, ref.valid], "tiled logits", 128 * EPS)
    # and both equal the brute-force oracle on the returned logits (valid positions)
    v = res.valid
    tokens = m.to_tokens(TILE_PROMPTS)
    o = oracle_stats(ref.logits, next_ids_of(tokens, res.positions))
    assert_topk(res.top_ids[:, v], (res.top_logits - res.logsumexp[..., None])[:, v], o["logp"][:, v],
                "tiled vs brute force")
    close(res.kl[:, v], o["kl"][:, v], "tiled KL vs brute force")
    close(res.entropy[:, v], o["entropy"][:, v], "tiled entropy vs brute force")


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "float16"], ids=str)
def test_low_precision_error_is_small_and_reported(tiny_pair, targets, dtype):
    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    f32 = logit_lens(m, tokens, top_k=5, targets=targets)
    low = logit_lens(m, tokens, top_k=5, targets=targets, dtype=dtype)  # check=True: verify at the dtype's atol
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    assert low.dtype == name and f32.dtype == "float32"
    kl_err = (low.kl - f32.kl).abs().max().item()
    ent_err = (low.entropy - f32.entropy).abs().max().item()
    lp_err = (low.target_logprobs - f32.target_logprobs).abs().max().item()
    top1 = (low.top_ids[..., 0] == f32.top_ids[..., 0]).float().mean().item()
    print(f"\n{tiny_pair.id} {name}: max|dKL|={kl_err:.2e} max|dH|={ent_err:.2e} max|dlogp|={lp_err:.2e} "
          f"top1 agreement {top1:.3f}")
    # measured: bf16 ~1e-2 nats, fp16 ~2e-3 nats on these models
    bound = 0.05 if "bfloat16" in name else 0.01
    assert kl_err < bound and ent_err < bound and lp_err < 2 * bound
    assert top1 >= 0.9
    assert kl_err > 0 and lp_err > 0  # it really ran in low precision
    low.verify(atol=0.25)


# =============================================================================================== 5. bad input
def _multi_token_string(tokenizer) -> tuple[str, list[str]]:
    s = " capital"
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    return s, [tokenizer.decode([i]) for i in ids]


BAD_INPUTS = {
    "layer too large": (dict(layers=[99]), ["layer 99", "out of range"]),
    "layer too negative": (dict(layers=[-99]), ["layer -99", "out of range"]),
    "layer twice": (dict(layers=[0, -1, -1]), ["twice"]),
    "position too large": (dict(positions=[99]), ["position 99", "out of range"]),
    "position too negative": (dict(positions=-99), ["position -99", "out of range"]),
    "position bool": (dict(positions=True), ["position True"]),
    "unknown dtype": (dict(dtype="float64"), ["dtype", "float64", "bfloat16"]),
    "unknown torch dtype": (dict(dtype=torch.int8), ["dtype", "int8"]),
    "bad point": (dict(point="resid_foo"), ["resid_foo", "resid_pre"]),
    "top_k zero": (dict(top_k=0), ["top_k"]),
    "top_k too big": (dict(top_k=10_000), ["top_k"]),
    "target id out of range": (dict(targets=[10_000]), ["10000", "out of range"]),
    "empty target": (dict(targets=""), ["token"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_input_raises_clear_error_and_leaves_no_hooks(tiny_pair, case):
    m = tiny_pair.model
    kwargs, words = BAD_INPUTS[case]
    before = hook_counts(m)
    with pytest.raises(LensInputError) as err:
        logit_lens(m, PROMPT, **kwargs)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{case}: {w!r} not in {msg!r}"
    assert_no_hooks(m, before, case)


@pytest.mark.parametrize(
    "kwargs,equivalent",
    [
        (dict(positions=np.arange(3)), dict(positions=[0, 1, 2])),
        (dict(positions=torch.tensor([0, -1])), dict(positions=[0, -1])),
        (dict(positions=np.int64(2)), dict(positions=2)),
        (dict(layers=np.int64(1)), dict(layers=1)),
        (dict(layers=torch.tensor([0, -1])), dict(layers=[0, -1])),
    ],
    ids=["positions-np.arange", "positions-torch.tensor", "positions-np.int64", "layers-np.int64",
         "layers-torch.tensor"],
)
def test_integer_like_indices(llama_raw, kwargs, equivalent):
    """numpy / torch integers are integers: they must select the same rows and positions as Python ints (today they
    are refused with a false "position 0 is out of range for a sequence of 15 tokens", or a bare TypeError)."""
    m = llama_raw.model
    try:
        res = logit_lens(m, PROMPT, **kwargs)
    except LensInputError as err:
        pytest.fail(f"{kwargs}: refused with {err}")
    except TypeError as err:
        pytest.fail(f"{kwargs}: raw TypeError {err}")
    same_result(res, logit_lens(m, PROMPT, **equivalent), f"{kwargs} vs {equivalent}")


def test_multi_token_target_names_its_pieces(tiny_pair):
    m = tiny_pair.model
    s, pieces = _multi_token_string(tiny_pair.tokenizer)
    before = hook_counts(m)
    with pytest.raises(LensInputError) as err:
        logit_lens(m, PROMPT, targets=[s])
    msg = str(err.value)
    assert repr(s) in msg and "not a single token" in msg and f"{len(pieces)} tokens" in msg
    for piece in pieces:
        assert repr(piece) in msg, f"piece {piece!r} not named in {msg!r}"
    assert_no_hooks(m, before, "multi-token target")


@pytest.mark.parametrize(
    "arch,prompt,kwargs",
    [
        ("qwen2", "", {}),  # qwen2 prepends no BOS by default: no token at all
        ("qwen2", [], {}),
        ("qwen2", [PROMPT, ""], {}),
        ("llama_gqa", "", dict(prepend_bos=False)),  # BOS by default, but not asked for here
        ("llama_gqa", [PROMPT, ""], dict(prepend_bos=False)),
        ("llama_gqa", torch.zeros(1, 0, dtype=torch.long), {}),
    ],
    ids=["qwen2-str", "qwen2-list", "qwen2-list-with-empty", "llama-nobos-str", "llama-nobos-list-with-empty",
         "llama-empty-tokens"],
)
def test_empty_prompt(builder, arch, prompt, kwargs):
    m = builder.get(arch, "raw").model
    before = hook_counts(m)
    with pytest.raises(LensInputError, match="(?i)empty prompt|no prompt|pos >= 1"):
        logit_lens(m, prompt, **kwargs)
    assert_no_hooks(m, before, f"empty prompt {prompt!r}")


def test_cache_missing_hooks(tiny_pair):
    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")
    before = hook_counts(m)
    with pytest.raises(LensInputError) as err:
        logit_lens(m, tokens, cache=cache, logits=logits)
    msg = str(err.value)
    assert "blocks.1.hook_resid_pre" in msg and "names_filter" in msg
    assert_no_hooks(m, before, "cache missing hooks")
    # tokens that do not belong to the cache
    _, full_cache = m.run_with_cache(tokens)
    with pytest.raises(LensInputError, match=r"do not match the cache"):
        logit_lens(m, tokens[:, :-1], cache=full_cache)
    with pytest.raises(LensInputError, match=r"(?i)pass a prompt"):
        logit_lens(m)
    assert_no_hooks(m, before, "cache/tokens mismatch")


def test_hooks_removed_when_the_forward_raises(tiny_pair):
    """An exception inside the forward pass (here: from a user's torch hook) must not leave the lens's hooks."""
    m = tiny_pair.model
    before = hook_counts(m)

    def boom(*args):
        raise RuntimeError("boom in the forward")

    handle = m.blocks[-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            logit_lens(m, PROMPT)
        after = hook_counts(m)
    finally:
        handle.remove()
    assert not [k for k in after if k.startswith("hookpoint:")], f"TL caching hooks left after an exception: {after}"
    assert_no_hooks(m, before, "exception in the forward")


def test_hook_check_detects_left_hooks(llama_raw):
    """The hook check used above has power: it sees a TL hook and a raw torch hook left on the model."""
    m = llama_raw.model
    before = hook_counts(m)
    m.add_hook("blocks.0.hook_resid_pre", lambda x, hook: None)
    try:
        with pytest.raises(AssertionError, match="TL hooks left"):
            assert_no_hooks(m, before, "deliberate TL hook")
    finally:
        m.reset_hooks()
    assert_no_hooks(m, before, "after reset_hooks")
    handle = m.blocks[1].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(AssertionError, match="hooks changed"):
            assert_no_hooks(m, before, "deliberate torch hook")
    finally:
        handle.remove()
    assert_no_hooks(m, before, "after handle.remove()")


# =============================================================================================== 6. power
class _WrongDecode:
    """Proxy of a bridge whose final norm is misreported to ModelView (forgets the gain, the bias, or the norm)."""

    def __init__(self, model, mode: str):
        self._model, self._mode = model, mode
        if mode == "no_norm":
            import copy

            self.cfg = copy.copy(model.cfg)
            self.cfg.normalization_type = None
        else:
            self.cfg = model.cfg
        if mode == "no_bias":  # a LayerNorm with the real gain and no bias
            ln = torch.nn.Module()
            ln.weight = torch.nn.Parameter(model.ln_final._original_component.weight.detach().clone())
            ln.eps = float(model.ln_final._original_component.eps)
            self.ln_final = ln
        elif mode in ("no_gain", "no_norm"):
            self.ln_final = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):  # a forward pass is the model's (magic methods bypass __getattr__)
        return self._model(*args, **kwargs)


@pytest.mark.parametrize(
    "arch,mode,wrong",
    [("llama_gqa", "raw", "no_gain"), ("llama_tied", "raw", "no_gain"), ("gpt2", "raw", "no_gain"),
     ("gpt2", "raw", "no_bias"), ("neox", "raw", "no_bias"), ("gpt2", "compat", "no_norm"),
     ("qwen2", "compat", "no_norm")],
    ids=lambda v: str(v),
)
def test_oracles_have_power_against_a_wrong_decode(builder, targets, arch, mode, wrong):
    """The same pipeline with a deliberately wrong decode fails the oracle comparison and the built-in identity."""
    tm = builder.get(arch, mode)
    bad = _WrongDecode(tm.model, wrong)
    tokens = tm.model.to_tokens(PROMPT)
    res = run_lens(mi_lenses.LogitLens(), bad, tokens, top_k=5, targets=targets, check=False)
    ref = hf_lens_logits(tm, tokens)
    with pytest.raises(AssertionError):
        assert_lens_matches(res, ref, next_ids_of(tokens), f"{tm.id} with {wrong}", logit_space=not tm.compat)
    # the errors are gross, not borderline
    o = oracle_stats(ref, next_ids_of(tokens))
    err = (res.kl[:-1] - o["kl"][:-1]).abs().max().item() + (res.entropy - o["entropy"]).abs().max().item()
    assert err > 100 * TOL, f"{wrong}: a wrong decode is only {err:.1e} off: the tests would not see it"
    # mi_lenses' own identity check catches it (the final row no longer reproduces the model)
    with pytest.raises(VerificationError, match="differs from the model"):
        run_lens(mi_lenses.LogitLens(), bad, tokens, top_k=5)


def test_wrong_epsilon_is_visible(builder):
    """llama_tied has eps = 2e-2: decoding its embedding row with a default eps of 1e-6 is measurably wrong."""
    tm = builder.get("llama_tied", "raw")
    view = ModelView(tm.model)
    tokens = tm.model.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = tm.model.run_with_cache(tokens)
    x = cache["blocks.0.hook_resid_pre"].float()
    W = view.decoder.W
    wrong = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) @ W
    ref = hf_lens_logits(tm, tokens)[0]
    assert (wrong.double().log_softmax(-1) - ref.log_softmax(-1)).abs().max() > 100 * TOL
    close(view.decode(x), ref, "decode of the embedding row with the model's eps")


def test_verify_has_power(llama_raw):
    res = logit_lens(llama_raw.model, PROMPT)
    res.verify()
    res.top_logits[-1, 0, 2, 0] += 0.01
    with pytest.raises(VerificationError, match="differs from the model"):
        res.verify()
