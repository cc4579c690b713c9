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

NormKind = Literal["LN", "RMS"]


@dataclass(eq=False)
class Decoder:
    """Final norm (``kind``, ``eps``, ``gain``, ``bias``), unembedding (``W_U``, ``b_U``) and soft-cap of one model.

    ``W``/``b`` hold the gain and bias folded in (float32); ``b`` is ``None`` when it is all zeros. Hidden states are
    decoded in float32 unless a matmul ``dtype`` is given (statistics are always reduced in float32).
    """

    kind: NormKind | None
    eps: float
    gain: Float[Tensor, " d_model"] | None
    bias: Float[Tensor, " d_model"] | None
    W: Float[Tensor, "d_model d_vocab"]
    b: Float[Tensor, " d_vocab"] | None
    softcap: float | None
    _copies: dict = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model: Any) -> "Decoder":
        """Read the final norm from ``model.ln_final`` (parameters ``weight``/``w`` and ``bias``/``b``; Gemma-style
        ``1 + w`` via ``cfg.rmsnorm_uses_offset``) and the unembedding from ``model.W_U``/``model.b_U``."""
        cfg = model.cfg
        norm_type = getattr(cfg, "normalization_type", None)
        kinds = {"LN": "LN", "LNPre": "LN", "RMS": "RMS", "RMSPre": "RMS", None: None}
        if norm_type not in kinds:
            raise LensInputError(f"unsupported final normalization_type {norm_type!r}: mi_lenses decodes LayerNorm "
                                 "and RMSNorm models.")
        kind = kinds[norm_type]
        gain = bias = None
        eps = float(getattr(cfg, "eps", 1e-5))
        module = getattr(model, "ln_final", None) if kind is not None else None
        if module is not None:
            for name, p in module.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("weight", "w"):
                    gain = p.detach().float().clone()
                elif leaf in ("bias", "b"):
                    bias = p.detach().float().clone()
            eps = next((float(v) for sub in module.modules() for v in (getattr(sub, "variance_epsilon", None),
                        getattr(sub, "eps", None)) if isinstance(v, float)), eps)
        if gain is not None and kind == "RMS" and getattr(cfg, "rmsnorm_uses_offset", False):
            gain = 1.0 + gain
        W_U = model.W_U.detach().float()
        b_U = getattr(model, "b_U", None)
        b = None if b_U is None else b_U.detach().float().clone()
        if bias is not None:
            b = bias @ W_U if b is None else b + bias @ W_U
        W = gain[:, None] * W_U if gain is not None else W_U.clone()
        if b is not None and not torch.any(b):
            b = None
        cap = getattr(cfg, "output_logits_soft_cap", None)
        softcap = float(cap) if cap is not None and cap > 0 else None
        return cls(kind, eps, gain, bias, W.contiguous(), b, softcap)

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


# ---------------------------------------------------------------------------------------------- one per model
_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, Decoder]]" = weakref.WeakKeyDictionary()


def _version_key(model: Any) -> tuple:
    """What the decoder depends on: the unembedding's and the final norm's storage and version counters, the norm
    type and compatibility mode. Any in-place update of those weights (or re-folding them) changes the key."""
    tensors = [model.W_U, getattr(model, "b_U", None)]
    module = getattr(model, "ln_final", None)
    if module is not None:
        tensors += list(module.parameters())
    parts = tuple((t.data_ptr(), t._version, tuple(t.shape)) if isinstance(t, Tensor) else None for t in tensors)
    cfg = model.cfg
    return parts + (getattr(cfg, "normalization_type", None), getattr(model, "compatibility_mode", None),
                    getattr(cfg, "output_logits_soft_cap", None))


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
