"""AttentionResult: every head's pattern and diagnostics; QKTerms: the ``q · k`` terms behind one attention row.

Shapes: ``B`` prompts, ``L`` kept layers (``layers[i]`` is the block), ``H`` query heads, ``S`` positions (each
prompt's own tokens, the longest prompt's length; padding is NaN), ``d`` = ``d_head``, ``KV`` key/value heads.

Example:
    >>> res = mi_lenses.attention(model, "The capital of France is")
    >>> label, value = res.top_heads("sink", 1)[0]          # the head that puts most weight on the first token
    >>> i, head = divmod(int(res.sink[0].argmax()), res.n_heads)
    >>> (label, value) == (f"L{res.layers[i]}H{head}", float(res.sink[0, i, head]))
    True
    >>> p = res.patterns[0]                                  # [layers, heads, query, key]
    >>> bool(torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5))      # every row sums to 1
    True
    >>> bool(torch.allclose(res.sink[0], p[:, :, 1:, 0].mean(-1)))   # sink: the weight on the first token (queries 1..)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.attn.scores import probabilities, row_scores
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.indexing import resolve_index
from mi_lenses.models.masks import LayerMask
from mi_lenses.results import LN2, Result, dataframe, jsonable, plural
from mi_lenses.viz.attention import attention_fragment, attention_table, neuron_view, qk_table

Metric = Literal["sink", "entropy", "previous_token", "induction"]
METRICS = ("sink", "entropy", "previous_token", "induction")


# Default tolerance of AttentionResult.verify per model dtype.
VERIFY_TOL = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 5e-2, "float16": 5e-3}


@dataclass
class AttentionResult(Result):
    """Attention patterns ``[B, L, H, S, S]`` (query, key) and per-head diagnostics.

    ``sink``, ``entropy`` (nats; ``entropy_bits``) and ``previous_token`` are ``[B, L, H]`` (means over queries
    ``1 .. n-1`` of each prompt); ``induction`` is ``[L, H]`` from the repeated random tokens ``induction_tokens``.
    ``q`` ``[B, L, S, H, d]`` and ``k`` ``[B, L, S, KV, d]`` are the queries and keys as they enter the scores (after
    rotary), kept for :meth:`qk_terms`; ``scale[i]`` multiplies ``q · k`` in layer ``layers[i]``.

    With ``attention(last_queries=Q)`` (long prompts) only the query rows ``first_query[b] ..`` of each prompt are kept:
    ``patterns`` is ``[B, L, H, Q, S]`` and ``q`` ``[B, L, Q, H, d]`` (row ``j`` is query ``first_query[b] + j``), and
    ``thumbnails`` ``[B, L, H, T, T]`` holds each head's whole pattern max-pooled (the views' images). The diagnostics
    are computed over every row either way.

    ``masks[i]`` is what layer ``layers[i]`` lets a query see beyond causality (a sliding window, chunks) and adds to
    its softmax (learned attention sinks, a soft-cap): :class:`~mi_lenses.models.masks.LayerMask`. Where a layer has
    learned attention sinks (GPT-OSS) its pattern rows sum to less than one: ``learned_sink`` ``[B, L, H, S]`` holds
    each row's share on the sink (``1 -`` the row's sum; 0 in layers without sinks, ``None`` when no layer has them).
    """

    model_name: str
    layers: list[int]
    n_heads: int
    n_kv_heads: int
    str_tokens: list[list[str]]
    lengths: list[int]
    patterns: Float[Tensor, "B L H S S"] = field(repr=False)
    sink: Float[Tensor, "B L H"]
    entropy: Float[Tensor, "B L H"]
    previous_token: Float[Tensor, "B L H"]
    induction: Float[Tensor, "L H"] | None
    induction_tokens: Int[Tensor, "R T"] | None = field(repr=False)
    q: Float[Tensor, "B L S H d"] | None = field(repr=False)
    k: Float[Tensor, "B L S KV d"] | None = field(repr=False)
    scale: list[float] = field(repr=False)
    score_error: Float[Tensor, " L"] = field(repr=False)  # max |scale q·k - hook_attn_scores| (relative); NaN: unchecked
    qk_note: str | None = None  # why q and k are not kept
    qk_unavailable: dict[str, str] = field(default_factory=dict)  # "L{l}H{h}" -> why (a user's hook; q NaN)
    model_dtype: str = "float32"  # the model's weights: its own patterns and scores are this precise
    first_query: list[int] | None = field(default=None, repr=False)  # first kept query per prompt (None: all)
    thumbnails: Float[Tensor, "B L H T T"] | None = field(default=None, repr=False)  # with first_query
    masks: list[LayerMask] = field(default_factory=list, repr=False)  # per kept layer; empty: causal only
    learned_sink: Float[Tensor, "B L H S"] | None = field(default=None, repr=False)  # each row's share on the sink
    notes: list[str] = field(default_factory=list)  # blocks left out (hybrid models: mixers without heads)

    view_options: ClassVar[dict[str, Any]] = {  # see mi_lenses.results
        "top_k": 5, "patterns": False, "what": "heads", "value": "sink", "layer": None, "head": None, "query": -1}

    # ------------------------------------------------------------------------------------ structure
    @property
    def n_batch(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def title(self) -> str:
        return f"Attention: {self.model_name}"

    @property
    def entropy_bits(self) -> Float[Tensor, "B L H"]:
        return self.entropy / LN2

    @property
    def induction_length(self) -> int:
        """Length of the random sequence ``r`` of the induction diagnostic (0 when it was skipped)."""
        if self.induction_tokens is None:
            return 0
        return int(self.induction_tokens.shape[1]) // 2

    def layer_index(self, layer: int) -> int:
        """Index into the kept layers of block ``layer`` (negative counts from the last kept layer)."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0:
            return resolve_index(layer, len(self.layers), "layer")
        if layer not in self.layers:
            raise LensInputError(f"layer {layer!r} is not in this result: it holds blocks {self.layers}.")
        return self.layers.index(layer)

    def mask(self, layer_index: int) -> LayerMask:
        """The mask of kept layer ``layer_index`` (the causal mask where the result does not record one)."""
        return self.masks[layer_index] if self.masks else LayerMask()

    def check_head(self, head: int) -> int:
        return resolve_index(head, self.n_heads, "head", f"this model has {self.n_heads} heads")

    def metric(self, name: Metric, batch: int | None = 0) -> Float[Tensor, "L H"]:
        """One diagnostic as ``[L, H]`` for prompt ``batch`` (``None``: the mean over prompts; ``induction`` does
        not depend on the prompt). Entropy in bits."""
        if name == "induction":
            if self.induction is None:
                raise LensInputError("the induction diagnostic was skipped: run attention(..., induction_length=40).")
            return self.induction
        values = {"sink": self.sink, "entropy": self.entropy_bits, "previous_token": self.previous_token}.get(name)
        if values is None:
            raise LensInputError(f"unknown metric {name!r}; use one of {METRICS}.")
        return values.nanmean(0) if batch is None else values[self.check_batch(batch)]

    def top_heads(self, metric: Metric, top_k: int = 5, *, batch: int | None = 0,
                  lowest: bool = False) -> list[tuple[str, float]]:
        """The ``top_k`` heads with the highest (``lowest``: lowest) ``metric`` as ``(label, value)``, labels
        ``L{layer}H{head}``."""
        vals = self.metric(metric, batch)
        flat = torch.nan_to_num(vals.flatten(), nan=float("inf") if lowest else -float("inf"))
        idx = flat.argsort(descending=not lowest)[: min(top_k, flat.numel())].tolist()
        return [(f"L{self.layers[i // self.n_heads]}H{i % self.n_heads}", float(vals.flatten()[i])) for i in idx]

    # ------------------------------------------------------------------------------------ the q·k terms
    def qk_terms(self, layer: int, head: int, query: int = -1, *, batch: int = 0) -> "QKTerms":
        """The neuron view's data for one head and query token: per key and ``d_head`` dimension the term
        ``scale * q_d * k_d`` (after rotary; grouped-query attention: query head ``h`` reads KV head
        ``h // (n_heads / n_kv_heads)``), their sums (the attention scores) and the softmax over the keys the
        layer's mask lets the query see (the pattern row; with the layer's learned attention sink, if it has one).
        ``query`` counts in the prompt's own tokens (``-1``: its last)."""
        if self.q is None or self.k is None:
            raise LensInputError(f"this result keeps no queries and keys ({self.qk_note}): run "
                                 "mi_lenses.attention(model, prompt) with qk=True on the prompt or a full cache.")
        b = self.check_batch(batch)
        i = self.layer_index(layer)
        h = self.check_head(head)
        reason = self.qk_unavailable.get(f"L{self.layers[i]}H{h}")
        if reason is not None and bool(torch.isnan(self.q[b, i, :, h]).any()):
            raise LensInputError(f"the q·k terms of L{self.layers[i]}H{h} are unavailable: {reason}.")
        n = self.lengths[b]
        qpos = resolve_index(query, n, "query", f"prompt {b} has {n} tokens")
        row = self.row(b, qpos)
        kv = h // (self.n_heads // self.n_kv_heads)
        qv = self.q[b, i, row, h]
        keys = self.k[b, i, : qpos + 1, kv]
        products = qv[None, :] * keys * self.scale[i]  # [K, d]
        scores = products.sum(-1)
        mask = self.mask(i)
        visible = mask.visible(qpos, 1, qpos + 1)[0]
        capped = mask.capped(scores)
        head_mask = LayerMask(sinks=None if mask.sinks is None else mask.sinks[h : h + 1])
        probs, sink = probabilities(capped.masked_fill(~visible, -torch.inf)[None, None], head_mask)
        return QKTerms(
            model_name=self.model_name,
            layer=self.layers[i],
            head=h,
            kv_head=kv,
            query=qpos,
            str_tokens=self.str_tokens[b][: qpos + 1],
            scale=self.scale[i],
            products=products,
            scores=scores,
            probs=probs[0, 0],
            pattern=self.patterns[b, i, h, row, : qpos + 1].clone(),
            visible=visible,
            sink=float(sink[0, 0]),
            mask=mask.describe(),
        )

    # ------------------------------------------------------------------------------------ kept rows
    def rows(self, batch: int) -> tuple[int, int]:
        """Prompt ``batch``'s kept query rows: ``(first query, number of rows)`` (``(0, n)`` when all are kept)."""
        n = self.lengths[batch]
        first = 0 if self.first_query is None else self.first_query[batch]
        return first, n - first

    def row(self, batch: int, query: int) -> int:
        """The row of ``patterns`` (and ``q``) that holds query ``query`` (``>= 0``) of prompt ``batch``."""
        first, w = self.rows(batch)
        if not first <= query < first + w:
            raise LensInputError(f"query {query} of prompt {batch} was not kept: this result keeps queries "
                                 f"{first}..{first + w - 1} (attention(..., last_queries={w})); pass a later query "
                                 "or run attention() with a larger last_queries.")
        return query - first

    def block(self, batch: int, layer_index: int, lo: int) -> Float[Tensor, "H W W"]:
        """Every head's pattern among the prompt's tokens ``lo ..`` (queries and keys), for the head view."""
        first, w = self.rows(batch)
        n = self.lengths[batch]
        return self.patterns[batch, layer_index, :, self.row(batch, lo) : w, lo:n]

    def image(self, batch: int, layer_index: int, head: int) -> Float[Tensor, "n n"]:
        """One head's whole pattern as the views draw it: ``[n, n]``, or its pooled thumbnail when only the last
        queries were kept."""
        n = self.lengths[batch]
        if self.thumbnails is None:
            return self.patterns[batch, layer_index, head, :n, :n]
        t = min(n, self.thumbnails.shape[-1])
        return self.thumbnails[batch, layer_index, head, :t, :t]

    # ------------------------------------------------------------------------------------ identities
    def verify(self, atol: float | None = None) -> "AttentionResult":
        """Check the identities; raise ``VerificationError`` naming the one that fails.

        1. every pattern row sums to one over the prompt's real keys (less the learned sink's share, in layers that
           have sinks) and puts nothing on the keys the layer's mask hides (later keys; outside a sliding window or
           the query's chunk);
        2. ``scale * q · k`` reproduces the model's ``hook_attn_scores`` (where the run cached them);
        3. the softmax of those scores under the layer's mask (soft-cap, learned sinks) reproduces the patterns.

        ``atol`` (also the relative tolerance of 2.) defaults to ``VERIFY_TOL`` of the model's dtype (1e-4 in
        float32; 5e-2 for bfloat16, whose scores and patterns are rounded to 8 bits).
        """
        if atol is None:
            atol = VERIFY_TOL.get(self.model_dtype, VERIFY_TOL["float32"])

        for b, n in enumerate(self.lengths):
            first, w = self.rows(b)
            for i in range(len(self.layers)):
                self._check_rows(b, i, self.patterns[b, i, :, :w, :n], first, atol)
        bad = torch.nonzero(self.score_error > atol)
        if len(bad):
            i = int(bad[0, 0])
            raise VerificationError(
                f"scale * q · k differs from hook_attn_scores in block {self.layers[i]} by "
                f"{float(self.score_error[i]):.2e} (relative): the queries/keys (rotary, GQA) or the scale are not "
                "the model's."
            )
        if self.q is not None and self.k is not None:
            for b, n in enumerate(self.lengths):
                first, w = self.rows(b)
                for i in range(len(self.layers)):
                    s = row_scores(self.q[b, i, :w], self.k[b, i], self.scale[i], first, n, self.mask(i))
                    diff = (probabilities(s, self.mask(i))[0] - self.patterns[b, i, :, :w, :n]).abs()
                    err = diff.nan_to_num(0.0).max().item()  # NaN: a head whose q·k terms are unavailable
                    if not err <= atol:
                        raise VerificationError(
                            f"softmax(scale * q · k) differs from the pattern of block {self.layers[i]} (prompt "
                            f"{b}) by {err:.2e}: the queries/keys do not reproduce the attention."
                        )
        return self

    def _check_rows(self, b: int, i: int, p: Float[Tensor, "H W n"], first: int, atol: float) -> None:
        """Identity 1 of :meth:`verify` on prompt ``b``'s kept rows of layer ``i``."""
        mask = self.mask(i)
        total = p.sum(-1)
        if mask.sinks is None:
            err = (total - 1).abs().max().item()
            why = "the pattern reads padding or the wrong hook"
        else:  # the learned sink takes the rest: rows sum to at most one
            err = max(0.0, (total - 1).max().item(), -total.min().item())
            why = "a row with a learned attention sink sums to more than one"
        if not err <= atol:
            raise VerificationError(f"attention rows of prompt {b} in block {self.layers[i]} sum to 1 ± {err:.2e} "
                                    f"(> {atol:.0e}): {why}.")
        hidden = p.masked_fill(mask.visible(first, p.shape[1], p.shape[2]), 0.0).abs().max().item()
        if not hidden <= atol:
            raise VerificationError(
                f"prompt {b} attends to keys that block {self.layers[i]}'s mask ({mask.describe()}) hides "
                f"({hidden:.2e}): the patterns are not the model's mask, or positions are misaligned.")

    # ------------------------------------------------------------------------------------ exports
    def to_dict(self, *, batch: int = 0, top_k: int = 5, patterns: bool = False) -> dict[str, Any]:
        """JSON-ready dict for one prompt: ``tokens``, ``layers``, per-head ``sink``/``entropy_bits``/
        ``previous_token``/``induction`` as ``[layer][head]``, the ``top_k`` top heads of each, and with
        ``patterns`` the patterns ``[layer][head][query][key]`` over the prompt's tokens (only the kept queries, from
        ``first_query``, when the result keeps the last ones) and, on a model with learned attention sinks, each
        row's share on the sink (``learned_sink``, ``[layer][head][query]``)."""
        b = self.check_batch(batch)
        n = self.lengths[b]
        first, w = self.rows(b)
        out: dict[str, Any] = {
            "model": self.model_name,
            "tokens": self.str_tokens[b],
            "layers": self.layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "sink": self.sink[b],
            "entropy_bits": self.entropy_bits[b],
            "previous_token": self.previous_token[b],
            "induction": self.induction,
            "induction_length": self.induction_length,
            "top_heads": {m: self.top_heads(m, top_k, batch=b) for m in METRICS
                          if m != "induction" or self.induction is not None},
        }
        if patterns:
            out["patterns"] = self.patterns[b, :, :, :w, :n]
            if self.learned_sink is not None:
                out["learned_sink"] = self.learned_sink[b, :, :, :w]
            if self.first_query is not None:
                out["first_query"] = first
        return jsonable(out)

    def to_dataframe(self, what: Literal["heads", "patterns"] = "heads"):
        """Tidy pandas frame: ``"heads"`` (default), one row per (prompt, layer, head) with the diagnostics, or
        ``"patterns"``, one row per (prompt, layer, head, query, key) of real tokens (keys up to the query; the kept
        queries only, when the result keeps the last ones)."""
        B, L, H = self.sink.shape
        if what == "heads":
            b, i, h = torch.cartesian_prod(torch.arange(B), torch.arange(L), torch.arange(H)).unbind(-1)
            layer = torch.tensor(self.layers)[i]
            ind = self.induction[i, h].numpy() if self.induction is not None else float("nan")
            return dataframe({"batch": b.numpy(), "layer": layer.numpy(), "head": h.numpy(),
                              "label": [f"L{a}H{c}" for a, c in zip(layer.tolist(), h.tolist())],
                              "sink": self.sink[b, i, h].numpy(), "entropy_bits": self.entropy_bits[b, i, h].numpy(),
                              "previous_token": self.previous_token[b, i, h].numpy(), "induction": ind})
        if what == "patterns":
            cols: dict[str, list[Tensor]] = {"batch": [], "layer": [], "head": [], "query": [], "key": [], "weight": []}
            for bb, n in enumerate(self.lengths):
                first, w = self.rows(bb)
                qq, kk = torch.tril_indices(w, n, offset=first)  # row j is query first + j: keys up to it
                for i, l in enumerate(self.layers):
                    for h in range(H):
                        for name, v in (("batch", bb), ("layer", l), ("head", h)):
                            cols[name].append(torch.full((len(qq),), v))
                        cols["query"].append(qq + first)
                        cols["key"].append(kk)
                        cols["weight"].append(self.patterns[bb, i, h, qq, kk])
            return dataframe({name: torch.cat(parts).numpy() for name, parts in cols.items()})
        raise LensInputError(f"what must be 'heads' or 'patterns', got {what!r}.")

    def table(self, *, batch: int = 0, value: Metric = "sink", top_k: int = 5):
        """A rich table: layers (rows, last on top) x heads, each cell the head's ``value`` shaded; the caption
        names the ``top_k`` top heads of every diagnostic."""
        return attention_table(self, batch=self.check_batch(batch), value=value, top_k=top_k)

    def fragment(self, *, batch: int = 0, top_k: int = 5, layer: int | None = None, head: int | None = None,
                 query: int = -1) -> str:
        """The page body: diagnostics maps (sink share, entropy, previous-token, induction) with the ``top_k`` top
        heads of each, the head view of ``layer``, the model view (every layer x head) and the neuron view of
        ``head`` at ``query`` (default: the head with the highest induction score, else previous-token score, and
        the last token)."""
        return attention_fragment(self, batch=self.check_batch(batch), top_k=top_k, layer=layer, head=head,
                                  query=query)

    def _summary(self) -> str:
        (label, value), = self.top_heads("sink", 1, batch=None)
        return (f"on {self.model_name!r}: {plural(self.n_batch, 'prompt')} of up to {max(self.lengths)} tokens, "
                f"{len(self.layers)} layers x {self.n_heads} heads ({self.n_kv_heads} key/value), top sink {label} "
                f"{value:.2f}{'' if self.induction is None else ', induction scored'}")


