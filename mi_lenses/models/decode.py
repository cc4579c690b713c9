"""The decoder: final norm, unembedding and logit soft-cap. Every lens, the streaming statistics, tuned-lens training
and direct logit attribution decode through this one object (like tuned-lens's ``Unembed``).

The norm's statistics are recomputed from each vector, then its own gain and bias are applied: on a raw
``TransformerBridge`` the RMSNorm gain is *not* folded into ``W_U``, and reading the gain from the module makes raw and
folded models decode alike. Gain and bias are folded into ``W``/``b`` once, when the decoder is built:

    decode(x) = cap(normalize(x) @ W + b),   W = diag(gain) W_U,   b = b_U + bias @ W_U

A decoder is built once per model and rebuilt only when the model's unembedding or final-norm weights change
(tracked by tensor version counters), so every call site sees the same numbers.

Example:
    >>> dec = ModelView(model).decoder
    >>> dec.kind, dec.W.shape == (model.cfg.d_model, model.cfg.d_vocab)
    ('RMS', True)
    >>> tokens = model.to_tokens("The capital of France is")
    >>> logits, cache = model.run_with_cache(tokens)
    >>> final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    >>> bool(torch.allclose(dec.logits(final).log_softmax(-1), logits.log_softmax(-1), atol=1e-4))
    True
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.kv import is_bridge

NormKind = Literal["LN", "RMS"]


@dataclass(eq=False)
class Norm:
    """A LayerNorm (``kind="LN"``) or RMSNorm (``"RMS"``) read from a model's module: ``eps``, ``gain`` and ``bias``
    (float32; a norm without parameters, like OLMo's, has gain 1 and no bias).

    Linearised with its scale ``s`` frozen from a run, the norm is the affine map ``x -> gain * centre(x) / s + bias``
    (``centre`` only for LayerNorm): :meth:`pullback` takes a direction on its output back to its input, which is how
    direct logit attribution carries the logit through the final norm and through every norm on a component's way
    to it (sublayer post-norms, post-LN residual norms).

    >>> norm = Norm("LN", 1e-5, torch.tensor([2.0, 1.0, 0.5]), None)
    >>> x, d = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.3, -1.0, 2.0])
    >>> s = norm.scale(x)
    >>> out = norm.gain * (x - x.mean()) / s                 # the norm's output at x
    >>> bool(torch.isclose(x @ norm.pullback(d, s), out @ d))   # the direction carried back to its input
    True
    """

    kind: NormKind
    eps: float
    gain: Float[Tensor, " d_model"] | None
    bias: Float[Tensor, " d_model"] | None

    @classmethod
    def from_module(cls, module: Any, kind: NormKind, eps: float, *, offset: bool = False) -> "Norm":
        """Parameters ``weight``/``w`` and ``bias``/``b`` of ``module``, the gain ``1 + w`` where the module stores it
        as an offset from 1 (Gemma's RMSNorm, Nemotron's LayerNorm1P: the bridge's ``uses_weight_offset``, else
        ``offset``); its epsilon from ``variance_epsilon``/``eps`` where the module has one, else ``eps``."""
        gain = bias = None
        params = list(module.named_parameters())
        for name, p in params:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("weight", "w"):
                gain = p.detach().float().clone()
            elif leaf in ("bias", "b"):
                bias = p.detach().float().clone()
        flag = getattr(module, "uses_weight_offset", None)
        if gain is not None and (flag if isinstance(flag, bool) else offset):
            gain = 1.0 + gain
        if not params:  # a norm without parameters (OLMo v1's LayerNorm): gain 1, no bias
            width = getattr(module, "normalized_shape", None)
            d = int(width[0]) if isinstance(width, (tuple, list)) and width else None
            gain = torch.ones(d) if d is not None else None
        eps = next((float(v) for sub in module.modules() for v in (getattr(sub, "variance_epsilon", None),
                    getattr(sub, "eps", None)) if isinstance(v, float)), eps)
        return cls(kind, eps, gain, bias)

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The norm's scale of each vector, float32: ``sqrt(var + eps)`` (LayerNorm), ``sqrt(mean(x²) + eps)``
        (RMSNorm)."""
        x = x.float()
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)

    def pullback(self, d: Float[Tensor, "... d_model"], scale: Float[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """A direction ``d`` on the norm's output taken back to its input with the scale frozen: ``x · result ==
        (gain * centre(x) / scale) · d`` for every ``x``."""
        v = d.float() if self.gain is None else d.float() * self.gain.to(d.device)
        if self.kind == "LN":
            v = v - v.mean(-1, keepdim=True)
        return v / scale[..., None]

    def constant(self, d: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."] | None:
        """``bias · d``: what the norm adds on direction ``d`` whatever its input (``None`` without a bias)."""
        if self.bias is None or not torch.any(self.bias):
            return None
        return d.float() @ self.bias.to(d.device)


@dataclass(eq=False)
class Decoder:
    """Final norm (``kind``, ``eps``, ``gain``, ``bias``), unembedding and logit transform of one model.

    The unembedding is everything the model applies after its final norm, read once: a projection out of the residual
    width (OPT-350m's ``project_out``, folded in as ``P``), ``W_U``/``b_U``, a logit multiplier (Cohere's
    ``logit_scale`` on a raw bridge; TransformerLens folds it into ``W_U`` in compatibility mode) or divisor
    (Granite's ``logits_scaling``), and the soft-cap (Gemma 2). A model without a final norm (OPT-350m) has
    ``kind=None``. ``W``/``b`` hold all of it but the cap, the gain and bias folded in (float32):

        W = diag(gain) P W_U * m,   b = (b_U + bias @ P W_U) * m

    ``b`` is ``None`` when it is all zeros. Hidden states are decoded in float32 unless a matmul ``dtype`` is given
    (statistics are always reduced in float32).
    """

    kind: NormKind | None
    eps: float
    gain: Float[Tensor, " d_model"] | None
    bias: Float[Tensor, " d_model"] | None
    W: Float[Tensor, "d_model d_vocab"]
    b: Float[Tensor, " d_vocab"] | None
    softcap: float | None
    proj: Float[Tensor, "d_model d_unembed"] | None = None  # P (None: identity)
    logit_mult: float = 1.0  # m
    W_U: Tensor | None = field(default=None, repr=False)  # the model's own W_U (a reference, not a copy)
    b_U: Tensor | None = field(default=None, repr=False)  # b_U plus the projection's bias part, before m
    _copies: dict = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model: Any) -> "Decoder":
        """Read the final norm from ``model.ln_final`` (see :meth:`Norm.from_module`; Gemma-style ``1 + w`` via
        ``cfg.rmsnorm_uses_offset``; a bridge without ``ln_final`` has no final norm), the unembedding from
        ``model.W_U``/``model.b_U`` and, on a bridge, ``project_out`` and the HF model's logit multiplier."""
        cfg = model.cfg
        norm_type = getattr(cfg, "normalization_type", None)
        kinds = {"LN": "LN", "LNPre": "LN", "RMS": "RMS", "RMSPre": "RMS", None: None}
        if norm_type not in kinds:
            raise LensInputError(f"unsupported final normalization_type {norm_type!r}: mi_lenses decodes LayerNorm "
                                 "and RMSNorm models.")
        kind = kinds[norm_type]
        module = getattr(model, "ln_final", None) if kind is not None else None
        if module is None and is_bridge(model):
            kind = None  # the HF model has no final norm (OPT-350m: project_out reads the last block directly)
        gain = bias = None
        eps = float(getattr(cfg, "eps", 1e-5))
        if module is not None:
            norm = Norm.from_module(module, kind, eps,
                                    offset=kind == "RMS" and bool(getattr(cfg, "rmsnorm_uses_offset", False)))
            gain, bias, eps = norm.gain, norm.bias, norm.eps
        W_U = model.W_U.detach().float()
        b_U = getattr(model, "b_U", None)
        b_U = None if b_U is None else b_U.detach().float()
        proj, proj_b = _project_out(model)
        mult = logit_multiplier(model)
        U = W_U if proj is None else proj @ W_U
        if proj_b is not None:
            b_U = proj_b @ W_U if b_U is None else b_U + proj_b @ W_U
        b = None if b_U is None else b_U.clone()
        if bias is not None:
            b = bias @ U if b is None else b + bias @ U
        W = gain[:, None] * U if gain is not None else U.clone()
        if mult != 1.0:
            W = W * mult
            b = None if b is None else b * mult
        if b is not None and not torch.any(b):
            b = None
        cap = getattr(cfg, "output_logits_soft_cap", None)
        softcap = float(cap) if cap is not None and cap > 0 else None
        return cls(kind, eps, gain, bias, W.contiguous(), b, softcap, proj, mult, model.W_U, b_U)

    @property
    def norm(self) -> Norm | None:
        """The final norm as a :class:`Norm` (``None`` when the model has none)."""
        return None if self.kind is None else Norm(self.kind, self.eps, self.gain, self.bias)

    def unembed_columns(self, ids: Int[Tensor, " n"]) -> tuple[Float[Tensor, "d_model n"], Float[Tensor, " n"] | None]:
        """The unembedding of tokens ``ids`` *before* the final norm's gain and bias: ``(P W_U[:, ids] * m,
        (b_U[ids] + P-bias part) * m)`` (the bias ``None`` when the model has none), float32."""
        W_U = self.W_U.detach().float()
        ids = ids.to(W_U.device)
        U = W_U[:, ids]
        if self.proj is not None:
            U = self.proj.to(U.device) @ U
        c = None if self.b_U is None else self.b_U.to(U.device)[ids]
        if self.logit_mult != 1.0:
            U = U * self.logit_mult
            c = None if c is None else c * self.logit_mult
        return U, c

    # ------------------------------------------------------------------------------------------ the norm
    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The final norm's scale of each vector, float32: ``sqrt(var + eps)`` (LayerNorm), ``sqrt(mean(x²) + eps)``
        (RMSNorm), ones without a final norm. DLA freezes it from the run."""
        x = x.float()
        if self.kind is None:
            return torch.ones(x.shape[:-1], device=x.device)
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)

    def normalize(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The final norm *without* its gain and bias (those live in ``W``/``b``): centre (LayerNorm) and divide by
        the scale, in float32."""
        x = x.float()
        if self.kind is None:
            return x
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    # ------------------------------------------------------------------------------------------ the unembedding
    def weights(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
        """``(W, b)`` in the matmul ``dtype`` (low-precision copies are made once and kept)."""
        if dtype == torch.float32:
            return self.W, self.b
        if dtype not in self._copies:
            self._copies[dtype] = (self.W.to(dtype), None if self.b is None else self.b.to(dtype))
        return self._copies[dtype]

    def cap(self, z: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """The logit soft-cap ``c * tanh(z / c)`` (identity when the model has none)."""
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def uncap(self, z: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """The logits before the soft-cap, from capped ones (``c * atanh(z / c)``; identity without a cap)."""
        if self.softcap is None:
            return z
        return self.softcap * torch.atanh((z / self.softcap).clamp(-1 + 1e-7, 1 - 1e-7))

    def tile(self, xn: Float[Tensor, "n d_model"], lo: int, hi: int, *, out: Tensor | None = None) -> Float[Tensor, "n w"]:
        """Capped float32 logits of normalised vectors ``xn`` (in the matmul dtype) for vocabulary columns
        ``lo:hi``; written into ``out`` when given (float32 inputs only)."""
        W, b = self.weights(xn.dtype)
        z = torch.mm(xn, W[:, lo:hi], out=out) if out is not None else xn @ W[:, lo:hi]
        if b is not None:
            z += b[lo:hi]
        return self.cap(z.float())

    def columns(self, xn: Float[Tensor, "n d_model"], ids: Int[Tensor, "n t"]) -> Float[Tensor, "n t"]:
        """Capped float32 logits of ``xn[i]`` at the token ids ``ids[i]`` only (no other column is computed)."""
        W, b = self.weights(xn.dtype)
        z = torch.einsum("nd,ntd->nt", xn, W.t()[ids])
        if b is not None:
            z = z + b[ids]
        return self.cap(z.float())

    def logits(
        self, x: Float[Tensor, "... d_model"], *, normalized: bool = False, dtype: torch.dtype = torch.float32
    ) -> Float[Tensor, "... d_vocab"]:
        """Full float32 logits of residual vectors ``x`` (``normalized=True``: ``x`` already went through
        :meth:`normalize`). On the final residual stream this equals the model's own logits."""
        W, _ = self.weights(dtype)
        xn = (x if normalized else self.normalize(x.to(W.device))).to(dtype)
        return self.tile(xn.reshape(-1, xn.shape[-1]), 0, W.shape[1]).reshape(*xn.shape[:-1], -1)

    def lse_grad(self, xn: Float[Tensor, "n d_model"]) -> tuple[Float[Tensor, " n"], Float[Tensor, "n d_model"]]:
        """``logsumexp(z)`` of the logits ``z`` of normalised vectors ``xn`` and its gradient with respect to ``xn``,
        ``(softmax(z) * cap'(z)) @ W.T`` (float32).

        This is an attention with the unembedding as keys *and* values, so on the CPU in float32 without a soft-cap it
        runs as PyTorch's fused flash-attention kernel: one pass over the vocabulary in cache-sized blocks, the logits
        never materialised (tuned-lens training's per-layer cost is this call). Elsewhere it decodes the full logits.
        """
        xn = xn.float()
        if self.fused_lse_grad(xn.device):
            WT = self._copies.get("T")
            if WT is None:  # the kernel needs a contiguous [vocab, d_model] copy (it misreads a transposed view)
                WT = self._copies["T"] = self.W.T.contiguous()
            mask = None if self.b is None else self.b.view(1, 1, 1, -1)
            out, lse = _FLASH_CPU(xn.contiguous()[None, None], WT[None, None], WT[None, None], 0.0, False,
                                  attn_mask=mask, scale=1.0)
            return lse[0, 0], out[0, 0]
        z = self.logits(xn, normalized=True)
        lse = torch.logsumexp(z, -1)
        if self.softcap is None:
            return lse, self.project(z.sub_(lse[:, None]).exp_())  # in place: one [n, vocab] buffer
        return lse, self.backward(torch.exp(z - lse[:, None]), z)

    def fused_lse_grad(self, device: torch.device) -> bool:
        """Whether :meth:`lse_grad` runs fused on ``device`` (the CPU, no soft-cap, PyTorch's kernel passed its
        probe); elsewhere it materialises the logits."""
        return self.softcap is None and torch.device(device).type == "cpu" and _flash_cpu_works()

    def release(self) -> None:
        """Drop the extra weight copies (the transposed unembedding of :meth:`lse_grad`, low-precision copies); they
        are rebuilt on demand."""
        self._copies.clear()

    def row_blocks(self, xn: Float[Tensor, "n d_model"], dtype: torch.dtype = torch.float32,
                   block_bytes: int | None = None) -> Iterator[tuple[slice, Float[Tensor, "r d_vocab"]]]:
        """Capped float32 logits of normalised vectors ``xn``, a block of rows at a time: one matmul (in ``dtype``)
        for all rows, then each block converted, biased and capped while it is in cache. Yields ``(rows, z)``; ``z``
        is the caller's to modify in place. Blocks hold about ``block_bytes`` of float32 logits, at least 8 rows
        (default 2 MiB on the CPU, measured: on a 49k vocabulary 8-32 rows run alike, 2 rows 35% slower; one block
        elsewhere, where many small kernels would cost more than the memory they save)."""
        W, _ = self.weights(dtype)
        raw = xn.to(dtype) @ W
        if block_bytes is None:
            block_bytes = ROW_BLOCK_BYTES if raw.device.type == "cpu" else 4 * raw.numel()
        step = max(1, min(len(raw), max(8, block_bytes // (4 * W.shape[1]))))
        for a in range(0, len(raw), step):
            z = raw[a : a + step].float()
            if self.b is not None:
                z = z + self.b
            yield slice(a, a + step), self.cap(z)

    def cap_grad(self, z_capped: Float[Tensor, "..."]) -> Float[Tensor, "..."] | None:
        """The soft-cap's derivative at capped logits, ``1 - (z / c)²`` (``None`` without a cap)."""
        return None if self.softcap is None else 1 - (z_capped / self.softcap).square()

    def project(self, dz: Float[Tensor, "n d_vocab"], dtype: torch.dtype = torch.float32) -> Float[Tensor, "n d_model"]:
        """``dz @ W.T`` in the matmul ``dtype``, float32 out: a gradient with respect to the capped logits (cap's
        derivative already applied) taken back to the *normalised* input."""
        W, _ = self.weights(dtype)
        return (dz.to(dtype) @ W.T).float()

    def backward(self, dz: Float[Tensor, "n d_vocab"], z_capped: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> Float[Tensor, "n d_model"]:
        """Gradient with respect to the *normalised* input, given the gradient ``dz`` with respect to the capped
        logits ``z_capped`` (needed only when the model soft-caps): ``(dz * cap') @ W.T``, float32."""
        if self.softcap is not None:
            dz = dz * self.cap_grad(z_capped)
        return self.project(dz, dtype)


ROW_BLOCK_BYTES = 2 << 20  # row_blocks on the CPU

# PyTorch's CPU flash-attention kernel, which also returns the logsumexp (a private op, present since torch 2.3)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_OK: list[bool] = []


def _flash_cpu_works() -> bool:
    """Whether the kernel exists and, probed once on a small case with a bias, gives the logsumexp and the softmax
    average of the materialised computation; if not, :meth:`Decoder.lse_grad` materialises (same numbers, slower)."""
    if not _FLASH_OK:
        ok = False
        if _FLASH_CPU is not None:
            try:
                g = torch.Generator().manual_seed(0)  # several query and key blocks of the kernel, a broadcast bias
                x, wt, b = (torch.randn(*shape, generator=g) for shape in ((70, 8), (1100, 8), (1100,)))
                out, lse = _FLASH_CPU(x[None, None], wt[None, None], wt[None, None], 0.0, False,
                                      attn_mask=b.view(1, 1, 1, -1), scale=1.0)
                z = x @ wt.T + b
                ok = bool(torch.allclose(lse[0, 0], z.logsumexp(-1), atol=1e-5)
                          and torch.allclose(out[0, 0], z.softmax(-1) @ wt, atol=1e-5))
            except (RuntimeError, TypeError):  # another signature or a missing kernel in this torch build
                ok = False
        _FLASH_OK.append(ok)
    return _FLASH_OK[0]


def _project_out(model: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(P, bias)`` of a bridge's ``project_out`` (OPT-350m: ``x -> x P + bias`` from the residual width to the
    unembedding's), float32 ``[d_model, d_unembed]``; ``(None, None)`` without one."""
    po = getattr(model, "project_out", None)
    weight = getattr(po, "weight", None) if po is not None else None
    if not isinstance(weight, Tensor):
        return None, None
    bias = getattr(po, "bias", None)
    return weight.detach().float().T.contiguous(), (bias.detach().float() if isinstance(bias, Tensor) else None)


def logit_multiplier(model: Any) -> float:
    """What the HF model multiplies its logits by after the unembedding: Cohere's ``logit_scale`` (the live module
    attribute: TransformerLens sets it to 1 when compatibility mode folds it into ``W_U``), Falcon-H1's
    ``lm_head_multiplier`` (on its decoder module), one over Granite's ``logits_scaling``; 1 elsewhere (and on a HookedTransformer, whose ``W_U`` holds it)."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        return 1.0
    mult = 1.0
    scale = getattr(hf, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        mult *= float(scale)
    base = getattr(hf, "model", None)  # Falcon-H1's lm_head_multiplier (on its decoder, read live like logit_scale)
    head = getattr(base, "lm_head_multiplier", None) if isinstance(base, torch.nn.Module) else None
    if isinstance(head, (int, float)) and not isinstance(head, bool):
        mult *= float(head)
    div = getattr(getattr(hf, "config", None), "logits_scaling", None)
    if isinstance(div, (int, float)) and not isinstance(div, bool) and div:
        mult /= float(div)
    return mult


# ---------------------------------------------------------------------------------------------- one per model
_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, Decoder]]" = weakref.WeakKeyDictionary()


def _version_key(model: Any) -> tuple:
    """What the decoder depends on: the unembedding's and the final norm's storage and version counters, the norm
    type and compatibility mode. Any in-place update of those weights (or re-folding them) changes the key."""
    tensors = [model.W_U, getattr(model, "b_U", None)]
    for name in ("ln_final", "project_out"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            tensors += list(module.parameters())
    parts = tuple((t.data_ptr(), t._version, tuple(t.shape)) if isinstance(t, Tensor) else None for t in tensors)
    cfg = model.cfg
    return parts + (getattr(cfg, "normalization_type", None), getattr(model, "compatibility_mode", None),
                    getattr(cfg, "output_logits_soft_cap", None), logit_multiplier(model))


def decoder_of(model: Any) -> Decoder:
    """The model's decoder, built once and rebuilt only when the weights it reads change."""
    key = _version_key(model)
    try:
        hit = _CACHE.get(model)
    except TypeError:  # not weak-referenceable: build every time
        return Decoder.from_model(model)
    if hit is None or hit[0] != key:
        hit = (key, Decoder.from_model(model))
        _CACHE[model] = hit
    return hit[1]
