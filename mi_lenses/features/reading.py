"""Reading features: a dictionary's feature activations at every position of a prompt, and its reconstruction error.

One forward pass caches the hooks the dictionary reads and writes (as the model is hooked: a user's hooks stay and
fire first; ours are removed when the pass ends, also when it raises). Each dictionary encodes the real tokens of the
batch (padding is never encoded and stays zero), and the **error** is what the dictionary misses of the activation it
reconstructs: ``error = x - decode(encode(x))`` for an SAE (``[batch, position, d_in]``), ``error = y - transcoder(x)``
for a transcoder writing ``y`` (a set: ``[layer, batch, position, d_out]``, a cross-layer transcoder's later layers
receiving the earlier features' writes). ``verify()`` re-encodes and re-decodes and checks ``decode(encode(x)) +
error == x`` at every real token.

Example:
    >>> D, g = model.cfg.d_model, torch.Generator().manual_seed(0)
    >>> d = mi_lenses.Dictionary(torch.randn(D, 32, generator=g), torch.zeros(32), torch.randn(32, D, generator=g),
    ...                          torch.zeros(D), hook="blocks.0.hook_resid_post", activation="topk", k=4)
    >>> f = mi_lenses.features(model, ["The capital of France is", "A city"], d)
    >>> f.activations.shape[-1] == d.n_features, f.error.shape[-1] == d.d_in, int(f.l0.max())
    (True, True, 4)
    >>> x = f.reads[0][0]                                        # what the dictionary read, prompt 0
    >>> bool(torch.allclose(d.decode(d.encode(x)) + f.error[0], x, atol=1e-5))
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.features.dictionary import Dictionary, DictionarySet, hook_layer
from mi_lenses.features.formats import load
from mi_lenses.features.processing import check_processing
from mi_lenses.models.batch import Batch, Cached, PromptInput, cached_forward
from mi_lenses.models.identity import check_identity
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.features import feature_fragment, feature_table, feature_tokens_view

DictionaryInput = Dictionary | DictionarySet | str | os.PathLike
_ALIASES = {"mlp.hook_out": "hook_mlp_out", "attn.hook_out": "hook_attn_out", "mlp.hook_in": "ln2.hook_normalized"}


def as_dictionary(dictionary: Any) -> Dictionary | DictionarySet:
    """A dictionary object, or the one in a folder."""
    if isinstance(dictionary, (Dictionary, DictionarySet)):
        return dictionary
    if isinstance(dictionary, (str, os.PathLike)):
        return load(dictionary)
    raise LensInputError(f"dictionary must be a Dictionary, a DictionarySet or a folder, got "
                         f"{type(dictionary).__name__}: load one with mi_lenses.load_dictionary(path).")


def members(dictionary: Dictionary | DictionarySet) -> list[Dictionary]:
    return [dictionary] if isinstance(dictionary, Dictionary) else list(dictionary.dictionaries)


def resolve_hook(view: ModelView, hook: str, what: str) -> str:
    """``hook`` as this model names it: itself, or on a ``HookedTransformer`` (which has no ``mlp.hook_out``) the
    hook holding the same values; a ``LensInputError`` naming the hook and the model otherwise."""
    if hook in view.hook_names:
        return hook
    layer = hook_layer(hook)
    post_norms = bool(getattr(view.cfg, "use_normalization_before_and_after", False))
    if layer is not None and not view.is_bridge and not post_norms:
        tail = hook.split(".", 2)[2]
        alias = _ALIASES.get(tail)
        folded = getattr(view.cfg, "normalization_type", None) in ("LNPre", "RMSPre", None)
        if alias is not None and (tail != "mlp.hook_in" or folded) and f"blocks.{layer}.{alias}" in view.hook_names:
            return f"blocks.{layer}.{alias}"
    if layer is not None and layer >= view.n_layers:
        raise LensInputError(f"this dictionary's {what} {hook!r} is in block {layer}, but {view.name} has "
                             f"{view.n_layers} blocks: load the dictionary trained on this model.")
    raise LensInputError(f"this dictionary's {what} {hook!r} is not a hook of {view.name}: load the dictionary "
                         "trained on this model (or, for a HookedTransformer, use a TransformerBridge: "
                         "mi_lenses.load_model(..., kind='bridge')).")


def check_dictionary(view: ModelView, dictionary: Dictionary | DictionarySet) -> list[tuple[str, str]]:
    """Check that ``dictionary`` belongs to this model (its hooks exist, its recorded model identity and weight
    processing match: :mod:`~mi_lenses.features.processing`) and
    return each member's ``(input hook, output hook)`` as this model names them. Widths are checked on the
    activations (:func:`read_vectors`)."""
    if dictionary.meta.get("unembed_fingerprint") is not None:
        check_identity(dictionary.meta, view, "dictionary")
    for d in members(dictionary):
        check_processing(view, d)
    return [(resolve_hook(view, d.hook, "input hook"), resolve_hook(view, d.writes, "output hook"))
            for d in members(dictionary)]


def trained_exclude_first(dictionary: Dictionary | DictionarySet, asked: int | None = None) -> int:
    """The leading positions of each sequence an evaluation leaves out: ``asked``, or the most any member was trained
    without (``meta["training"]["exclude_first"]``; 0 where a dictionary does not say)."""
    if asked is not None:
        return asked
    return max(int((d.meta.get("training") or {}).get("exclude_first", 0) or 0) for d in members(dictionary))


def read_vectors(cache: Any, hook: str, width: int, what: str, view: ModelView) -> Float[Tensor, "B S d"]:
    """The cached activation of ``hook`` as ``[batch, pos, width]`` (per-head hooks flattened, head-major), float32;
    a width other than the dictionary's is refused naming both."""
    t = cache[hook]
    if t.ndim == 4:  # hook_z: [batch, pos, head, d_head]
        t = t.flatten(-2)
    if t.shape[-1] != width:
        raise LensInputError(f"this dictionary's {what} has width {width}, but {hook} of {view.name} has width "
                             f"{t.shape[-1]}: the dictionary was trained on another model or hook.")
    return t.float()


