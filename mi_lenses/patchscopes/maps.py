"""Affine maps ``f(h) = h W + b`` between hidden spaces (models or layers), fitted by least squares.

Example (across models: ``fit_map(small, data, 3, target_model=large, target_layer=10)``; here across layers):
    >>> text = mi_lenses.data.EVAL_TEXT.read_text()[:3000]           # varied tokens: more states than d_model
    >>> same = fit_map(model, text, source_layer=1, target_layer=1)   # a layer onto itself: the identity map
    >>> round(same.r2, 6), bool(torch.allclose(same.weight, torch.eye(model.cfg.d_model), atol=1e-4))
    (1.0, True)
    >>> f = fit_map(model, text, source_layer=0, target_layer=2, ridge=1e-2)   # r2: held-out R^2
    >>> 0.5 < f.r2 < 0.99                      # layer 2 is largely, not exactly, an affine function of layer 0
    True
    >>> res = mi_lenses.patchscope(model, Source("The capital of France is", layers=0),
    ...                            presets.identity().replace(layer=2, map=f))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mi_lenses.atomic import write_file_atomic
from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView
from mi_lenses.patchscopes.spec import POINT, resolve_layer


@dataclass
class AffineMap:
    """``f(h) = h @ weight + bias`` with ``weight`` ``[d_in, d_out]``; ``r2`` is the held-out fit quality (if known)."""

    weight: Float[Tensor, "d_in d_out"]
    bias: Float[Tensor, " d_out"]
    r2: float | None = None

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, h: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        if h.shape[-1] != self.d_in:
            raise LensInputError(f"the map takes vectors of size {self.d_in}, got {tuple(h.shape)}.")
        W = self.weight.to(h.device)
        return (h.to(W.dtype) @ W + self.bias.to(h.device)).to(h.dtype)

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.safetensors`` file atomically."""
        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}
        return write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"r2": repr(self.r2)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AffineMap":
        """Read a map written by :meth:`save` (safetensors: no code can run), checked for completeness, shapes and
        finite values."""
        path = Path(path)
        if not path.is_file():
            raise LensInputError(f"{path} is not a file: pass the .safetensors file AffineMap.save wrote.")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise LensInputError(f"cannot read {path} ({err}): the map file is corrupt or truncated.") from err
        if set(tensors) != {"weight", "bias"}:
            raise LensInputError(f"{path} holds {sorted(tensors)}, not an affine map (weight, bias): pass the file "
                                 "AffineMap.save wrote.")
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[1],) or not weight.is_floating_point():
            raise LensInputError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not make an "
                                 "affine map [d_in, d_out] + [d_out]: the file is corrupt.")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise LensInputError(f"{path} holds non-finite values: refit the map.")
        r2 = meta.get("r2", "None")
        return cls(weight.float(), bias.float(), None if r2 == "None" else float(r2))