@dataclass
class QKTerms(Result):
    """The terms of one attention row (the neuron view): ``products[key, d] = scale * q_d * k_d``; their sum over
    ``d`` is ``scores[key]`` (the model's pre-softmax score), and ``probs = softmax(scores)`` equals ``pattern``
    (the row the model's ``hook_pattern`` recorded). The softmax runs over the ``visible`` keys (those the layer's
    ``mask`` lets the query see: outside a sliding window or the query's chunk, ``probs`` is 0) and, in a layer with
    learned attention sinks, the sink too: ``sink`` is its share, and ``probs`` sums to ``1 - sink``."""

    model_name: str
    layer: int
    head: int
    kv_head: int
    query: int
    str_tokens: list[str]
    scale: float
    products: Float[Tensor, "K d"] = field(repr=False)
    scores: Float[Tensor, " K"]
    probs: Float[Tensor, " K"]
    pattern: Float[Tensor, " K"]
    visible: Bool[Tensor, " K"] | None = field(default=None, repr=False)  # None: every key (causal)
    sink: float = 0.0  # the learned attention sink's share of the row (GPT-OSS)
    mask: str = "the causal mask"  # the layer's mask in words

    view_options: ClassVar[dict[str, Any]] = {"top_k": 12, "max_keys": 48}  # see mi_lenses.results

    @property
    def title(self) -> str:
        return f"L{self.layer}H{self.head} at {self.str_tokens[self.query]!r}: {self.model_name}"

    def top_dims(self, key: int | None = None, top_k: int = 8) -> list[tuple[int, float]]:
        """The ``top_k`` dimensions with the largest ``|term|`` for ``key`` (default: the most attended key)."""
        key = int(self.probs.argmax()) if key is None else resolve_index(key, len(self.str_tokens), "key")
        row = self.products[key]
        return [(int(d), float(row[d])) for d in row.abs().argsort(descending=True)[:top_k]]

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        self.check_batch(batch)
        return jsonable({"model": self.model_name, "layer": self.layer, "head": self.head, "kv_head": self.kv_head,
                         "query": self.query, "tokens": self.str_tokens, "scale": self.scale,
                         "scores": self.scores, "probs": self.probs, "pattern": self.pattern, "sink": self.sink,
                         "mask": self.mask,
                         "products": self.products})

    def to_dataframe(self):
        """One row per (key, dimension) with the term, and the key's score and probability."""
        K, d = self.products.shape
        key, dim = torch.cartesian_prod(torch.arange(K), torch.arange(d)).unbind(-1)
        return dataframe({"key": key.numpy(), "token": [self.str_tokens[i] for i in key.tolist()],
                          "dim": dim.numpy(), "term": self.products[key, dim].numpy(),
                          "score": self.scores[key].numpy(), "prob": self.probs[key].numpy()})

    def table(self, *, batch: int = 0, top_k: int = 12):
        """A rich table of the ``top_k`` most attended keys: score, probability and their largest terms."""
        self.check_batch(batch)
        return qk_table(self, top_k=top_k)

    def fragment(self, *, batch: int = 0, max_keys: int = 48) -> str:
        """The neuron view: keys x dimensions of terms (diverging colours), each key's score and probability, and
        the row over the prompt (circuitsvis). Prompts longer than ``max_keys`` show the most attended keys."""
        self.check_batch(batch)
        return neuron_view(self, max_keys=max_keys)

    def _summary(self) -> str:
        key = int(self.probs.argmax())
        return (f"L{self.layer}H{self.head} at query {self.query} {self.str_tokens[self.query]!r} on "
                f"{self.model_name!r}: {len(self.str_tokens)} keys x d_head {self.products.shape[1]}, most attended "
                f"key {key} {self.str_tokens[key]!r} (weight {float(self.probs[key]):.3f})")
