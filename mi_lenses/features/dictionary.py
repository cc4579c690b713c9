"""Dictionaries: sparse autoencoders (SAEs) and transcoders, one hook point each, and sets of them per layer.

A :class:`Dictionary` reads the activation ``x`` at one TransformerLens hook (``hook``: the residual stream,
``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_z``, an MLP's input, ...) and writes into ``hook_out`` (a transcoder:
an MLP's output) or back into ``hook`` (an SAE)::

    x'   = normalise(x)  (- b_dec, when apply_b_dec_to_input)          the input as the file's owner trained on it
    pre  = x' @ W_enc + b_enc  (* |W_dec| per feature, when rescale_acts_by_decoder_norm)
    acts = activation(pre)       relu | jumprelu (relu where pre > threshold) | topk (the k largest, relu) |
                                 batchtopk (the k * n_tokens largest of all tokens encoded together; with a
                                 threshold: relu where pre > threshold)
    out  = denormalise(acts @ W_dec' + b_dec) (+ x @ W_skip.T, a skip transcoder)     W_dec' = W_dec / |W_dec| under
                                                                                       rescale_acts_by_decoder_norm

``normalize_activations`` is SAELens's run-time normalisation: ``"layer_norm"`` (centre, divide by the unbiased std
+ 1e-5; the output is multiplied back and the mean added) or ``"constant_norm_rescale"`` (scale to norm
``sqrt(d_in)``, undone on the output); a transcoder normalises its input only (as SAELens). Every output is a sum of
**parts** that are linear in the activations: feature ``i`` writes ``acts[i] * scale * W_dec'[i]`` (``scale``: the
token's denormalisation), the bias part is ``scale * b_dec + shift``, the skip part ``x @ W_skip.T``
(:meth:`Dictionary.parts`): what feature DLA attributes.

A :class:`DictionarySet` holds one dictionary per layer (per-layer transcoders), and for a cross-layer transcoder the
decoders from each layer's features into every later layer's output (``cross``).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> d = Dictionary(torch.randn(8, 32, generator=g), torch.zeros(32), torch.randn(32, 8, generator=g),
    ...                torch.zeros(8), hook="blocks.0.hook_resid_post", activation="topk", k=4)
    >>> x = torch.randn(5, 8, generator=g)
    >>> acts = d.encode(x)
    >>> acts.shape, int((acts > 0).sum(-1).max()) <= 4
    (torch.Size([5, 32]), True)
    >>> parts = d.parts(acts, x)
    >>> bool(torch.allclose(parts.features.sum(-2) + parts.bias, d.decode(acts, x), atol=1e-5))
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError

Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
Normalization = Literal["none", "layer_norm", "constant_norm_rescale"]
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
LN_EPS = 1e-5  # SAELens's run-time layer norm: (x - mean) / (std + eps)


def hook_layer(hook: str) -> int | None:
    """The block of a hook name (``blocks.5.hook_mlp_out`` -> 5); None outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


@dataclass
class Parts:
    """What a dictionary writes at each token, split into parts that sum to its output: ``features`` ``[..., n_features,
    d_out]`` is never materialised for all features (see :meth:`Dictionary.parts`), only for the ones asked."""

    features: Float[Tensor, "... n d_out"]
    bias: Float[Tensor, "... d_out"]
    skip: Float[Tensor, "... d_out"] | None
    scale: Float[Tensor, ...]


