"""Feature DLA: each active feature's direct effect on an answer's logit, a logit difference or a direction.

A dictionary's output is a sum of parts (:meth:`~mi_lenses.features.dictionary.Dictionary.parts`): every feature's
``activation * scale * W_dec[i]``, the bias part, a transcoder's skip part, and the error (what the dictionary
misses). Each part is dotted with the direction carried back from the logit to the hook the dictionary writes
(:func:`~mi_lenses.attribution.directions.write_directions`: the final norm's scale and every norm on the way frozen
from the run), so features + bias + skip + error sum *exactly* to the component's own value in direct logit
attribution: ``dla.mlps[b, l]`` for a dictionary writing ``hook_mlp_out`` (a transcoder), ``dla.attn_out`` for
``hook_attn_out``, the heads' sum for ``attn.hook_z``, and for a residual-stream SAE the residual state's direct
value. ``verify()`` checks that sum.

The **feature logit lens** reads a feature's decoder direction in the residual stream through the final norm's gain
(its scale is a token's, so it is left out) and the unembedding: the tokens it promotes and suppresses most
(:func:`feature_logit_lens`). With ``lens=`` (a ``TunedLens`` or another affine lens) the direction is first read
through the lens's linear map at the residual row that first holds the write (``l + 1`` for a write in block ``l``,
``l`` for ``hook_resid_pre``); a zero-initialised tuned lens is the identity there, so it gives the logit lens.

Example (a transcoder from the MLP's input to its output):
    >>> D, g = model.cfg.d_model, torch.Generator().manual_seed(0)
    >>> d = mi_lenses.Dictionary(torch.randn(D, 32, generator=g), torch.zeros(32), torch.randn(32, D, generator=g),
    ...                          torch.zeros(D), hook="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out")
    >>> r = mi_lenses.feature_dla(model, "The capital of France is", d, answer=" Paris", wrong=" city")
    >>> r.values.shape == (1, d.n_features)
    True
    >>> dla = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris", wrong=" city")
    >>> abs(float(r.total[0] - dla.mlps[0, 1])) < 1e-4      # features + bias + error == the MLP's DLA
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.attribution.directions import (
    Direction,
    TokenSpec,
    effective_directions,
    resolve_direction,
    write_directions,
    write_hooks,
)
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.features.dictionary import Dictionary, DictionarySet, hook_layer
from mi_lenses.features.reading import (
    DictionaryInput,
    Encoded,
    as_dictionary,
    dictionary_label,
    encode_run,
    feature_labels,
    members,
    resolve_hook,
)
from mi_lenses.indexing import resolve_positions
from mi_lenses.lenses.affine import AffineLens, load_lens
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.blocks import is_post_ln
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.features import feature_dla_fragment, feature_dla_table

RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _where(view: ModelView, hook: str) -> tuple[str, int, str | None]:
    """How a dictionary's output hook reaches the residual stream: ``("resid", l, None)`` (it is what is added, or
    the stream itself), ``("sublayer", l, "attn" | "mlp")`` (a sublayer's output before its post-norm and
    multiplier) or ``("z", l, None)`` (the heads' inputs of ``W_O``)."""
    layer = hook_layer(hook)
    tail = hook.split(".", 2)[-1] if layer is not None else hook
    if layer is None:
        raise LensInputError(f"feature DLA reads dictionaries inside the blocks; {hook!r} is not.")
    if tail == "attn.hook_z":
        return "z", layer, None
    for sub in ("attn", "mlp"):
        path = view.sublayer(layer, sub) if (sub == "attn" and view.layout(layer).heads) or \
            (sub == "mlp" and view.has_mlp and view.layout(layer).mlp) else None
        if path is not None and hook == path.out_hook:
            return "sublayer", layer, sub
        if tail in (f"{sub}.hook_out", f"{'ln1' if sub == 'attn' else 'ln2'}_post.hook_in") and path is not None:
            return "sublayer", layer, sub
    if tail in RESIDUAL:
        if view.is_bridge and is_post_ln(view.model):
            raise LensInputError("this model normalises its residual stream after each sublayer (post-LN): a "
                                 f"dictionary on {hook} has no direct effect of its own; use one on a sublayer's "
                                 "output (mlp.hook_out, attn.hook_out).")
        return "resid", layer, None
    raise LensInputError(
        f"feature DLA reads dictionaries that write the residual stream, hook_attn_out / hook_mlp_out, a sublayer's "
        f"output (mlp.hook_out) or attn.hook_z; {hook!r} is none of them.")


def output_directions(view: ModelView, hook: str, d_eff: Tensor, dirs: Any) -> Float[Tensor, "B d_out"]:
    """The direction each row's output at ``hook`` is dotted with (``d_eff``: the final norm's input direction)."""
    kind, layer, sub = _where(view, hook)
    if kind == "resid":
        return dirs.resid[layer] if view.is_bridge and is_post_ln(view.model) else d_eff
    if kind == "sublayer":
        return (dirs.attn if sub == "attn" else dirs.mlp)[layer]
    W_O = view.W_O(layer).to(d_eff.device)  # [H, d_head, d_model]
    return torch.einsum("hdm,bm->bhd", W_O, dirs.attn[layer]).flatten(-2)


def to_residual(view: ModelView, hook: str, vectors: Float[Tensor, "n d_out"]) -> Float[Tensor, "n d_model"]:
    """Decoder directions written at ``hook`` as residual-stream directions (through ``W_O`` for ``hook_z``, a
    post-norm's gain and a residual multiplier for a sublayer's output; a frozen scale is a token's and left out)."""
    kind, layer, sub = _where(view, hook)
    v = vectors.float()
    if kind == "z":
        W_O = view.W_O(layer).to(v.device)
        return torch.einsum("nhd,hdm->nm", v.reshape(v.shape[0], W_O.shape[0], W_O.shape[1]), W_O)
    if kind == "sublayer":
        path = view.sublayer(layer, sub)
        if path.post_norm is not None and path.post_norm.norm.gain is not None:
            if path.post_norm.norm.kind == "LN":
                v = v - v.mean(-1, keepdim=True)
            v = v * path.post_norm.norm.gain.float().to(v.device)
        v = v * path.multiplier
    return v


def lens_row(view: ModelView, hook: str) -> int:
    """The residual row (lens index: 0 = embeddings, ``l`` = output of block ``l - 1``) that first holds what is
    written at ``hook``: a block's input for ``hook_resid_pre``, its output for everything written inside it."""
    layer = hook_layer(hook)
    tail = hook.split(".", 2)[-1] if layer is not None else hook
    if layer is None:
        raise LensInputError(f"the feature logit lens reads dictionaries inside the blocks; {hook!r} is not.")
    if tail == "hook_resid_mid":
        raise LensInputError("a lens maps block inputs and outputs, not resid_mid: read this dictionary's feature "
                             "logit lens without lens=, or use a dictionary on hook_resid_pre / hook_resid_post.")
    return layer if tail == "hook_resid_pre" else layer + 1


def as_affine_lens(view: ModelView, lens: Any) -> Any:
    """``lens`` (an affine lens such as a ``TunedLens``, or a lens folder) bound to the model; ``None`` stays."""
    if lens is None:
        return None
    if isinstance(lens, (str, os.PathLike)):
        lens = load_lens(lens)
    if not isinstance(lens, AffineLens):
        raise LensInputError(f"lens= takes an affine lens (a TunedLens, a fitted lens or its folder) to read feature "
                             f"directions through, got {type(lens).__name__}; leave it out for the logit lens.")
    if getattr(lens, "ahead", 0):
        raise LensInputError(f"this {lens.name} predicts {lens.ahead} token(s) ahead; the feature logit lens reads "
                             "the next token: use a tuned lens.")
    return lens.bind(view.model)


def through_lens(view: ModelView, lens: Any, hook: str, v: Float[Tensor, "n d_model"]) -> Tensor:
    """Residual directions written at ``hook`` read through ``lens``'s linear part at the row that first holds them
    (a direction carries no bias: ``apply(v) - apply(0)``); ``lens=None``: unchanged."""
    if lens is None:
        return v
    row = lens_row(view, hook)
    return lens.apply(v, row) - lens.apply(torch.zeros_like(v), row)


def feature_logit_lens(view: ModelView, hook: str, vectors: Tensor, top_k: int = 10, lens: Any = None
                       ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per decoder direction (``vectors`` ``[n, d_out]`` written at ``hook``): the ``top_k`` tokens it promotes and
    suppresses most, ``(token, logit)``, through ``lens`` (a bound affine lens, e.g. a ``TunedLens``: its map at
    the row that first holds the write; ``None``: the logit lens), the final norm's gain (and centring) and the
    unembedding."""
    return decode_directions(view, through_lens(view, lens, hook, to_residual(view, hook, vectors)), top_k)


def decode_directions(view: ModelView, v: Float[Tensor, "n d_model"], top_k: int
                      ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Residual directions through the final norm's gain (and centring) and the unembedding: per direction the
    ``top_k`` promoted and suppressed tokens ``(token, logit)``."""
    dec = view.decoder
    if dec.kind == "LN":
        v = v - v.mean(-1, keepdim=True)
    logits = v.to(dec.W.device).float() @ dec.W.float()
    k = min(top_k, logits.shape[-1])
    out = []
    for row in logits:
        up, down = row.topk(k), (-row).topk(k)
        out.append(([(view.id_to_str(i), float(x)) for x, i in zip(up.values.tolist(), up.indices.tolist())],
                    [(view.id_to_str(i), -float(x)) for x, i in zip(down.values.tolist(), down.indices.tolist())]))
    return out


def feature_dla(
    model: Any,
    prompt: PromptInput | None,
    dictionary: DictionaryInput,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    direction: Tensor | None = None,
    position: int = -1,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    through_final_norm: bool = True,
    beyond_context: bool = False,
    top_k: int = 10,
    lens: Any = None,
    check: bool = True,
) -> FeatureDLA:
    """Each feature's direct effect on ``answer`` (``- wrong``) or a direction at ``position``, with the bias, skip
    and error parts that complete the component's own direct logit attribution.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), used as you hooked it.
        prompt: a prompt, a list of prompts (right-padded) or token ids ``[batch, pos]``.
        dictionary: a :class:`~mi_lenses.features.dictionary.Dictionary`, a
            :class:`~mi_lenses.features.dictionary.DictionarySet` or a folder :func:`~mi_lenses.load_dictionary`
            reads; it must write a sublayer's output, the residual stream or ``attn.hook_z``.
        answer: the token whose logit is attributed: a string that is exactly one token, an id, or one per prompt.
        wrong: optional token(s) subtracted: the attributed quantity is ``logit[answer] - logit[wrong]``.
        direction: instead of tokens, a ``[d_model]`` or ``[batch, d_model]`` vector read like a column of ``W_U``.
        position: the position attributed, counted in each prompt's own tokens (default ``-1``: its last token).
        cache: an ``ActivationCache`` with the dictionary's hooks and what DLA reads, instead of a forward pass.
        attention_mask: with token ids: 1 on real tokens, 0 on padding.
        prepend_bos: add the BOS token when tokenising text prompts (default: the model's setting).
        through_final_norm: read ``direction`` through the final norm (default) or as a plain residual projection.
        beyond_context: accept prompts longer than the model's context (``cfg.n_ctx``).
        top_k: how many of the largest features get their feature logit lens (promoted and suppressed tokens).
        lens: read the feature logit lens through this lens (a ``TunedLens`` or another affine lens, or its folder:
            its map at the row that first holds the dictionary's write) instead of the logit lens; the attribution
            itself is unchanged.
        check: run ``verify()`` before returning.

    Returns:
        :class:`FeatureDLA`: ``values`` ``[batch, feature]``, ``bias``, ``skip``, ``error`` and ``component``
        ``[batch]``.
    """
    view = ModelView(model)
    hooks = active_hooks(view.model)
    dictionary = as_dictionary(dictionary)
    lens = as_affine_lens(view, lens)
    _check_writes(view, dictionary, position)
    enc = encode_run(view, prompt, dictionary, extra=[*write_hooks(view), view.final_resid_hook], cache=cache,
                     attention_mask=attention_mask, prepend_bos=prepend_bos, beyond_context=beyond_context,
                     what="feature DLA")
    batch = enc.batch
    pos = resolve_positions([position], batch.lengths, batch.offsets, every_prompt=True).index[:, 0]
    at = _picker(pos)
    dirn = resolve_direction(view, batch.shape[0], answer, wrong, direction, through_final_norm)
    parts = _attribute(view, dictionary, enc, dirn, at)
    result = FeatureDLA(
        model_name=view.name,
        metric=dirn.label,
        dictionary_name=dictionary_label(dictionary),
        str_tokens=view.str_tokens(batch, known=prompt is not None),
        positions=(pos - torch.tensor(batch.offsets)).tolist(),
        values=parts.values,
        bias=parts.bias,
        skip=parts.skip,
        error=parts.error,
        component=parts.component,
        labels=feature_labels(dictionary),
        logit_lens=_logit_lens(view, dictionary, parts.values, top_k, lens),
    )
    if check:
        result.verify()
    return recorded(result, hooks)


# ---------------------------------------------------------------------------------------------- prepare
def _check_writes(view: ModelView, dictionary: Dictionary | DictionarySet, position: Any) -> None:
    """Refuse a position that is not an int, and a dictionary whose write has no direct path to the logits, before
    the forward pass."""
    if not isinstance(position, int) or isinstance(position, bool):
        raise LensInputError(f"position must be an int (negative counts from each prompt's end), got {position!r}.")
    for d in members(dictionary):
        _where(view, d.writes)


def _picker(pos: Tensor) -> Callable[[Tensor], Tensor]:
    """``at(t)``: each prompt's row of ``t`` ``[B, S, ...]`` at its attributed position ``pos[b]``, in float32."""
    rows = torch.arange(pos.shape[0])

    def at(t: Tensor) -> Tensor:
        return t[rows.to(t.device), pos.to(t.device)].float()

    return at


# ---------------------------------------------------------------------------------------------- reduce
@dataclass
class _Parts:
    """The parts of the attributed quantity: per feature ``values`` ``[B, F]``, and ``[B]`` the bias, the skip (None
    without a skip transcoder), the error and the component they sum to."""

    values: Tensor
    bias: Tensor
    skip: Tensor | None
    error: Tensor
    component: Tensor


@torch.no_grad()
def _attribute(view: ModelView, dictionary: Dictionary | DictionarySet, enc: Encoded, dirn: Direction,
               at: Callable[[Tensor], Tensor]) -> _Parts:
    """Every part of each member's output dotted with the direction carried back to the hook it writes, plus a
    cross-layer feature's writes into later members' outputs."""
    resid = at(enc.run[view.final_resid_hook])
    d_eff, _ = effective_directions(view, dirn, resid)
    dirs = write_directions(view, d_eff, enc.run, at)
    B = enc.batch.shape[0]
    values, bias, skip, error, component = [], torch.zeros(B), torch.zeros(B), torch.zeros(B), torch.zeros(B)
    has_skip = False
    ws = []
    for j, (d, (_, h_out)) in enumerate(zip(members(dictionary), enc.hooks)):
        w = output_directions(view, h_out, d_eff, dirs).to(enc.inputs[j].device)  # [B, d_out]
        ws.append(w)
        x, a = at(enc.inputs[j]), at(enc.acts[j])
        parts = d.parts(a, x, features=torch.zeros(0, dtype=torch.long))
        proj = w @ d.decoder_rows().to(w.device).T  # [B, n]: each decoder row on the direction
        values.append((a * proj * parts.scale[:, None]).cpu())
        bias += (parts.bias * w).sum(-1).cpu()
        if parts.skip is not None:
            has_skip = True
            skip += (parts.skip * w).sum(-1).cpu()
        error += (at(enc.errors[j]) * w).sum(-1).cpu()
        component += (at(enc.targets[j]) * w).sum(-1).cpu()
    if isinstance(dictionary, DictionarySet):  # a feature's writes into later layers' outputs
        for (i, j), W in dictionary.cross.items():
            values[i] += (at(enc.acts[i]) * (ws[j] @ W.to(ws[j].device).T)).cpu()
    return _Parts(torch.cat(values, -1), bias, skip if has_skip else None, error, component)


# ---------------------------------------------------------------------------------------------- assemble
def _logit_lens(view: ModelView, dictionary: Dictionary | DictionarySet, values: Tensor, top_k: int, lens: Any = None
                ) -> dict[int, dict[str, list]]:
    """The feature logit lens of the ``top_k`` largest features of every prompt (5 tokens each way)."""
    wanted = sorted({int(i) for row in values for i in row.abs().topk(min(top_k, row.numel())).indices.tolist()
                     if row[i] != 0})
    return feature_lens(view, dictionary, wanted, lens)


def feature_lens(view: ModelView, dictionary: Dictionary | DictionarySet, wanted: list[int], lens: Any = None,
                 top_k: int = 5) -> dict[int, dict[str, list]]:
    """The feature logit lens (through ``lens`` if given) of the features ``wanted`` (indices over the whole
    dictionary): ``{feature: {"promoted": [(token, logit)], "suppressed": [...]}}``, ``top_k`` tokens each way."""
    ds, offsets = members(dictionary), [0]
    for d in ds:
        offsets.append(offsets[-1] + d.n_features)
    out: dict[int, dict[str, list]] = {}
    for f in wanted:
        j = max(k for k in range(len(ds)) if offsets[k] <= f)
        i = f - offsets[j]
        d = ds[j]
        hook = resolve_out(view, d)
        v = through_lens(view, lens, hook, to_residual(view, hook, d.decoder_rows()[i: i + 1]))
        if isinstance(dictionary, DictionarySet):  # a cross-layer feature writes into later layers too
            for (s, t), W in dictionary.cross.items():
                if s == j:
                    later = resolve_out(view, ds[t])
                    v = v + through_lens(view, lens, later, to_residual(view, later, W[i: i + 1]))
        ((up, down),) = decode_directions(view, v, top_k)
        out[f] = {"promoted": up, "suppressed": down}
    return out


def resolve_out(view: ModelView, d: Dictionary) -> str:
    return resolve_hook(view, d.writes, "output hook")


@dataclass
class FeatureDLA(Result):
    """Each feature's direct effect at one position per prompt (what :func:`feature_dla` returns).

    ``values[b, i]``: feature ``i``'s part of ``metric`` (zero where it is inactive); ``bias``, ``skip`` (a skip
    transcoder; else None), ``error`` ``[batch]`` the other parts; ``component`` the dictionary's output on the same
    direction, which they sum to (``verify``); ``logit_lens`` maps the largest features to the tokens their decoder
    direction promotes and suppresses.
    """

    model_name: str
    metric: str
    dictionary_name: str
    str_tokens: list[list[str]]
    positions: list[int]
    values: Float[Tensor, "B F"]
    bias: Float[Tensor, " B"]
    skip: Float[Tensor, " B"] | None
    error: Float[Tensor, " B"]
    component: Float[Tensor, " B"]
    labels: list[str]
    logit_lens: dict[int, dict[str, list]] = field(default_factory=dict)

    view_options: ClassVar[dict[str, Any]] = {"top_k": 10}  # see mi_lenses.results

    @property
    def n_batch(self) -> int:
        return int(self.values.shape[0])

    @property
    def title(self) -> str:
        return f"Feature DLA of {self.metric}: {self.dictionary_name} on {self.model_name}"

    @property
    def total(self) -> Float[Tensor, " B"]:
        """Features + bias + skip + error."""
        skip = 0 if self.skip is None else self.skip
        return self.values.sum(-1) + self.bias + skip + self.error

    def verify(self, tolerance: float = 1e-4) -> FeatureDLA:
        """Check that the parts sum to ``component`` (``tolerance`` relative to the largest part)."""
        gap = (self.total - self.component).abs()
        scale = max(1.0, float(self.values.abs().sum(-1).max()), float(self.component.abs().max()))
        if float(gap.max()) > tolerance * scale:
            b = int(gap.argmax())
            raise VerificationError(f"feature DLA of prompt {b}: features + bias + skip + error = "
                                    f"{float(self.total[b]):.6g}, but the component's value is "
                                    f"{float(self.component[b]):.6g}.")
        return self

    def top(self, top_k: int = 10, *, batch: int = 0) -> list[tuple[str, float]]:
        """The ``top_k`` features of prompt ``batch`` with the largest ``|value|`` as ``(label, value)``."""
        row = self.values[self.check_batch(batch)]
        idx = row.abs().topk(min(top_k, row.numel())).indices.tolist()
        return [(self.labels[i], float(row[i])) for i in idx if row[i] != 0]

    def _top_rows(self, batch: int, top_k: int) -> list[dict[str, Any]]:
        b = self.check_batch(batch)
        row = self.values[b]
        out = []
        for i in row.abs().topk(min(top_k, row.numel())).indices.tolist():
            if row[i] == 0:
                continue
            lens = self.logit_lens.get(i, {})
            out.append({"feature": i, "label": self.labels[i], "value": float(row[i]),
                        "promoted": [t for t, _ in lens.get("promoted", [])],
                        "suppressed": [t for t, _ in lens.get("suppressed", [])]})
        return out

    def to_dict(self, *, batch: int = 0, top_k: int = 10) -> dict[str, Any]:
        """JSON-ready: the metric, the parts of prompt ``batch`` and its ``top_k`` features with their logit lens."""
        b = self.check_batch(batch)
        return jsonable({"model": self.model_name, "metric": self.metric, "dictionary": self.dictionary_name,
                         "position": self.positions[b], "token": self.str_tokens[b][self.positions[b]],
                         "component": self.component[b], "bias": self.bias[b], "error": self.error[b],
                         "skip": None if self.skip is None else self.skip[b],
                         "active": int((self.values[b] != 0).sum()), "top_features": self._top_rows(b, top_k)},
                        digits=8)

    def to_dataframe(self):
        """Tidy frame, one row per prompt and active feature (``kind`` "feature") plus the bias, skip and error
        parts: ``batch``, ``kind``, ``label``, ``value``."""
        rows = []
        for b in range(self.n_batch):
            for i in torch.nonzero(self.values[b]).flatten().tolist():
                rows.append({"batch": b, "kind": "feature", "label": self.labels[i], "value": float(self.values[b, i])})
            for kind, t in (("bias", self.bias), ("skip", self.skip), ("error", self.error)):
                if t is not None:
                    rows.append({"batch": b, "kind": kind, "label": kind, "value": float(t[b])})
        return dataframe(rows)

    def _parts(self, b: int) -> str:
        skip = "" if self.skip is None else f", skip {float(self.skip[b]):+.4f}"
        return (f"component {float(self.component[b]):+.4f}, bias {float(self.bias[b]):+.4f}, error "
                f"{float(self.error[b]):+.4f}{skip}")

    def table(self, *, batch: int = 0, top_k: int = 10):
        """A rich table of prompt ``batch``'s ``top_k`` features, their tokens and the other parts."""
        b = self.check_batch(batch)
        return feature_dla_table(self.title, self._parts(b), self._top_rows(b, top_k))

    def fragment(self, *, batch: int = 0, top_k: int = 10) -> str:
        """The page body: the same table as HTML."""
        b = self.check_batch(batch)
        return feature_dla_fragment(self.title, self._parts(b), self._top_rows(b, top_k))

    def _summary(self) -> str:
        top = self.top(1)
        largest = f", largest {top[0][0]} {top[0][1]:+.4f}" if top else ""
        return (f"of {self.metric} on {self.model_name!r}: {self.dictionary_name}, {plural(self.n_batch, 'prompt')}, "
                f"component {float(self.component[0]):+.4f}, error {float(self.error[0]):+.4f}{largest}")