@dataclass
class Encoded:
    """One forward pass and every member's inputs, targets, activations and errors ``[B, S, ...]``."""

    view: ModelView
    run: Cached
    batch: Batch
    dictionary: Dictionary | DictionarySet
    hooks: list[tuple[str, str]]
    inputs: list[Tensor]
    targets: list[Tensor]
    acts: list[Tensor]
    errors: list[Tensor]
    mask: Tensor

    def cross_writes(self, j: int) -> Tensor:
        """What earlier layers' features write into member ``j``'s output (a cross-layer transcoder; else zero)."""
        out = torch.zeros_like(self.targets[j])
        if isinstance(self.dictionary, DictionarySet):
            for (i, jj), W in self.dictionary.cross.items():
                if jj == j:
                    out = out + self.acts[i] @ W.to(out.device)
        return out


def encode_run(view: ModelView, prompt: PromptInput | None, dictionary: Dictionary | DictionarySet, *,
               extra: list[str] = (), cache: Any = None, attention_mask: Tensor | None = None,
               prepend_bos: bool | None = None, beyond_context: bool = False, what: str = "features") -> Encoded:
    """The shared first step of :func:`features` and feature DLA: check, run (or read ``cache``), encode."""
    hooks = check_dictionary(view, dictionary)
    names = list(dict.fromkeys([h for pair in hooks for h in pair] + list(extra)))
    run = cached_forward(view, prompt, names=names, what=what, cache=cache, attention_mask=attention_mask,
                         prepend_bos=prepend_bos, beyond_context=beyond_context, shape_hook=names[0])
    batch = run.batch
    mask = batch.attention_mask.bool()
    inputs, targets, acts, errors = [], [], [], []
    for d, (h_in, h_out) in zip(members(dictionary), hooks):
        x = read_vectors(run, h_in, d.d_in, "input", view)
        y = x if h_out == h_in else read_vectors(run, h_out, d.d_out, "output", view)
        m = mask.to(x.device)
        a = torch.zeros(*x.shape[:-1], d.n_features, device=x.device)
        with torch.no_grad():
            a[m] = d.to(x.device).encode(x[m])
        inputs.append(x)
        targets.append(y)
        acts.append(a)
    enc = Encoded(view, run, batch, dictionary, hooks, inputs, targets, acts, [], mask)
    for j, d in enumerate(members(dictionary)):
        m = mask.to(inputs[j].device)[..., None]
        recon = d.decode(acts[j], inputs[j]) + enc.cross_writes(j)
        errors.append(((targets[j] - recon) * m).detach())
    enc.errors = errors
    return enc


