"""Independent oracles shared by the test modules: brute-force lens statistics in float64 from an untouched HF model,
and comparisons that handle near-ties (a top-k id or a rank must be right wherever the oracle's logits are separated
by more than the tolerance, and lie within the tie bracket elsewhere)."""

from __future__ import annotations

import math

import torch

from tiny import hook_counts
from tolerance import EPS

TOL = 1024 * EPS  # relative and absolute, float32 pipeline vs float64 oracle
TIE = 256 * EPS  # logits closer than this count as tied (float32 rounding is ~1e-6 here)


def close(actual, expected, what: str, tol: float = TOL) -> None:
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    torch.testing.assert_close(
        actual, expected, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def hf_final_norm(hf):
    base = hf.base_model
    for attr in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise AssertionError(f"no final norm found on {type(base).__name__}")


@torch.no_grad()
def hf_lens_logits(tm, tokens: torch.Tensor) -> torch.Tensor:
    """Brute-force logit lens on the HF model: ``[L + 1, B, S, V]`` (rows embed, 1_pre .. L-1_pre, final), float64."""
    hf = tm.hf
    out = hf(tokens, output_hidden_states=True)
    hs = out.hidden_states
    L = tm.model.cfg.n_layers
    assert len(hs) == L + 1
    norm, head = hf_final_norm(hf), hf.get_output_embeddings()
    # oracle self-check: HF's last hidden state is the final-normed stream
    close(head(hs[L]), out.logits, "HF oracle self-check (lm_head(hidden_states[-1]) == logits)", tol=128 * EPS)
    rows = [head(norm(hs[i])) for i in range(L)] + [out.logits]
    return torch.stack(rows).double()


@torch.no_grad()
def next_ids_of(tokens: torch.Tensor, positions=None) -> torch.Tensor:
    nxt = torch.full_like(tokens, -1)
    nxt[:, :-1] = tokens[:, 1:]
    return nxt if positions is None else nxt[:, positions]


def assert_ranks(ours, ref, ids, what: str, tol: float = TIE) -> None:
    """``ours[..., t]`` must be the number of entries of ``ref[..., :]`` strictly above ``ref[..., ids[..., t]]``,
    up to ties within ``tol``; and it must be exact wherever there is no such tie."""
    ref = ref.double()
    val = ref.gather(-1, ids)
    lo = (ref[..., None, :] > val[..., None] + tol).sum(-1)
    hi = (ref[..., None, :] > val[..., None] - tol).sum(-1) - 1  # minus the token itself
    bad = (ours < lo) | (ours > hi)
    assert not bad.any(), f"{what}: ranks {ours[bad][:5].tolist()} outside oracle brackets {lo[bad][:5].tolist()}.." \
        f"{hi[bad][:5].tolist()}"
    undetermined = int((lo != hi).sum())
    assert undetermined <= max(2, 0.1 * lo.numel()), f"{what}: too many near-ties for a meaningful check"


def assert_topk(ids, logprobs, ref_logprobs, what: str, tol: float = TOL, tie: float = TIE) -> None:
    """Our top-k ids/log-probs ``[..., k]`` against full oracle log-probs ``[..., V]``."""
    k = ids.shape[-1]
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all(), f"{what}: repeated ids in a top-k list"
    vals, rids = ref_logprobs.double().topk(k + 1, dim=-1)
    close(logprobs, vals[..., :k], f"{what}: top-k log-probs (sorted values)", tol)
    close(ref_logprobs.gather(-1, ids), logprobs, f"{what}: oracle log-prob at our top-k ids", tol)
    gaps = vals[..., :-1] - vals[..., 1:]  # [..., k]
    before = torch.cat([torch.full_like(gaps[..., :1], math.inf), gaps[..., :-1]], -1)
    isolated = (before > tie) & (gaps > tie)
    assert int((~isolated).sum()) <= max(2, 0.1 * isolated.numel()), f"{what}: too many near-ties for a check"
    mismatch = isolated & (ids != rids[..., :k])
    assert not mismatch.any(), f"{what}: top-k ids differ from the oracle at {mismatch.nonzero()[:5].tolist()}"


def oracle_stats(logits: torch.Tensor, next_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic of the lens, brute force in float64 from full logits ``[R, B, P, V]``."""
    logits = logits.double()
    logp = logits.log_softmax(-1)
    R = logp.shape[0]
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    nxt = next_ids.clamp(min=0)[None, ..., None].expand(R, *next_ids.shape, 1)
    ce = torch.where(next_ids[None] >= 0, -logp.gather(-1, nxt)[..., 0], torch.nan)
    return {"logits": logits, "logp": logp, "kl": kl, "entropy": entropy, "ce": ce}


def assert_lens_matches(res, ref_logits, next_ids, what: str, *, logit_space: bool, tol: float = TOL) -> None:
    """A LensResult (rows x batch x positions) against full oracle logits of the same rows/positions.

    ``logit_space``: also compare raw logits and logsumexp (not for compatibility mode, whose logits are shifted).
    """
    o = oracle_stats(ref_logits, next_ids)
    R, B, P, k = res.top_ids.shape
    assert o["logp"].shape[:3] == (R, B, P), (o["logp"].shape, res.top_ids.shape)
    ours_lp = res.top_logits - res.logsumexp[..., None]
    assert_topk(res.top_ids, ours_lp, o["logp"], f"{what} top-k", tol)
    if logit_space:
        close(res.top_logits, o["logits"].gather(-1, res.top_ids), f"{what} top-k logits", tol)
        close(res.logsumexp, o["logits"].logsumexp(-1), f"{what} logsumexp", tol)
    close(res.kl, o["kl"], f"{what} KL(final || row) [nats]", tol)
    close(res.entropy, o["entropy"], f"{what} entropy [nats]", tol)
    close(res.cross_entropy, o["ce"], f"{what} cross-entropy to the next token [nats]", tol)
    # the final top-1 is the oracle's top-1 (up to ties), and its rank at every row is right
    final_lp = o["logp"][-1]
    close(final_lp.gather(-1, res.final_top1[..., None])[..., 0], final_lp.max(-1).values, f"{what} final top-1", tol)
    f_ids = res.final_top1[None, ..., None].expand(R, B, P, 1)
    assert_ranks(res.final_top1_rank[..., None], o["logp"], f_ids, f"{what} rank of the final top-1")
    T = len(res.target_ids)
    if T:
        t_ids = res.target_ids.view(1, 1, 1, T).expand(R, B, P, T)
        assert_ranks(res.target_ranks, o["logp"], t_ids, f"{what} target ranks")
        close(res.target_logprobs, o["logp"].gather(-1, t_ids), f"{what} target log-probs", tol)


def target_ids_of(tokenizer, targets) -> list[int]:
    return [t if isinstance(t, int) else tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in targets]


def same_result(a, b, what: str, tol: float = 1e-5) -> None:
    """Two LensResults over the same rows/positions agree (ids exactly, values within ``tol``).

    Padding positions are skipped: there the state can be exactly zero (a zero pad embedding), every logit ties and
    the top-k order is arbitrary.
    """
    assert a.labels == b.labels, what
    assert torch.equal(a.valid, b.valid), f"{what}: valid mask"
    v = a.valid
    assert torch.equal(a.top_ids[:, v], b.top_ids[:, v]), f"{what}: top ids"
    for field in ("top_logits", "logsumexp", "entropy", "kl", "cross_entropy", "target_logprobs"):
        close(getattr(a, field)[:, v], getattr(b, field)[:, v], f"{what}: {field}", tol)
    for field in ("final_top1_rank", "target_ranks"):
        assert torch.equal(getattr(a, field)[:, v], getattr(b, field)[:, v]), f"{what}: {field}"
    assert torch.equal(a.final_top1[v], b.final_top1[v]), f"{what}: final_top1"


def assert_no_hooks(model, before: dict[str, int], what: str) -> None:
    after = hook_counts(model)
    assert not [k for k in after if k.startswith("hookpoint:")], f"{what}: TL hooks left: {after}"
    assert after == before, f"{what}: hooks changed: before {before}, after {after}"


def final_with_state(m, tokens, hook_name: str, final_hook: str, t: int, s):
    """The final residual stream ``[S, d]`` of one prompt whose state at ``hook_name``, position ``t``, is replaced
    by ``s`` (differentiable in ``s``): an independent path to the Jacobians of the Jacobian lens and the LRE."""
    got = {}

    def put(act, hook=None):
        act = act.clone()
        act[0, t] = s
        return act

    def keep(act, hook=None):
        got["final"] = act
        return act

    with m.hooks(fwd_hooks=[(hook_name, put), (final_hook, keep)]):
        m(tokens)
    return got["final"][0]
