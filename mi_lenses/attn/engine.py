"""Attention: every head's pattern, its standard diagnostics, and the ``q · k`` terms behind every score.

:func:`attention` runs in four steps like every engine here: **prepare** (check the options before any forward
pass), **forward** (one pass caching :func:`required_hooks`, or a cache you already have), **reduce** (patterns
re-indexed by each prompt's own tokens, per-head diagnostics, the query/key identity checked against
``hook_attn_scores``) and **assemble** (an :class:`~mi_lenses.attn.result.AttentionResult`, verified).

Per head and prompt (queries ``1 .. n-1``: query 0 can only attend to itself):

* **sink share**: the mean attention on the prompt's first token (the BOS token where the model prepends one);
* **entropy**: the mean entropy of the attention rows (bits; 0 = always one key);
* **previous-token score**: the mean attention from token ``i`` to token ``i - 1``.

With ``last_queries=W`` (for long prompts, where ``[batch, layers, heads, pos, pos]`` does not fit in memory) only
the pattern rows of each prompt's last ``W`` queries are kept, with each head's whole pattern max-pooled to an image
(``THUMBNAIL`` pixels a side): every layer's pattern is reduced as it passes through the forward pass, and the
diagnostics still read every row.

Per head, on a separate run of repeated random tokens ``[BOS?] r r`` (``len(r) = induction_length``, the
TransformerLens induction diagnostic): the **induction score**, the mean attention from each token ``i`` of the second
copy to token ``i - len(r) + 1``, the token after its earlier occurrence.

Example:
    >>> res = mi_lenses.attention(model, "The capital of France is")
    >>> tuple(res.patterns.shape)       # prompts x layers x heads x queries x keys
    (1, 3, 6, 6, 6)
    >>> _, cache = model.run_with_cache(model.to_tokens("The capital of France is"))
    >>> bool(torch.allclose(res.patterns[0, 1], cache["blocks.1.attn.hook_pattern"][0], atol=1e-6))   # the model's
    True
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
from mi_lenses.attn.scores import probabilities, row_scores
from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec, resolve_indices
from mi_lenses.models.batch import Batch, Cached, PromptInput, Reduction, cached_forward, derived, make_batch
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.masks import LayerMask, attention_masks
from mi_lenses.models.view import ModelView

DEFAULT_INDUCTION_LENGTH = 40
THUMBNAIL = 200  # side of each head's pooled pattern image kept with last_queries (the head view's image size)
ROW_CHUNK = 64  # query rows reduced at a time (the temporaries stay in the cache on long prompts)
PATTERN_KEYS = ("rows", "thumbnail", "sink", "entropy", "previous_token")  # what attention_reductions keeps


def required_hooks(model: Any, layers: IndexSpec = None, *, qk: bool = True) -> list[str]:
    """Every hook :func:`attention` reads (pass it as ``names_filter`` to keep a cache small): the patterns, and with
    ``qk`` the attention scores and the queries/keys that make them."""
    view = ModelView(model)
    names = []
    for l in attention_layers(view, layers)[0]:
        names.append(view.attn_hook(l, "pattern"))
        if qk:
            names += [view.attn_hook(l, "attn_scores"), *view.qk_hooks(l)]
    return names


def attention_layers(view: ModelView, layers: IndexSpec) -> tuple[list[int], str | None]:
    """The blocks ``layers`` names (default: every block with attention heads) and a note naming the blocks left out
    because they mix tokens without heads (state-space and hybrid models; :mod:`mi_lenses.models.layout`)."""
    chosen = resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks")
    heads = set(view.attn_layers)
    if set(chosen) <= heads:
        return chosen, None
    others = ", ".join(f"{l} ({view.layout(l).mixer or 'MLP'})" for l in chosen if l not in heads)
    if not heads:
        raise LensInputError(f"this model has no attention heads TransformerLens exposes (blocks {others}): "
                             "attention() has nothing to read; use the logit lens or DLA, which read every block.")
    if layers is not None:
        raise LensInputError(f"blocks {others} have no attention heads TransformerLens exposes (this model mixes "
                             f"tokens there without them): pick layers among {sorted(heads)}.")
    return [l for l in chosen if l in heads], f"blocks {others} have no attention heads: left out"


def attention(
    model: Any,
    prompt: PromptInput | Any = None,
    *,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    layers: IndexSpec = None,
    prepend_bos: bool | None = None,
    induction_length: int | None = None,
    induction_batch: int = 4,
    seed: int = 0,
    qk: bool = True,
    last_queries: int | None = None,
    beyond_context: bool = False,
    progress: bool = True,
    check: bool = True,
) -> AttentionResult:
    """Attention patterns ``[batch, layer, head, query, key]`` of ``prompt`` (or of a cache), with per-head
    diagnostics and the per-dimension ``q · k`` terms behind every score (see the module docstring).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        prompt: a prompt, a list of prompts (right-padded; padding is masked), token ids ``[batch, pos]``, or an
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
        last_queries: keep the pattern rows (and queries) of each prompt's last ``last_queries`` tokens only, and
            each head's whole pattern max-pooled to ``THUMBNAIL`` x ``THUMBNAIL``; the diagnostics still read every
            row (for long prompts: see the module docstring). Default: every row.
        beyond_context: accept prompts longer than the model's context (``cfg.n_ctx``).
        progress: show a bar over a long forward pass.
        check: verify the patterns (rows sum to one, causal), and that ``scale * q · k`` reproduces the model's
            ``hook_attn_scores`` and its softmax the patterns.

    Returns:
        :class:`~mi_lenses.attn.result.AttentionResult`; positions count in each prompt's own tokens, padding is NaN.
    """
    view = ModelView(model)
    hooks = active_hooks(view.model)
    if cache is None and _is_cache(prompt):
        cache, prompt = prompt, None
    # prepare
    if induction_length is None:
        n_ctx = int(getattr(view.cfg, "n_ctx", 0) or 0)
        induction_length = DEFAULT_INDUCTION_LENGTH if not n_ctx else min(DEFAULT_INDUCTION_LENGTH, (n_ctx - 1) // 2)
    for name, v, low in (("induction_length", induction_length, 0), ("induction_batch", induction_batch, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise LensInputError(f"{name} must be an int >= {low}, got {v!r}.")
    if last_queries is not None and (not isinstance(last_queries, int) or isinstance(last_queries, bool)
                                     or last_queries < 1):
        raise LensInputError(f"last_queries must be an int >= 1 or None (every query), got {last_queries!r}.")
    chosen, layers_note = attention_layers(view, layers)
    unsupported = view.qk_unsupported() if qk else "qk=False was passed"
    users = cache is not None
    # forward, reduce (with last_queries, each pattern is reduced as it passes: attention_reductions)
    names = required_hooks(view, chosen, qk=unsupported is None)
    first = view.attn_hook(chosen[0], "pattern")
    reduce: list[tuple[str, Reduction]] = []
    if last_queries is not None:
        names = [n for n in names if not n.endswith(("hook_pattern", "hook_attn_scores"))]
        if cache is None and prompt is not None:
            prompt = make_batch(view, prompt, prepend_bos=prepend_bos, attention_mask=attention_mask,
                               beyond_context=beyond_context)
            reduce = attention_reductions(view, prompt, chosen, last_queries)
    has_rows = reduce or (cache is not None and _has(cache, derived(first, "rows")))
    run = cached_forward(view, prompt, names=names, what="attention()", cache=cache, attention_mask=attention_mask,
                         prepend_bos=prepend_bos, required=[derived(first, "rows") if has_rows else first],
                         hint=" (or with mi_lenses.attn.required_hooks(model))", beyond_context=beyond_context,
                         progress=progress, reduce=reduce)
    batch, cache = run.batch, run
    parts = _reduce(view, cache, batch, chosen, unsupported is None, users, last_queries)
    model_dtype = str(view.dtype).replace("torch.", "")
    qk_unavailable = unreproduced_heads(parts, batch.lengths, chosen, hooks,
                                        VERIFY_TOL.get(model_dtype, VERIFY_TOL["float32"])) if hooks else {}
    unsupported = unsupported or parts.qk_note
    induction, ind_tokens = (None, None)
    if induction_length:
        induction, ind_tokens = _induction(view, chosen, induction_length, induction_batch, seed, prepend_bos)
    # assemble
    result = AttentionResult(
        model_name=view.name,
        layers=chosen,
        n_heads=view.n_heads,
        n_kv_heads=view.n_kv_heads,
        str_tokens=view.str_tokens(batch, known=prompt is not None),
        lengths=list(batch.lengths),
        patterns=parts.patterns,
        sink=parts.sink,
        entropy=parts.entropy,
        previous_token=parts.previous,
        induction=induction,
        induction_tokens=ind_tokens,
        q=parts.q,
        k=parts.k,
        scale=parts.scales,
        score_error=parts.score_error,
        qk_note=unsupported,
        qk_unavailable=qk_unavailable,
        notes=[layers_note] if layers_note else [],
        model_dtype=model_dtype,
        first_query=parts.first,
        thumbnails=parts.thumbnails,
        masks=parts.masks,
        learned_sink=parts.learned_sink(),
    )
    if check:
        result.verify()
    return recorded(result, hooks)


# ------------------------------------------------------------------------------------------------ reduce
@dataclass
class _Parts:
    patterns: Tensor  # [B, L, H, Q, S]: query rows first .. first + Q - 1 of each prompt (Q = S: all), padding NaN
    q: Tensor | None  # [B, L, Q, H, d] after rotary, the same query rows
    k: Tensor | None  # [B, L, S, KV, d]
    scales: list[float]
    score_error: Tensor  # [L], NaN where the cache has no hook_attn_scores
    qk_note: str | None  # why q and k are not kept
    sink: Tensor  # [B, L, H]
    entropy: Tensor
    previous: Tensor
    first: list[int] | None = None  # each prompt's first kept query (None: every query is kept)
    thumbnails: Tensor | None = None  # [B, L, H, T, T] with last_queries
    masks: list[LayerMask] | None = None  # each kept layer's mask (window, chunks, sinks, soft-cap)

    def learned_sink(self) -> Tensor | None:
        """``[B, L, H, Q]``: each kept row's weight on the learned attention sink (1 - the row's sum) in the layers
        that have sinks, 0 in the others; None when no layer has them."""
        if self.masks is None or all(m.sinks is None for m in self.masks):
            return None
        has = torch.tensor([m.sinks is not None for m in self.masks])[None, :, None, None]
        return torch.where(has, 1.0 - self.patterns.sum(-1), torch.zeros(()))

    def rows(self, b: int, n: int) -> tuple[int, int]:
        """Prompt ``b``'s (first kept query, number of kept rows) for its ``n`` tokens."""
        first = 0 if self.first is None else self.first[b]
        return first, n - first


