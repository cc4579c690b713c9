"""What a fitted lens belongs to: the model's identity, recorded when a lens is fitted and checked when it is run.

A lens (tuned, Jacobian, Future, attribute, any affine lens) is only meaningful on the model it was fitted on. Its
``meta`` records :func:`model_identity`: the model's name, a 64-number sketch of its effective unembedding (final-norm
gain folded in; compared with a relative tolerance, so the same model in raw and compatibility mode agrees, and a
lens survives a dtype round trip), a short hash of that sketch for people, and whether the residual stream is
mean-free (a LayerNorm model in TransformerLens compatibility mode). :func:`check_identity` is the one check.

Example:
    >>> meta = model_identity(ModelView(model))
    >>> sorted(meta), len(meta["unembed_fingerprint"]), meta["residual_centered"]
    (['model_name', 'residual_centered', 'unembed_fingerprint', 'unembed_hash'], 64, False)
    >>> check_identity(meta, ModelView(model), "lens")           # the same model: no error
    >>> check_identity({**meta, "unembed_fingerprint": [1.0] * 64}, ModelView(model), "lens")
    Traceback (most recent call last):
    ...
    mi_lenses.errors.LensInputError: this lens was fitted for another model ...
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mi_lenses.errors import LensInputError

if TYPE_CHECKING:
    from mi_lenses.models.view import ModelView

FINGERPRINT_TOL = 1e-3  # relative tolerance when comparing unembedding fingerprints
IDENTITY_KEYS = ("model_name", "unembed_hash", "unembed_fingerprint", "residual_centered")


def residual_is_centered(view: "ModelView") -> bool:
    """True for a LayerNorm model whose writing weights were centred (TransformerLens compatibility mode)."""
    if view.decoder.kind != "LN":
        return False
    W_E = view.model.W_E.detach().float()
    return bool(W_E.mean(-1).abs().max() <= 1e-5 * W_E.pow(2).mean().sqrt())


def unembed_fingerprint(view: "ModelView") -> list[float]:
    """64 numbers sketching the effective unembedding: final-norm gain folded in, centred over the vocabulary and,
    for LayerNorm, over d_model, so the same model in raw and compatibility mode agrees. ``R1^T W R2`` with fixed
    seeded Gaussian ``R1, R2``."""
    dec = view.decoder
    W = dec.W.cpu()
    W = W - W.mean(-1, keepdim=True)
    if dec.kind == "LN":  # LayerNorm centres its input: only P W matters (P = I - 11^T / d)
        W = W - W.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(20230101)
    r1 = torch.randn(W.shape[0], 8, generator=g, dtype=torch.float64)
    r2 = torch.randn(W.shape[1], 8, generator=g, dtype=torch.float64)
    sketch = r1.T @ W.double() @ r2 / (W.shape[0] * W.shape[1]) ** 0.5
    return [float(v) for v in sketch.flatten()]


def unembed_hash(view: "ModelView") -> str:
    """A short, human-comparable hash of the unembedding fingerprint (3 significant digits)."""
    text = ",".join(f"{v:.2e}" for v in unembed_fingerprint(view))
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(view: "ModelView") -> dict[str, Any]:
    """The identity a lens records when it is fitted on ``view``'s model (the keys of ``IDENTITY_KEYS``)."""
    return {
        "model_name": view.name,
        "unembed_hash": unembed_hash(view),
        "unembed_fingerprint": unembed_fingerprint(view),
        "residual_centered": residual_is_centered(view),
    }


def check_identity(meta: dict[str, Any], view: "ModelView", what: str) -> None:
    """Raise ``LensInputError`` naming the fix when the unembedding recorded in ``meta`` is not ``view``'s (a lens
    without a recorded fingerprint, e.g. one imported from the tuned-lens package, passes)."""
    fp = meta.get("unembed_fingerprint")
    if fp is None:
        return
    ours, theirs = torch.tensor(unembed_fingerprint(view)), torch.tensor(fp, dtype=torch.float32)
    if ours.shape != theirs.shape or (ours - theirs).abs().max() > FINGERPRINT_TOL * theirs.abs().max():
        raise LensInputError(
            f"this {what} was fitted for another model ({meta.get('model_name') or '?'}, unembedding "
            f"{str(meta.get('unembed_hash') or '?')[:12]}), not {view.name} (unembedding {unembed_hash(view)[:12]}): "
            "its unembedding differs. Fit or load one for this model.")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (lens files record the digest of their weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
