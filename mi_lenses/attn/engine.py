"""Attention: every head's pattern, its standard diagnostics, and the ``q · k`` terms behind every score.

:func:`attention` runs in four steps like every engine here: **prepare** (check the options before any forward
pass), **forward** (one pass caching :func:`required_hooks`, or a cache you already have), **reduce** (patterns
re-indexed by each prompt's own tokens, per-head diagnostics, the query/key identity checked against
``hook_attn_scores``) and **assemble** (an :class:`~mi_lenses.attn.result.AttentionResult`, verified).

Per head and prompt (queries ``1 .. n-1``: query 0 can only attend to itself):

* **sink share**: the mean attention on the prompt's first token (the BOS token where the model prepends one);
* **entropy**: the mean entropy of the attention rows (bits; 0 = always one key);
* **previous-token score**: the mean attention from token ``i`` to token ``i - 1``.

Per head, on a separate run of repeated random tokens ``[BOS?] r r`` (``len(r) = induction_length``, the
TransformerLens induction diagnostic): the **induction score**, the mean attention from each token ``i`` of the second
copy to token ``i - len(r) + 1``, the token after its earlier occurrence.

Example:
    >>> res = mi_lenses.attention(model, "The capital of France is")
    >>> tuple(res.patterns.shape)       # prompts x layers x heads x queries x keys
    (1, 3, 6, 6, 6)
    >>> tuple(res.sink.shape), tuple(res.induction.shape)
    ((1, 3, 6), (3, 6))
    >>> terms = res.qk_terms(1, 4)      # layer 1, head 4, last query: scale * q_d * k_d per key and dimension
    >>> bool(torch.allclose(terms.products.sum(-1), terms.scores, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mi_lenses.attn.interventions import unreproduced_heads
from mi_lenses.attn.result import VERIFY_TOL, AttentionResult
from mi_lenses.attn.scores import causal_scores
from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec, resolve_indices
from mi_lenses.models.batch import Batch, Cached, PromptInput, cached_forward
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView

DEFAULT_INDUCTION_LENGTH = 40


def required_hooks(model: Any, layers: IndexSpec = None, *, qk: bool = True) -> list[str]:
    """Every hook :func:`attention` reads (pass it as ``names_filter`` to keep a cache small): the patterns, and with
    ``qk`` the attention scores and the queries/keys that make them."""
    view = ModelView(model)
    names = []
    for l in resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks"):
        names.append(view.attn_hook(l, "pattern"))
        if qk:
            names += [view.attn_hook(l, "attn_scores"), *view.qk_hooks(l)]
    return names


def attention(
    model: Any,
    input: PromptInput | Any = None,
    *,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    layers: IndexSpec = None,
    prepend_bos: bool | None = None,
    induction_length: int | None = None,
    induction_batch: int = 4,
    seed: int = 0,
    qk: bool = True,
    beyond_context: bool = False,
    progress: bool = True,
    check: bool = True,
) -> AttentionResult:
    """Attention patterns ``[batch, layer, head, query, key]`` of ``input`` (or of a cache), with per-head
    diagnostics and the per-dimension ``q · k`` terms behind every score (see the module docstring).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        input: a prompt, a list of prompts (right-padded; padding is masked), token ids ``[batch, pos]``, or an
            ``ActivationCache`` (the same as ``cache=``). With ``cache`` it only supplies the token strings.
        cache: an ``ActivationCache`` holding the patterns (and, for the q·k terms, the queries and keys:
            :func:`required_hooks`); no forward pass is run on the prompt.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right).
        layers: blocks to keep (negative allowed); default all.
        prepend_bos: override the model's BOS default when tokenising text and building the induction sequence.
        induction_length: length of the random sequence ``r`` of the induction diagnostic; default
            ``DEFAULT_INDUCTION_LENGTH`` (40) or as many as the model's context holds; ``0`` skips it.
        induction_batch: random sequences averaged over; ``seed`` draws them.
        qk: keep the queries and keys after rotary (``[batch, layer, pos, head, d_head]``) for
            :meth:`~mi_lenses.attn.result.AttentionResult.qk_terms` (the neuron view).
        beyond_context: accept prompts longer than the model's context (``cfg.n_ctx``).
        progress: show a bar over a long forward pass.
        check: verify the patterns (rows sum to one, causal), and that ``scale * q · k`` reproduces the model's
            ``hook_attn_scores`` and its softmax the patterns.

    Returns:
        :class:`~mi_lenses.attn.result.AttentionResult`; positions count in each prompt's own tokens, padding is NaN.
    """
    view = ModelView(model)
    hooks = active_hooks(view.model)
    if cache is None and _is_cache(input):
        cache, input = input, None
    # prepare
    if induction_length is None:
        n_ctx = int(getattr(view.cfg, "n_ctx", 0) or 0)
        induction_length = DEFAULT_INDUCTION_LENGTH if not n_ctx else min(DEFAULT_INDUCTION_LENGTH, (n_ctx - 1) // 2)
    for name, v, low in (("induction_length", induction_length, 0), ("induction_batch", induction_batch, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise LensInputError(f"{name} must be an int >= {low}, got {v!r}.")
    chosen = resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks")
    unsupported = view.qk_unsupported() if qk else "qk=False was passed"
    users = cache is not None
    # forward, reduce
    run = cached_forward(view, input, names=required_hooks(view, chosen, qk=unsupported is None), what="attention()",
                         cache=cache, attention_mask=attention_mask, prepend_bos=prepend_bos,
                         required=[view.attn_hook(chosen[0], "pattern")],
                         hint=" (or with mi_lenses.attn.required_hooks(model))", beyond_context=beyond_context,
                         progress=progress)
    batch, cache = run.batch, run
    parts = _reduce(view, cache, batch, chosen, unsupported is None, users)
    model_dtype = str(view.dtype).replace("torch.", "")
    qk_unavailable = unreproduced_heads(parts, batch.lengths, chosen, hooks,
                                        VERIFY_TOL.get(model_dtype, VERIFY_TOL["float32"])) if hooks else {}
    unsupported = unsupported or parts.qk_note
    induction, ind_tokens = (None, None)
    if induction_length:
        induction, ind_tokens = _induction(view, chosen, induction_length, induction_batch, seed, prepend_bos)
    sink, entropy, previous = _diagnostics(parts.patterns, batch.lengths)
    # assemble
    result = AttentionResult(
        model_name=view.name,
        layers=chosen,
        n_heads=view.n_heads,
        n_kv_heads=view.n_kv_heads,
        str_tokens=view.str_tokens(batch, known=input is not None),
        lengths=list(batch.lengths),
        patterns=parts.patterns,
        sink=sink,
        entropy=entropy,
        previous_token=previous,
        induction=induction,
        induction_tokens=ind_tokens,
        q=parts.q,
        k=parts.k,
        scale=parts.scales,
        score_error=parts.score_error,
        qk_note=unsupported,
        qk_unavailable=qk_unavailable,
        model_dtype=model_dtype,
    )
    if check:
        result.verify()
    return recorded(result, hooks)


# ------------------------------------------------------------------------------------------------ reduce
@dataclass
class _Parts:
    patterns: Tensor  # [B, L, H, S, S], each prompt's own tokens, padding NaN
    q: Tensor | None  # [B, L, S, H, d] after rotary
    k: Tensor | None  # [B, L, S, KV, d]
    scales: list[float]
    score_error: Tensor  # [L], NaN where the cache has no hook_attn_scores
    qk_note: str | None  # why q and k are not kept


def _reduce(view: ModelView, cache: Cached, batch: Batch, layers: list[int], qk: bool, users: bool) -> _Parts:
    """Patterns, queries and keys of every layer re-indexed by each prompt's own tokens, and the largest error of
    ``scale * q · k`` against the cached ``hook_attn_scores``."""
    B, S = batch.shape
    L, H = len(layers), view.n_heads
    out = _Parts(torch.full((B, L, H, S, S), torch.nan), None, None, [view.attn_scale(l) for l in layers],
                 torch.full((L,), torch.nan), None)
    for i, l in enumerate(layers):
        pattern = cache.get(view.attn_hook(l, "pattern"))
        if pattern is None:
            raise LensInputError(f"the cache has no {view.attn_hook(l, 'pattern')!r} (it holds block "
                                 f"{layers[0]}'s): cache every layer you ask for, or pass layers=.")
        out.patterns[:, i] = batch.own_positions(pattern.detach().float().cpu(), dims=(-2, -1))
        if not qk or out.qk_note:
            continue
        try:
            q, k = view.attn_qk(cache, l)
        except LensInputError as err:
            # everything but the q·k terms: a user's cache without the queries and keys, or a model whose bridge
            # exposes neither its rotated queries/keys nor the rotation
            out.q = out.k = None
            out.qk_note = ("the cache holds no queries/keys (run_with_cache without a names_filter)" if users
                           else f"the q·k terms are not available: {err}")
            continue
        q, k = q.detach().float().cpu(), k.detach().float().cpu()
        if out.q is None:
            out.q = torch.full((B, L, S, H, view.d_head), torch.nan)
            out.k = torch.full((B, L, S, k.shape[2], view.d_head), torch.nan)
        out.q[:, i] = batch.own_positions(q, dims=(1,))
        out.k[:, i] = batch.own_positions(k, dims=(1,))
        scores = cache.get(view.attn_hook(l, "attn_scores"))
        if scores is not None:
            out.score_error[i] = _score_error(out.q[:, i], out.k[:, i], out.scales[i],
                                              batch.own_positions(scores.detach().float().cpu(), dims=(-2, -1)),
                                              batch.lengths, out.patterns[:, i])
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _is_cache(obj: Any) -> bool:
    """An ActivationCache (or a dict of hook tensors) given where the prompt goes."""
    return obj is not None and not isinstance(obj, (str, Tensor, list, tuple)) and hasattr(obj, "keys")


def _score_error(q: Tensor, k: Tensor, scale: float, scores: Tensor, lengths: list[int],
                 patterns: Tensor | None = None) -> float:
    """The largest ``|scale * q · k - hook_attn_scores|`` over real causal entries, relative to the scores' size.

    The check compares with what the hook really holds: on some bridges (OPT) ``hook_attn_scores`` fires on the
    post-softmax pattern; when it equals ``patterns`` (``[B, H, S, S]``, each prompt's own tokens) the error is
    ``|softmax(scale * q · k) - hook_attn_scores|`` instead."""
    worst = 0.0
    for b, n in enumerate(lengths):
        ours = causal_scores(q[b], k[b], scale, n)
        theirs = scores[b, :, :n, :n]
        if patterns is not None and torch.allclose(theirs, patterns[b, :, :n, :n], atol=1e-6, equal_nan=True):
            ours = ours.softmax(-1)
        keep = torch.isfinite(ours)
        err = (ours[keep] - theirs[keep]).abs().max().item()
        worst = max(worst, err / max(1.0, theirs[keep].abs().max().item()))
    return worst


def _diagnostics(patterns: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Sink share, entropy (nats) and previous-token score ``[B, L, H]`` over queries ``1 .. n-1``."""
    B, L, H = patterns.shape[:3]
    sink, ent, prev = (torch.full((B, L, H), torch.nan) for _ in range(3))
    for b, n in enumerate(lengths):
        if n < 2:
            continue
        p = patterns[b, :, :, :n, :n]
        rows = p[:, :, 1:, :]
        sink[b] = rows[..., 0].mean(-1)
        ent[b] = -torch.special.xlogy(rows, rows).sum(-1).mean(-1)
        prev[b] = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(-1)
    return sink, ent, prev


def _induction(view: ModelView, layers: list[int], n: int, rows: int, seed: int,
               prepend_bos: bool | None) -> tuple[Tensor, Tensor]:
    """Induction score ``[L, H]`` on ``rows`` sequences ``[BOS?] r r`` of distinct random non-special tokens."""
    bos = view.prepends_bos if prepend_bos is None else prepend_bos
    tok = view.tokenizer
    special = set(getattr(tok, "all_special_ids", None) or [])
    n_vocab = min(view.d_vocab, len(tok)) if tok is not None else view.d_vocab
    allowed = torch.tensor([i for i in range(n_vocab) if i not in special])
    n_ctx = int(getattr(view.cfg, "n_ctx", 0) or 0)
    if n_ctx and 2 * n + int(bos) > n_ctx:
        raise LensInputError(f"induction_length={n} needs {2 * n + int(bos)} positions but the model has "
                             f"n_ctx={n_ctx}: use induction_length <= {(n_ctx - int(bos)) // 2}.")
    if len(allowed) < n:
        raise LensInputError(f"induction_length={n} needs {n} distinct tokens; the vocabulary has {len(allowed)}.")
    g = torch.Generator().manual_seed(seed)
    r = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:n]] for _ in range(rows)])
    parts = [r, r]
    if bos:
        bos_id = getattr(tok, "bos_token_id", None)
        if bos_id is None:
            raise LensInputError("prepend_bos is on but the tokenizer has no BOS token: pass prepend_bos=False.")
        parts.insert(0, torch.full((rows, 1), int(bos_id)))
    tokens = torch.cat(parts, 1)
    S = tokens.shape[1]
    _, cache = view.run_with_cache(Batch(tokens.to(view.device), [S] * rows, [0] * rows),
                                   [view.attn_hook(l, "pattern") for l in layers])
    second = torch.arange(S - n, S)  # the second copy of r
    scores = torch.stack([cache[view.attn_hook(l, "pattern")].detach().float().cpu()[:, :, second, second - n + 1]
                          .mean((0, 2)) for l in layers])
    return scores, tokens