def _reduce(view: ModelView, cache: Cached, batch: Batch, layers: list[int], qk: bool, users: bool,
            last_queries: int | None) -> _Parts:
    """Patterns, queries and keys of every layer re-indexed by each prompt's own tokens (with ``last_queries``, the
    kept rows that :func:`attention_reductions` made, or makes now from a cache's whole patterns), the diagnostics
    of every head and the largest error of ``scale * q · k`` against the cached ``hook_attn_scores``."""
    B, S = batch.shape
    L, H = len(layers), view.n_heads
    Q = S if last_queries is None else min(last_queries, S)
    nan = lambda *shape: torch.full(shape, torch.nan)  # noqa: E731
    out = _Parts(nan(B, L, H, Q, S), None, None, [view.attn_scale(l) for l in layers], nan(L), None,
                 nan(B, L, H), nan(B, L, H), nan(B, L, H))
    every = attention_masks(view.model)
    out.masks = [every[l] for l in layers]
    if last_queries is not None:
        out.first = [n - min(Q, n) for n in batch.lengths]
        T = min(THUMBNAIL, S)
        out.thumbnails = torch.zeros(B, L, H, T, T)
    reducers = dict(attention_reductions(view, batch, layers, Q)) if last_queries is not None else {}
    for i, l in enumerate(layers):
        name, score_name = view.attn_hook(l, "pattern"), view.attn_hook(l, "attn_scores")
        scores = None
        if last_queries is None:
            pattern = cache.get(name)
            if pattern is None:
                raise LensInputError(f"the cache has no {name!r} (it holds block {layers[0]}'s): cache every layer "
                                     "you ask for, or pass layers=.")
            out.patterns[:, i] = batch.own_positions(pattern.detach().float().cpu(), dims=(-2, -1))
            out.sink[:, i], out.entropy[:, i], out.previous[:, i] = _diagnostics(out.patterns[:, i], batch.lengths)
            scores = cache.get(score_name)
            if scores is not None:
                scores = batch.own_positions(scores.detach().float().cpu(), dims=(-2, -1))
        else:
            got = _reduced(cache, name, reducers[name], PATTERN_KEYS)
            out.patterns[:, i], out.thumbnails[:, i] = got["rows"], got["thumbnail"]
            out.sink[:, i], out.entropy[:, i], out.previous[:, i] = got["sink"], got["entropy"], got["previous_token"]
            if cache.get(score_name) is not None or cache.get(derived(score_name, "rows")) is not None:
                scores = _reduced(cache, score_name, reducers[score_name], ("rows",))["rows"]
        if not qk or out.qk_note:
            continue
        try:
            q, k = view.attn_qk(cache, l)
        except LensInputError as err:
            # everything but the q·k terms: a user's cache without the queries and keys, or a model whose bridge
            # exposes neither its rotated queries/keys nor the rotation
            out.q = out.k = None
            silent = [n.rsplit(".", 1)[-1] for n in view.qk_hooks(l) if cache.get(n) is None]
            out.qk_note = ("the cache holds no queries/keys (run_with_cache without a names_filter)" if users
                           else f"the q·k terms are not available: block {l}'s bridge does not fire "
                                f"{'/'.join(silent)} (its queries and keys as they enter the scores)" if silent
                           else f"the q·k terms are not available: {err}")
            continue
        q, k = batch.own_positions(q.detach().float().cpu(), dims=(1,)), k.detach().float().cpu()
        if out.q is None:
            out.q = torch.full((B, L, Q, H, q.shape[-1]), torch.nan)  # q·k width (MLA: wider than cfg.d_head)
            out.k = torch.full((B, L, S, k.shape[2], k.shape[-1]), torch.nan)
        for b, n in enumerate(batch.lengths):
            first, w = out.rows(b, n)
            out.q[b, i, :w] = q[b, first:n]
        out.k[:, i] = batch.own_positions(k, dims=(1,))
        if scores is not None:
            out.score_error[i] = _score_error(out, i, scores, batch.lengths)
    return out