def fit(
    X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"], ridge: float = 0.0, holdout: float = 0.0
) -> AffineMap:
    """Least-squares affine map with ``X W + b ~ Y`` (float64 solve; optional ridge on ``W``).

    ``holdout`` (a fraction) keeps the last rows out of the fit and reports their ``R^2`` in ``map.r2``; with 0 the
    in-sample ``R^2`` is reported.
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise LensInputError(f"fit needs X [n, d_in] and Y [n, d_out] with the same n, got {tuple(X.shape)}, "
                             f"{tuple(Y.shape)}.")
    if not 0.0 <= holdout < 1.0:
        raise LensInputError(f"holdout must be a fraction in [0, 1), got {holdout!r}.")
    n = X.shape[0]
    n_fit = n - int(round(n * holdout))
    if n_fit < X.shape[1] + 1 and ridge == 0.0:
        raise LensInputError(
            f"{n_fit} paired states cannot determine an affine map from {X.shape[1]} dimensions (need at least "
            f"{X.shape[1] + 1}): give more text, or ridge > 0."
        )
    Xd, Yd = X.double().cpu(), Y.double().cpu()
    mx, my = Xd[:n_fit].mean(0), Yd[:n_fit].mean(0)
    Xc, Yc = Xd[:n_fit] - mx, Yd[:n_fit] - my
    if ridge > 0:
        A = Xc.T @ Xc + ridge * torch.eye(X.shape[1], dtype=torch.float64)
        W = torch.linalg.solve(A, Xc.T @ Yc)
    else:
        W = torch.linalg.lstsq(Xc, Yc, driver="gelsd").solution
    b = my - mx @ W
    ev_X, ev_Y = (Xd[n_fit:], Yd[n_fit:]) if n_fit < n else (Xd, Yd)
    resid = ev_Y - (ev_X @ W + b)
    r2 = 1.0 - float(resid.pow(2).sum() / (ev_Y - ev_Y.mean(0)).pow(2).sum().clamp(min=1e-30))
    return AffineMap(W.float(), b.float(), r2)


def paired_states(
    source_model: Any,
    data: Sequence[str] | str,
    source_layer: int,
    target_model: Any = None,
    target_layer: int | None = None,
    max_tokens: int = 4096,
    prepend_bos: bool | None = None,
) -> tuple[Float[Tensor, "n d_src"], Float[Tensor, "n d_tgt"]]:
    """Hidden states of the same tokens at ``source_layer`` of one model and ``target_layer`` of another (or the same).

    Both models must tokenise the text identically (same tokenizer), so the states pair token by token.
    """
    src = ModelView(source_model)
    tgt = ModelView(target_model if target_model is not None else src)
    ls = resolve_layer(src, source_layer, "source layer")
    lt = resolve_layer(tgt, ls if target_layer is None else target_layer, "target layer")
    texts = [data] if isinstance(data, str) else list(data)
    if not texts:
        raise LensInputError("fit_map needs some text: pass a list of strings.")
    xs, ys, total = [], [], 0
    with torch.no_grad():
        for text in texts:
            ts = src.to_tokens(text, prepend_bos)
            tt = tgt.to_tokens(text, prepend_bos)
            if ts.shape != tt.shape or not torch.equal(ts.cpu(), tt.cpu()):
                raise LensInputError(
                    "the two models tokenise the text differently, so their states do not pair token by token: "
                    "fit on models with the same tokenizer, or pair states yourself and call fit(X, Y)."
                )
            hs, ht = src.hook_name(POINT, ls), tgt.hook_name(POINT, lt)
            if tgt.model is src.model:
                _, cs = src.model.run_with_cache(ts, names_filter=lambda n: n in (hs, ht))
                x, y = cs[hs][0], cs[ht][0]
            else:
                _, cs = src.model.run_with_cache(ts, names_filter=lambda n: n == hs)
                _, ct = tgt.model.run_with_cache(tt, names_filter=lambda n: n == ht)
                x, y = cs[hs][0], ct[ht][0]
            xs.append(x.float().cpu())
            ys.append(y.float().cpu())
            total += x.shape[0]
            if total >= max_tokens:
                break
    return torch.cat(xs)[:max_tokens], torch.cat(ys)[:max_tokens]


def fit_map(
    source_model: Any,
    data: Sequence[str] | str,
    source_layer: int,
    target_model: Any = None,
    target_layer: int | None = None,
    ridge: float = 0.0,
    holdout: float = 0.1,
    max_tokens: int = 4096,
) -> AffineMap:
    """Fit ``f`` from ``source_layer`` of ``source_model`` to ``target_layer`` of ``target_model`` (default: the same
    model, i.e. a cross-layer map) on the paired states of ``data`` (a text or a list of texts); ``map.r2`` is the
    held-out ``R^2``.

    Args:
        source_model: the model whose hidden states are mapped (the input ``h``).
        data: a text or a list of texts; both models read the same tokens (their tokenizers must agree).
        source_layer: the block whose output residual stream (``resid_post``) is ``h`` (negative allowed).
        target_model: the model mapped into; default ``source_model`` (a cross-layer map).
        target_layer: its block whose ``resid_post`` is the target; default ``source_layer``.
        ridge: L2 penalty of the least-squares fit (``0``: plain least squares).
        holdout: the share of token positions (the last ones) kept out of the fit to measure ``r2``.
        max_tokens: at most this many token positions are read.

    Returns:
        :class:`AffineMap` (``weight`` ``[d_in, d_out]``, ``bias``, ``r2``).
    """
    X, Y = paired_states(source_model, data, source_layer, target_model, target_layer, max_tokens)
    return fit(X, Y, ridge=ridge, holdout=holdout)