def feature_labels(dictionary: Dictionary | DictionarySet) -> list[str]:
    """``F{i}`` for one dictionary; ``L{layer}F{i}`` across a set."""
    if isinstance(dictionary, Dictionary):
        return [f"F{i}" for i in range(dictionary.n_features)]
    return [f"L{d.layer if d.layer is not None else j}F{i}" for j, d in enumerate(dictionary.dictionaries)
            for i in range(d.n_features)]


def dictionary_label(dictionary: Dictionary | DictionarySet) -> str:
    if isinstance(dictionary, Dictionary):
        where = f"{dictionary.hook} -> {dictionary.hook_out}" if dictionary.is_transcoder else dictionary.hook
        return f"{dictionary.kind} on {where} ({dictionary.n_features} features)"
    kind = "cross-layer transcoder" if dictionary.cross else "transcoders"
    d0 = dictionary.dictionaries[0]
    return f"{kind} on {len(dictionary.dictionaries)} layers ({d0.hook.split('.', 2)[-1]} -> " \
           f"{d0.writes.split('.', 2)[-1]}, {dictionary.n_features} features)"


def features(
    model: Any,
    prompt: PromptInput | None,
    dictionary: DictionaryInput,
    *,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    beyond_context: bool = False,
    check: bool = True,
) -> FeatureResult:
    """Feature activations of ``dictionary`` at every position of ``prompt``, and its reconstruction error.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), used as you hooked it.
        prompt: a prompt, a list of prompts (right-padded) or token ids ``[batch, pos]`` (with ``attention_mask``
            when padded); with ``cache`` it only supplies the token strings (``None``: placeholders).
        dictionary: a :class:`~mi_lenses.features.dictionary.Dictionary` (SAE or transcoder), a
            :class:`~mi_lenses.features.dictionary.DictionarySet` (per-layer or cross-layer transcoders), or a folder
            :func:`~mi_lenses.load_dictionary` reads.
        cache: an ``ActivationCache`` holding the hooks the dictionary reads and writes, instead of a forward pass.
        attention_mask: with token ids: 1 on real tokens, 0 on padding.
        prepend_bos: add the BOS token when tokenising text prompts (default: the model's setting).
        beyond_context: accept prompts longer than the model's context (``cfg.n_ctx``).
        check: run ``verify()`` before returning (``decode(encode(x)) + error == x``).

    Returns:
        :class:`FeatureResult`: ``activations`` ``[batch, position, feature]`` (dense, zero on padding), ``error``
        ``[batch, position, d_in]`` (``d_out`` for a transcoder; ``[layer, batch, position, d_out]`` for a set).
    """
    view = ModelView(model)
    hooks = active_hooks(view.model)
    dictionary = as_dictionary(dictionary)
    enc = encode_run(view, prompt, dictionary, cache=cache, attention_mask=attention_mask, prepend_bos=prepend_bos,
                     beyond_context=beyond_context)
    single = isinstance(dictionary, Dictionary)
    result = FeatureResult(
        model_name=view.name,
        dictionary_name=dictionary_label(dictionary),
        str_tokens=view.str_tokens(enc.batch, known=prompt is not None),
        offsets=list(enc.batch.offsets),
        activations=(enc.acts[0] if single else torch.cat(enc.acts, -1)).cpu(),
        error=(enc.errors[0] if single else torch.stack(enc.errors)).cpu(),
        labels=feature_labels(dictionary),
        reads=[x.cpu() for x in enc.inputs],
        writes=[y.cpu() for y in enc.targets],
        dictionary=dictionary,
    )
    if check:
        result.verify()
    return recorded(result, hooks)