def attention_reductions(view: ModelView, batch: Batch, layers: list[int], last_queries: int
                         ) -> list[tuple[str, Reduction]]:
    """What ``attention(last_queries=...)`` keeps of each layer's pattern and scores as they pass through a forward
    pass (:func:`~mi_lenses.models.batch.run_with_cache`): for each prompt, its last ``last_queries`` rows over its
    own tokens (``rows``, ``[B, H, Q, S]``, padding NaN), and of the pattern also the diagnostics of every head
    (``sink``, ``entropy``, ``previous_token``, ``[B, H]``) and its whole pattern max-pooled to at most ``THUMBNAIL``
    pixels a side (``thumbnail``, ``[B, H, T, T]``, prompt ``b``'s in the top-left ``min(n_b, T)`` square)."""
    B, S = batch.shape
    Q, T = min(last_queries, S), min(THUMBNAIL, S)
    spans = list(zip(batch.offsets, batch.lengths))

    def rows(p: Tensor) -> dict[str, Tensor]:
        out = torch.full((B, p.shape[1], Q, S), torch.nan)
        for b, (o, n) in enumerate(spans):
            w = min(Q, n)
            out[b, :, :w, :n] = p[b, :, o + n - w : o + n, o : o + n].float().cpu()
        return {"rows": out}

    def pattern(p: Tensor) -> dict[str, Tensor]:
        H = p.shape[1]
        out = {**rows(p), "thumbnail": torch.zeros(B, H, T, T),
               **{key: torch.full((B, H), torch.nan) for key in ("sink", "entropy", "previous_token")}}
        for b, (o, n) in enumerate(spans):
            own = p[b, :, o : o + n, o : o + n]
            out["sink"][b], out["entropy"][b], out["previous_token"][b] = _head_diagnostics(own)
            t = min(T, n)
            out["thumbnail"][b, :, :t, :t] = torch.nn.functional.adaptive_max_pool2d(own.float(), (t, t)).cpu()
        return out

    return [pair for l in layers for pair in ((view.attn_hook(l, "pattern"), pattern),
                                              (view.attn_hook(l, "attn_scores"), rows))]


