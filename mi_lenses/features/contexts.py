"""Max-activating contexts: for each feature of a dictionary, the tokens of a corpus where it is most active, with
the tokens around them (the data of a feature dashboard), its activation frequency and its feature logit lens.

:func:`feature_contexts` streams the corpus once, ``batch_size`` sequences per forward pass, and keeps per requested
feature its ``top_k`` largest activations so far with their windows (``context`` tokens each side, within the same
sequence; the activations of the feature over the window come along for the views). Padding is never encoded nor
counted. Each context records its ``sequence`` (row of the packed corpus, or index of the text) and ``position``
(in that sequence's own tokens), so ``features(model, corpus[sequence], dictionary).activations[0, position, i]``
is the reported value: the activation is the one of the whole sequence up to that token, not of the window alone.

Example:
    >>> D, g = model.cfg.d_model, torch.Generator().manual_seed(0)
    >>> d = mi_lenses.Dictionary(torch.randn(D, 32, generator=g), torch.zeros(32), torch.randn(32, D, generator=g),
    ...                          torch.zeros(D), hook="blocks.1.hook_resid_post")
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (6, 16), generator=g)
    >>> c = mi_lenses.feature_contexts(model, d, tokens, features=[0, 5], top_k=4, context=3, progress=False)
    >>> c.values.shape, c.window_ids.shape                     # [feature, top_k], [feature, top_k, 2 * context + 1]
    (torch.Size([2, 4]), torch.Size([2, 4, 7]))
    >>> s, p = int(c.sequences[0, 0]), int(c.positions[0, 0])  # where feature 0 is most active
    >>> f = mi_lenses.features(model, tokens[s: s + 1], d)
    >>> abs(float(f.activations[0, p, 0] - c.values[0, 0])) < 1e-4
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import DictionarySet
from mi_lenses.features.dla import _where, as_affine_lens, feature_lens, resolve_out
from mi_lenses.features.options import FeatureContextsOptions
from mi_lenses.features.reading import (
    DictionaryInput,
    as_dictionary,
    check_dictionary,
    dictionary_label,
    encode_run,
    feature_labels,
    members,
    trained_exclude_first,
)
from mi_lenses.models.batch import check_context
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.options import with_options
from mi_lenses.progress import bar as progress_bar
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.features import context_fragment, context_table

MAX_SHOWN = 20  # features a view shows when no feature= is given (the most active ones)


def _feature_ids(features: Any, labels: list[str]) -> list[int]:
    """``features`` (None: all; a list of indices or labels) as indices over the whole dictionary."""
    n = len(labels)
    if features is None:
        return list(range(n))
    if isinstance(features, (int, str)):
        features = [features]
    out = []
    for f in features:
        if isinstance(f, str):
            if f not in labels:
                raise LensInputError(f"no feature {f!r} in this dictionary (labels {labels[0]} .. {labels[-1]}).")
            out.append(labels.index(f))
        elif isinstance(f, int) and not isinstance(f, bool) and -n <= f < n:
            out.append(f % n)
        else:
            raise LensInputError(f"features must be indices in [0, {n}) or labels, got {f!r}.")
    if not out:
        raise LensInputError("features is empty: pass None for every feature, or some indices.")
    return list(dict.fromkeys(out))


def _corpus(view: ModelView, data: Any, seq_len: int, max_tokens: int | None, batch_size: int) -> list[Any]:
    """The corpus as batches: token-id tensors ``[b, seq_len]`` or lists of texts (each one sequence, padded)."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return [list(data[i: i + batch_size]) for i in range(0, len(data), batch_size)]
    if isinstance(data, Tensor):
        tokens = data
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise LensInputError(f"token data must be [n_seq, seq_len], got {tuple(tokens.shape)}.")
        if max_tokens:
            tokens = tokens[: max(1, max_tokens // tokens.shape[-1])]
    else:
        check_context(view, seq_len, "each sequence", fix="Pass a smaller seq_len (--seq-len).")
        tokens = load_tokens(data, view, seq_len, max_tokens=max_tokens)
    tokens = tokens.long().cpu()
    return [tokens[i: i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


@with_options(FeatureContextsOptions)
def feature_contexts(
    model: Any,
    dictionary: DictionaryInput,
    data: Any,
    *,
    options: FeatureContextsOptions | None = None,
) -> FeatureContexts:
    """The ``top_k`` contexts of ``data`` where each feature is most active, with its activation frequency, its
    largest activation and its feature logit lens (see :mod:`mi_lenses.features.contexts`).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), used as you hooked it.
        dictionary: a :class:`~mi_lenses.features.dictionary.Dictionary`, a
            :class:`~mi_lenses.features.dictionary.DictionarySet` or a folder :func:`~mi_lenses.load_dictionary`
            reads.
        data: the corpus: text as for :func:`~mi_lenses.data.load_tokens` (a file, a folder, a cached ``datasets``
            name; packed into sequences of ``seq_len``), a list of texts (each one sequence, tokenised as prompts)
            or token ids ``[n_seq, seq_len]``.
        options: a :class:`~mi_lenses.features.options.FeatureContextsOptions` record; the keywords below override
            its fields.
        {options}

    Returns:
        :class:`FeatureContexts`: ``values`` ``[feature, top_k]`` (descending, NaN where a feature fired fewer
        times), ``sequences`` and ``positions`` (-1 there), the windows ``window_ids`` / ``window_acts``
        ``[feature, top_k, 2 * context + 1]``, ``frequency`` and ``n_tokens``.
    """
    opts = options  # with_options merged the keywords into it
    view = ModelView(model)
    hooks = active_hooks(view.model)
    dictionary = as_dictionary(dictionary)
    check_dictionary(view, dictionary)
    opts.validate()
    context = opts.context
    lens = as_affine_lens(view, opts.lens)
    labels = feature_labels(dictionary)
    ids = _feature_ids(opts.features, labels)
    sel = torch.tensor(ids)
    batches = _corpus(view, data, opts.seq_len, opts.max_tokens, opts.batch_size)
    first = trained_exclude_first(dictionary, opts.exclude_first)  # the attention sink, as the dictionary trained
    F, K, W = len(ids), opts.top_k, 2 * context + 1
    values = torch.full((F, 0), -math.inf)
    seqs = torch.zeros(F, 0, dtype=torch.long)
    poss = torch.zeros(F, 0, dtype=torch.long)
    wids = torch.zeros(F, 0, W, dtype=torch.long)
    wacts = torch.zeros(F, 0, W)
    fired = torch.zeros(F, dtype=torch.float64)
    n_tokens, first_seq = 0, 0
    offsets_w = torch.arange(W)
    with progress_bar(len(batches), "feature contexts", unit="batch", enabled=opts.progress) as bar:
        for batch in batches:
            with torch.no_grad():
                enc = encode_run(view, batch, dictionary, what="feature contexts", prepend_bos=None)
            acts = torch.cat([a.cpu() for a in enc.acts], -1)[..., sel].float()  # [B, S, F]
            toks = enc.batch.tokens.cpu()
            B, S = enc.mask.shape
            offs = torch.tensor(enc.batch.offsets)
            mask = enc.mask.cpu() & (torch.arange(S)[None] - offs[:, None] >= first)
            n_tokens += int(mask.sum())
            fired += ((acts != 0) & mask[..., None]).sum((0, 1)).double()
            ranked = acts.masked_fill(~mask[..., None], -math.inf).reshape(B * S, F).T  # [F, B*S]
            k = min(K, B * S)
            top_v, top_i = ranked.topk(k, dim=-1)  # [F, k]
            b_i, p_i = top_i // S, top_i % S
            # the windows: padded by `context` on each side; outside the sequence's real tokens: id -1, value 0
            a_pad = torch.nn.functional.pad(acts.masked_fill(~mask[..., None], 0.0), (0, 0, context, context))
            t_pad = torch.nn.functional.pad(toks.masked_fill(~mask, -1), (context, context), value=-1)
            at = p_i[..., None] + offsets_w  # [F, k, W] in padded coordinates
            w_acts = a_pad[b_i[..., None], at, torch.arange(F)[:, None, None]]
            w_ids = t_pad[b_i[..., None], at]
            values = torch.cat([values, top_v], 1)
            seqs = torch.cat([seqs, first_seq + b_i], 1)
            poss = torch.cat([poss, p_i - offs[b_i]], 1)
            wids = torch.cat([wids, w_ids], 1)
            wacts = torch.cat([wacts, w_acts], 1)
            keep = values.topk(min(K, values.shape[1]), dim=-1).indices  # merged: the top_k so far
            values, seqs, poss = values.gather(1, keep), seqs.gather(1, keep), poss.gather(1, keep)
            wids = wids.gather(1, keep[..., None].expand(-1, -1, W))
            wacts = wacts.gather(1, keep[..., None].expand(-1, -1, W))
            first_seq += B
            bar.update(1)
    if values.shape[1] < K:  # fewer tokens than top_k in the whole corpus
        extra = K - values.shape[1]
        values = torch.cat([values, torch.full((F, extra), -math.inf)], 1)
        seqs, poss = (torch.cat([t, torch.full((F, extra), -1)], 1) for t in (seqs, poss))
        wids = torch.cat([wids, torch.full((F, extra, W), -1)], 1)
        wacts = torch.cat([wacts, torch.zeros(F, extra, W)], 1)
    none = ~torch.isfinite(values) | (values == 0)  # a context is a token where the feature fired
    values = values.masked_fill(none, math.nan)
    seqs, poss = seqs.masked_fill(none, -1), poss.masked_fill(none, -1)
    wids = wids.masked_fill(none[..., None], -1)
    wacts = wacts.masked_fill(none[..., None], 0.0)
    used = wids[wids >= 0]
    can_lens = all(_writes_residual(view, d) for d in members(dictionary))
    result = FeatureContexts(
        model_name=view.name,
        dictionary_name=dictionary_label(dictionary),
        features=ids,
        labels=[labels[i] for i in ids],
        values=values,
        sequences=seqs,
        positions=poss,
        window_ids=wids,
        window_acts=wacts,
        context=context,
        frequency=(fired / max(n_tokens, 1)).float(),
        n_tokens=n_tokens,
        token_strs=view.id_to_str_map(used) if used.numel() else {},
        logit_lens=feature_lens(view, dictionary, ids, lens) if can_lens and F <= 4096 else {},
        lens_name="logit lens" if lens is None else lens.name,
    )
    return recorded(result, hooks)


def _writes_residual(view: ModelView, d: Any) -> bool:
    """Whether a dictionary's write has a path to the logits (the feature logit lens reads it)."""
    try:
        _where(view, resolve_out(view, d))
        return True
    except LensInputError:
        return False


@dataclass
class FeatureContexts(Result):
    """Per requested feature, the contexts of a corpus where it is most active (what :func:`feature_contexts`
    returns).

    ``values[f, r]``: the ``r``-th largest activation of feature ``features[f]`` (NaN where it fired fewer times), at
    ``positions[f, r]`` of sequence ``sequences[f, r]``; ``window_ids`` / ``window_acts`` ``[feature, top_k, 2 *
    context + 1]``: the tokens around it (-1 outside its sequence) and the feature's activation on each (the centre,
    index ``context``, is the context's token); ``frequency[f]``: the fraction of the corpus's ``n_tokens`` tokens
    where it is active; ``logit_lens``: feature index -> its promoted and suppressed tokens.
    """

    model_name: str
    dictionary_name: str
    features: list[int]
    labels: list[str]
    values: Float[Tensor, "F K"]
    sequences: Int[Tensor, "F K"]
    positions: Int[Tensor, "F K"]
    window_ids: Int[Tensor, "F K W"]
    window_acts: Float[Tensor, "F K W"]
    context: int
    frequency: Float[Tensor, " F"]
    n_tokens: int
    token_strs: dict[int, str] = field(default_factory=dict, repr=False)
    logit_lens: dict[int, dict[str, list]] = field(default_factory=dict)
    lens_name: str = "logit lens"

    view_options: ClassVar[dict[str, Any]] = {"top_k": 10, "feature": None}  # see mi_lenses.results

    @property
    def title(self) -> str:
        return f"Max-activating contexts: {self.dictionary_name} on {self.model_name}"

    @property
    def max_activation(self) -> Float[Tensor, " F"]:
        """Each feature's largest activation over the corpus (0 where it never fired)."""
        return torch.nan_to_num(self.values[:, 0], nan=0.0)

    def row(self, feature: int | str) -> int:
        """The row of ``feature`` (its index over the dictionary, or its label) in this result."""
        if isinstance(feature, str) and feature in self.labels:
            return self.labels.index(feature)
        if isinstance(feature, int) and not isinstance(feature, bool) and feature in self.features:
            return self.features.index(feature)
        raise LensInputError(f"feature {feature!r} was not collected; this result holds "
                             f"{plural(len(self.features), 'feature')} ({', '.join(self.labels[:5])}"
                             f"{', ...' if len(self.labels) > 5 else ''}).")

    def top(self, top_k: int = 10) -> list[tuple[str, float]]:
        """The ``top_k`` features with the largest activation over the corpus, as ``(label, max activation)``."""
        m = self.max_activation
        idx = m.abs().topk(min(top_k, m.numel())).indices.tolist()
        return [(self.labels[i], float(m[i])) for i in idx if m[i] != 0]

    def tokens(self, feature: int | str, rank: int = 0) -> list[str]:
        """The window of the ``rank``-th context of ``feature`` as token strings (outside the sequence left out)."""
        f = self.row(feature)
        return [self.token_strs[i] for i in self.window_ids[f, rank].tolist() if i >= 0]

    def _rows(self, feature: int | str | None, top_k: int) -> list[int]:
        if feature is not None:
            return [self.row(feature)]
        fired = [f for f in range(len(self.features)) if self.max_activation[f] != 0]
        return sorted(fired, key=lambda f: -float(self.max_activation[f]))[:MAX_SHOWN]

    def _feature(self, f: int, top_k: int) -> dict[str, Any]:
        """One feature's record: label, max, frequency, logit lens and its ``top_k`` contexts."""
        out = []
        for r in range(min(top_k, self.values.shape[1])):
            v = float(self.values[f, r])
            if math.isnan(v):
                break
            ids, acts = self.window_ids[f, r].tolist(), self.window_acts[f, r].tolist()
            inside = [j for j, i in enumerate(ids) if i >= 0]
            out.append({"activation": v, "sequence": int(self.sequences[f, r]), "position": int(self.positions[f, r]),
                        "tokens": [self.token_strs[ids[j]] for j in inside], "activations": [acts[j] for j in inside],
                        "at": inside.index(self.context)})
        lens = self.logit_lens.get(self.features[f], {})
        return {"feature": self.features[f], "label": self.labels[f], "max_activation": float(self.max_activation[f]),
                "frequency": float(self.frequency[f]), "promoted": [t for t, _ in lens.get("promoted", [])],
                "suppressed": [t for t, _ in lens.get("suppressed", [])], "contexts": out}

    def to_dict(self, *, batch: int = 0, top_k: int = 10, feature: int | str | None = None) -> dict[str, Any]:
        """JSON-ready: per feature (``feature``: one; None: every collected feature) its largest activation,
        frequency, logit lens and ``top_k`` contexts (tokens, the feature's activation on each, ``at``: the index
        of the most active token)."""
        self.check_batch(batch)
        rows = [self.row(feature)] if feature is not None else range(len(self.features))
        return jsonable({"model": self.model_name, "dictionary": self.dictionary_name, "n_tokens": self.n_tokens,
                         "lens": self.lens_name, "features": [self._feature(f, top_k) for f in rows]})

    def to_dataframe(self):
        """Tidy frame, one row per (feature, context): ``feature``, ``label``, ``rank``, ``activation``,
        ``sequence``, ``position``, ``token`` (the most active one) and ``text`` (the window)."""
        rows = []
        for f in range(len(self.features)):
            for r, c in enumerate(self._feature(f, self.values.shape[1])["contexts"]):
                rows.append({"feature": self.features[f], "label": self.labels[f], "rank": r,
                             "activation": c["activation"], "sequence": c["sequence"], "position": c["position"],
                             "token": c["tokens"][c["at"]], "text": "".join(c["tokens"])})
        return dataframe(rows or {k: [] for k in ("feature", "label", "rank", "activation", "sequence", "position",
                                                   "token", "text")})

    def table(self, *, batch: int = 0, top_k: int = 10, feature: int | str | None = None):
        """A rich table: per feature (``feature``; None: the most active ones) its ``top_k`` contexts, the most
        active token highlighted and the tokens coloured by the feature's activation."""
        self.check_batch(batch)
        return context_table(self.title, [self._feature(f, top_k) for f in self._rows(feature, top_k)],
                             self.lens_name)

    def fragment(self, *, batch: int = 0, top_k: int = 10, feature: int | str | None = None) -> str:
        """The page body: per feature its numbers, logit lens and contexts (circuitsvis coloured tokens)."""
        self.check_batch(batch)
        rows = self._rows(feature, top_k)
        note = "" if feature is not None or len(rows) == sum(1 for m in self.max_activation if m != 0) else \
            f"the {len(rows)} features with the largest activations; pass feature= for another"
        return context_fragment(self.title, [self._feature(f, top_k) for f in rows], self.lens_name, note)

    def _summary(self) -> str:
        n_fired = int((self.max_activation != 0).sum())
        return (f"{self.dictionary_name} on {self.model_name!r}: {plural(len(self.features), 'feature')} "
                f"({n_fired} fired) over {plural(self.n_tokens, 'token')}, top {self.values.shape[1]} contexts each")


__all__ = ["FeatureContexts", "feature_contexts"]