@dataclass(eq=False)
class Dictionary:
    """A sparse dictionary on one hook: an SAE (``hook_out`` None: it reconstructs ``hook``) or a transcoder
    (``hook_out``: what it predicts, e.g. ``blocks.3.hook_mlp_out`` from ``blocks.3.ln2.hook_normalized``).

    Weights are float32, ``W_enc`` ``[d_in, n_features]``, ``W_dec`` ``[n_features, d_out]``, ``W_skip``
    ``[d_out, d_in]`` (the module docstring has the forward pass). ``meta`` records where the dictionary came from
    (``format``, the file's own config) and, when it was saved with a model, that model's identity
    (:func:`~mi_lenses.models.identity.model_identity`): a dictionary is refused on another model.
    """

    W_enc: Float[Tensor, "d_in n_features"]
    b_enc: Float[Tensor, " n_features"]
    W_dec: Float[Tensor, "n_features d_out"]
    b_dec: Float[Tensor, " d_out"]
    hook: str
    hook_out: str | None = None
    activation: Activation = "relu"
    threshold: Tensor | None = None
    k: float | None = None
    W_skip: Float[Tensor, "d_out d_in"] | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: Normalization = "none"
    rescale_acts_by_decoder_norm: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise LensInputError(f"dictionary {name} must be a floating-point tensor, got {type(t).__name__}.")
            if not torch.isfinite(t).all():
                raise LensInputError(f"dictionary {name} holds non-finite values: the file is corrupt.")
            setattr(self, name, t.detach().float())
        d_in, n = self.W_enc.shape if self.W_enc.ndim == 2 else (None, None)
        want = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, self.W_dec.shape[-1]), "b_dec": (self.W_dec.shape[-1],)}
        if self.W_skip is not None:
            want["W_skip"] = (self.W_dec.shape[-1], d_in)
        for name, shape in want.items():
            if self.W_enc.ndim != 2 or tuple(getattr(self, name).shape) != shape:
                raise LensInputError(f"dictionary {name} has shape {tuple(getattr(self, name).shape)}, expected "
                                     f"{shape} (W_enc [d_in, n_features], W_dec [n_features, d_out]).")
        if self.activation not in ACTIVATIONS:
            raise LensInputError(f"unknown dictionary activation {self.activation!r}; use one of {ACTIVATIONS}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise LensInputError(f"unknown normalize_activations {self.normalize_activations!r}; use one of "
                                 f"{NORMALIZATIONS}.")
        if self.activation == "jumprelu" and self.threshold is None:
            raise LensInputError("a jumprelu dictionary needs its threshold (one per feature).")
        if self.threshold is not None and self.threshold.numel() not in (1, n):
            raise LensInputError(f"threshold has {self.threshold.numel()} values for {n} features.")
        if self.activation in ("topk", "batchtopk") and self.k is None and self.threshold is None:
            raise LensInputError(f"a {self.activation} dictionary needs k (its active features per token).")
        if self.activation == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= n):
            raise LensInputError(f"a topk dictionary needs an int k in 1..{n}, got {self.k!r}.")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise LensInputError("apply_b_dec_to_input needs d_out == d_in (b_dec is subtracted from the input).")

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None

    @property
    def writes(self) -> str:
        """The hook whose value this dictionary reconstructs: ``hook_out``, or ``hook`` for an SAE."""
        return self.hook_out or self.hook

    @property
    def layer(self) -> int | None:
        return hook_layer(self.hook)

    @property
    def kind(self) -> str:
        return ("skip transcoder" if self.W_skip is not None else "transcoder") if self.is_transcoder else "SAE"

    def __repr__(self) -> str:
        where = f"{self.hook} -> {self.hook_out}" if self.is_transcoder else self.hook
        k = f", k={self.k}" if self.k is not None else ""
        return (f"<Dictionary {self.kind} on {where}: {self.n_features} features, {self.activation}{k}, "
                f"d_in {self.d_in}, from {self.meta.get('format', '?')}>")

    # ------------------------------------------------------------------------------------------ the forward pass
    def decoder_rows(self) -> Float[Tensor, "n_features d_out"]:
        """What one unit of feature activation adds before denormalisation: ``W_dec`` (divided by its row norms under
        ``rescale_acts_by_decoder_norm``)."""
        if self.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x normalised, scale, shift)``: the denormalisation is ``y * scale + shift``."""
        x = x.float()
        ones = torch.ones(x.shape[:-1] + (1,), device=x.device)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + LN_EPS), std, mu
        if self.normalize_activations == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, 1.0 / coeff, torch.zeros_like(ones)
        return x, ones, torch.zeros_like(ones)

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_features"]:
        """``x' @ W_enc + b_enc`` (see the module docstring), float32."""
        if x.shape[-1] != self.d_in:
            raise LensInputError(f"this dictionary reads vectors of width {self.d_in} ({self.hook}), got "
                                 f"{x.shape[-1]}.")
        xn, _, _ = self._stats(x)
        if self.apply_b_dec_to_input:
            xn = xn - self.b_dec.to(xn.device)
        pre = xn @ self.W_enc.to(xn.device) + self.b_enc.to(xn.device)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1).to(xn.device)
        return pre

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_features"]:
        """Feature activations of vectors ``x`` (``batchtopk`` without a threshold: all of ``x`` is one batch)."""
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu" or (self.activation == "batchtopk" and self.threshold is not None):
            return pre.relu() * (pre > self.threshold.to(pre.device))
        if self.activation == "topk":
            vals, idx = pre.topk(int(self.k), dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        flat = pre.relu().flatten()  # batchtopk: the k * n_tokens largest of the whole batch
        n_tokens = flat.numel() // self.n_features
        keep = min(flat.numel(), round(float(self.k) * n_tokens))
        vals, idx = flat.topk(keep)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape)

    def parts(self, acts: Float[Tensor, "... n_features"], x: Float[Tensor, "... d_in"],
              features: Tensor | None = None) -> Parts:
        """The output split into parts (module docstring): ``features`` ``[..., len(features), d_out]`` for the
        feature indices ``features`` (default all: mind the size), the bias part and the skip part."""
        _, scale, shift = self._stats(x)
        if self.is_transcoder:  # SAELens: a transcoder's output is not denormalised
            scale, shift = torch.ones_like(scale), torch.zeros_like(shift)
        rows = self.decoder_rows().to(acts.device)
        idx = torch.arange(self.n_features, device=acts.device) if features is None else features.to(acts.device)
        feats = acts.float()[..., idx, None] * rows[idx] * scale[..., None, :]
        bias = self.b_dec.to(acts.device) * scale + shift
        skip = None if self.W_skip is None else x.float() @ self.W_skip.to(acts.device).T
        return Parts(feats, bias, skip, scale[..., 0])

    def decode(self, acts: Float[Tensor, "... n_features"], x: Float[Tensor, "... d_in"] | None = None
               ) -> Float[Tensor, "... d_out"]:
        """The output of feature activations ``acts``; ``x`` (the input) is needed for a normalising dictionary or a
        skip connection."""
        if x is None and (self.normalize_activations != "none" or self.W_skip is not None):
            raise LensInputError("this dictionary normalises its input or has a skip connection: pass the input x.")
        if x is None:
            return acts.float() @ self.decoder_rows().to(acts.device) + self.b_dec.to(acts.device)
        _, scale, shift = self._stats(x)
        if self.is_transcoder:
            scale, shift = torch.ones_like(scale), torch.zeros_like(shift)
        out = (acts.float() @ self.decoder_rows().to(acts.device) + self.b_dec.to(acts.device)) * scale + shift
        if self.W_skip is not None:
            out = out + x.float() @ self.W_skip.to(acts.device).T
        return out

    def to(self, device: torch.device | str) -> Dictionary:
        """The dictionary with its tensors on ``device`` (in place; returned)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self


@dataclass(eq=False)
class DictionarySet:
    """One dictionary per layer (``dictionaries``, in layer order): per-layer transcoders, or a cross-layer transcoder
    whose features of layer ``i`` also write into the output of every later dictionary ``j`` through
    ``cross[(i, j)]`` ``[n_features, d_out]`` (``dictionaries[j].b_dec`` is layer ``j``'s decoder bias)."""

    dictionaries: list[Dictionary]
    cross: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dictionaries:
            raise LensInputError("a dictionary set needs at least one dictionary.")
        for (i, j), W in self.cross.items():
            if not 0 <= i < j < len(self.dictionaries):
                raise LensInputError(f"cross decoder ({i}, {j}) must go from a layer to a later one.")
            want = (self.dictionaries[i].n_features, self.dictionaries[j].d_out)
            if tuple(W.shape) != want:
                raise LensInputError(f"cross decoder ({i}, {j}) has shape {tuple(W.shape)}, expected {want}.")
            self.cross[(i, j)] = W.detach().float()

    @property
    def n_features(self) -> int:
        return sum(d.n_features for d in self.dictionaries)

    @property
    def offsets(self) -> list[int]:
        """Where each dictionary's features start in the concatenated feature axis."""
        out, at = [], 0
        for d in self.dictionaries:
            out.append(at)
            at += d.n_features
        return out

    @property
    def is_cross_layer(self) -> bool:
        return bool(self.cross)

    def __repr__(self) -> str:
        kind = "cross-layer transcoder" if self.cross else "dictionary set"
        return (f"<DictionarySet {kind}: {len(self.dictionaries)} layers ({self.dictionaries[0].hook} -> "
                f"{self.dictionaries[0].writes}, ...), {self.n_features} features, from "
                f"{self.meta.get('format', '?')}>")

    def to(self, device: torch.device | str) -> DictionarySet:
        for d in self.dictionaries:
            d.to(device)
        self.cross = {k: v.to(device) for k, v in self.cross.items()}
        return self