def _reduced(cache: Cached, name: str, fn: Reduction, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The reduction ``fn`` of hook ``name``: the ``keys`` a forward pass kept (derived cache entries), else ``fn``
    applied to the whole cached activation."""
    if cache.get(derived(name, keys[0])) is None:
        return fn(cache[name])
    return {key: cache[derived(name, key)] for key in keys}


# ------------------------------------------------------------------------------------------------ helpers
def _is_cache(obj: Any) -> bool:
    """An ActivationCache (or a dict of hook tensors) given where the prompt goes."""
    return obj is not None and not isinstance(obj, (str, Tensor, list, tuple)) and hasattr(obj, "keys")


def _has(cache: Any, name: str) -> bool:
    return name in set(cache.keys())


def _score_error(parts: _Parts, i: int, scores: Tensor, lengths: list[int]) -> float:
    """The largest ``|scale * q · k - hook_attn_scores|`` of layer ``i`` over the real causal entries of the kept
    rows, relative to the scores' size (``scores``: ``[B, H, Q, S]``, each prompt's own tokens).

    The check compares with what the hook really holds: on some bridges (OPT) ``hook_attn_scores`` fires on the
    post-softmax pattern; when it equals the pattern the error is ``|softmax(scale * q · k) - hook_attn_scores|``."""
    worst = 0.0
    for b, n in enumerate(lengths):
        first, w = parts.rows(b, n)
        ours = row_scores(parts.q[b, i, :w], parts.k[b, i], parts.scales[i], first, n, parts.masks[i])
        theirs = scores[b, :, :w, :n]
        if torch.allclose(theirs, parts.patterns[b, i, :, :w, :n], atol=1e-6, equal_nan=True):
            ours = probabilities(ours, parts.masks[i])[0]
        keep = torch.isfinite(ours)
        err = (ours[keep] - theirs[keep]).abs().max().item()
        worst = max(worst, err / max(1.0, theirs[keep].abs().max().item()))
    return worst


def _diagnostics(patterns: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Sink share, entropy (nats) and previous-token score ``[B, H]`` of one layer's patterns ``[B, H, S, S]``."""
    B, H = patterns.shape[:2]
    sink, ent, prev = (torch.full((B, H), torch.nan) for _ in range(3))
    for b, n in enumerate(lengths):
        sink[b], ent[b], prev[b] = _head_diagnostics(patterns[b, :, :n, :n])
    return sink, ent, prev


def _head_diagnostics(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sink share, entropy (nats) and previous-token score ``[H]`` of one prompt's patterns ``[H, n, n]`` over queries
    ``1 .. n-1``, ``ROW_CHUNK`` rows at a time."""
    H, n = p.shape[0], p.shape[-1]
    if n < 2:
        return tuple(torch.full((H,), torch.nan) for _ in range(3))  # type: ignore[return-value]
    sink = p[:, 1:, 0].float().mean(-1)
    chunks = (p[:, a : a + ROW_CHUNK].float() for a in range(1, n, ROW_CHUNK))
    ent = -torch.cat([torch.special.xlogy(c, c).sum(-1) for c in chunks], -1).mean(-1)
    prev = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).float().mean(-1)
    return sink.cpu(), ent.cpu(), prev.cpu()


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