@dataclass
class FeatureResult(Result):
    """A dictionary's features on a prompt (what :func:`features` returns).

    ``activations[b, p, i]``: feature ``i`` at padded position ``p`` of prompt ``b`` (zero on padding; a set's
    features are concatenated layer by layer, labels ``L{layer}F{i}``); ``error``: what the dictionary misses of the
    activation it reconstructs (see :mod:`mi_lenses.features.reading`); ``reads``/``writes``: per dictionary the
    activation it read and the one it reconstructs, ``[batch, pos, d]``.
    """

    model_name: str
    dictionary_name: str
    str_tokens: list[list[str]]
    offsets: list[int]
    activations: Float[Tensor, "B S F"]
    error: Tensor
    labels: list[str]
    reads: list[Tensor] = field(repr=False)
    writes: list[Tensor] = field(repr=False)
    dictionary: Any = field(default=None, repr=False)

    view_options: ClassVar[dict[str, Any]] = {"top_k": 5, "feature": None}  # see mi_lenses.results

    @property
    def n_batch(self) -> int:
        return int(self.activations.shape[0])

    def column(self, feature: int | str) -> int:
        """The index of ``feature`` (an index, negative from the end, or a label such as ``"F7"``)."""
        n = len(self.labels)
        if isinstance(feature, str) and feature in self.labels:
            return self.labels.index(feature)
        if isinstance(feature, int) and not isinstance(feature, bool) and -n <= feature < n:
            return feature % n
        raise LensInputError(f"no feature {feature!r}: pass an index in [0, {n}) or a label ({self.labels[0]} .. "
                             f"{self.labels[-1]}).")

    @property
    def title(self) -> str:
        return f"Features: {self.dictionary_name} on {self.model_name}"

    @property
    def l0(self) -> Float[Tensor, "B S"]:
        """Active features per position (zero on padding)."""
        return (self.activations != 0).sum(-1)

    def sparse(self) -> Tensor:
        """``activations`` as a torch sparse COO tensor ``[batch, position, feature]``."""
        return self.activations.to_sparse()

    def _errors(self) -> Tensor:
        return self.error if self.error.ndim == 4 else self.error[None]

    def verify(self, tolerance: float = 1e-4) -> FeatureResult:
        """Re-encode every real token and check the activations, then ``decode(activations) + error`` against the
        activation the dictionary reconstructs (``tolerance`` relative to its largest value); a
        :class:`~mi_lenses.errors.VerificationError` says where it fails."""
        ds = members(self.dictionary)
        errors, offset, acts = self._errors(), 0, []
        mask = torch.zeros(self.activations.shape[:2], dtype=torch.bool)
        for b, (o, toks) in enumerate(zip(self.offsets, self.str_tokens)):
            mask[b, o: o + len(toks)] = True
        for d in ds:
            acts.append(self.activations[..., offset: offset + d.n_features])
            offset += d.n_features
        for j, d in enumerate(ds):
            x, y = self.reads[j], self.writes[j]
            with torch.no_grad():
                again = torch.zeros_like(acts[j])
                again[mask] = d.to("cpu").encode(x[mask])
                recon = d.decode(acts[j], x)
                if isinstance(self.dictionary, DictionarySet):
                    for (i, jj), W in self.dictionary.cross.items():
                        if jj == j:
                            recon = recon + acts[i] @ W.cpu()
            scale = float(y[mask].abs().max()) if mask.any() else 1.0
            gap_acts = float((again - acts[j]).abs().max()) if again.numel() else 0.0
            gap = float(((recon + errors[j] - y) * mask[..., None]).abs().max()) if y.numel() else 0.0
            where = f"dictionary {j} ({d.hook})" if len(ds) > 1 else d.hook
            if gap_acts > tolerance * max(1.0, float(acts[j].abs().max())):
                raise VerificationError(f"features of {where}: re-encoding the input gives other activations "
                                        f"(max gap {gap_acts:.3g}).")
            if gap > tolerance * max(scale, 1.0):
                raise VerificationError(f"features of {where}: decode(encode(x)) + error differs from x by "
                                        f"{gap:.3g} (largest |x| {scale:.3g}).")
        return self

    def top(self, top_k: int = 5, *, batch: int = 0, position: int = -1) -> list[tuple[str, float]]:
        """The ``top_k`` most active features at ``position`` (counted in the prompt's own tokens) of prompt
        ``batch`` as ``(label, activation)``."""
        b = self.check_batch(batch)
        n = len(self.str_tokens[b])
        if not -n <= position < n:
            raise LensInputError(f"position {position} is out of range for prompt {b} ({n} tokens).")
        row = self.activations[b, self.offsets[b] + position % n]
        vals, idx = row.topk(min(top_k, row.numel()))
        return [(self.labels[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist()) if v != 0]

    def _rows(self, batch: int, top_k: int, feature: int | str | None = None) -> list[dict[str, Any]]:
        b = self.check_batch(batch)
        err = self._errors()[:, b].norm(dim=-1).sum(0)
        col = None if feature is None else self.column(feature)
        rows = []
        for p, tok in enumerate(self.str_tokens[b]):
            at = self.offsets[b] + p
            rows.append({"position": p, "token": tok, "l0": int(self.l0[b, at]), "error_norm": float(err[at]),
                         "top": [{"feature": label, "activation": v} for label, v in
                                 self.top(top_k, batch=b, position=p)]})
            if col is not None:
                rows[-1]["feature_activation"] = float(self.activations[b, at, col])
        return rows

    def to_dict(self, *, batch: int = 0, top_k: int = 5, feature: int | str | None = None) -> dict[str, Any]:
        """JSON-ready: the dictionary, and per position of prompt ``batch`` its token, active-feature count (L0),
        error norm and ``top_k`` most active features (with ``feature``: also that feature's activation)."""
        return jsonable({"model": self.model_name, "dictionary": self.dictionary_name,
                         "shape": list(self.activations.shape), "positions": self._rows(batch, top_k, feature)})

    def to_dataframe(self):
        """Tidy frame, one row per active (prompt, position, feature): ``batch``, ``position`` (the prompt's own),
        ``token``, ``feature``, ``label``, ``activation``."""
        b, s, i = torch.nonzero(self.activations, as_tuple=True)
        rows = [{"batch": int(bb), "position": int(ss) - self.offsets[bb], "token": self.str_tokens[bb][ss -
                 self.offsets[bb]], "feature": int(ii), "label": self.labels[ii], "activation": float(v)}
                for bb, ss, ii, v in zip(b.tolist(), s.tolist(), i.tolist(), self.activations[b, s, i].tolist())]
        return dataframe(rows or {"batch": [], "position": [], "token": [], "feature": [], "label": [],
                                  "activation": []})

    def table(self, *, batch: int = 0, top_k: int = 5, feature: int | str | None = None):
        """A rich table: per position of prompt ``batch`` its token, L0, error norm and most active features (with
        ``feature``: a column of that feature's activation over the tokens, shaded)."""
        label = None if feature is None else self.labels[self.column(feature)]
        return feature_table(self.title, self._rows(batch, top_k, feature), top_k, label)

    def fragment(self, *, batch: int = 0, top_k: int = 5, feature: int | str | None = None) -> str:
        """The page body: the same table as HTML, then circuitsvis coloured tokens: ``feature``'s activation over
        the prompt's tokens, or (None) a picker over the features in some position's ``top_k``."""
        b = self.check_batch(batch)
        n, o = len(self.str_tokens[b]), self.offsets[b]
        acts = self.activations[b, o: o + n]
        if feature is not None:
            cols = [self.column(feature)]
        else:
            top = acts.topk(min(top_k, acts.shape[-1]), dim=-1)
            chosen = {int(i) for v, i in zip(top.values.flatten().tolist(), top.indices.flatten().tolist()) if v != 0}
            cols = sorted(chosen, key=lambda i: -float(acts[:, i].abs().max()))[:20]
        views = ""
        if cols and n:
            views = (f"<h3>{'Activation over the tokens' if feature is not None else 'Features over the tokens (pick one)'}"
                     "</h3>" + feature_tokens_view(self.str_tokens[b], acts[:, cols].tolist(),
                                                   [self.labels[i] for i in cols]))
        label = None if feature is None else self.labels[cols[0]]
        return feature_fragment(self.title, self._rows(batch, top_k, feature), top_k, views, label)

    def _summary(self) -> str:
        B, S, F = self.activations.shape
        real = sum(len(t) for t in self.str_tokens)
        mean_l0 = float(self.l0.sum()) / max(real, 1)
        return (f"{self.dictionary_name} on {self.model_name!r}: {plural(B, 'prompt')} x {plural(S, 'position')}, "
                f"mean L0 {mean_l0:.1f} of {F}")
