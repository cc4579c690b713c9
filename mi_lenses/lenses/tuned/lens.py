"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, decoded like the logit lens.

For the residual state ``h`` at tuned-lens layer index ``i`` (0 = embeddings, ``i`` = input of block ``i``) the lens
decodes ``h + A_i h + b_i`` through the model's *own* final norm and unembedding (read from the model on every run,
never stored in the lens). ``A`` and ``b`` start at zero, so an untrained lens is exactly the logit lens.

Example:
    >>> lens = TunedLens.from_model(model)            # zero init: exactly the logit lens
    >>> res = lens(model, "The capital of France is", targets=" Paris")   # a LensResult, like the logit lens
    >>> bool(torch.equal(res.top_ids, mi_lenses.logit_lens(model, "The capital of France is").top_ids))
    True
    >>> res = mi_lenses.tuned_lens(model, "The capital of France is", lens=lens)  # or lens="path/to/lens_folder"
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec
from mi_lenses.lenses.logit_lens import Lens, MatmulDType, Point, TokenLike, run_lens
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.view import ModelView, ResidualRow

FINGERPRINT_TOL = 1e-3  # relative tolerance when comparing unembedding fingerprints


class TunedLens(Lens, torch.nn.Module):
    """Per-layer affine translators ``h -> h + A_i h + b_i`` for ``i`` in ``0 .. n_layers - 1``.

    Attributes:
        weight: ``[n_layers, d_model, d_model]``, ``A_i`` in ``torch.nn.Linear`` layout (``h @ A_i.T``).
        bias: ``[n_layers, d_model]``.
        meta: what the lens belongs to: ``model_name``, ``unembed_hash``, ``unembed_fingerprint`` (a 64-number sketch
            of the unembedding, compared with a tolerance), ``residual_centered`` (LayerNorm models in
            TransformerLens compatibility mode have a mean-free residual stream).

    Calling the lens runs it like any :class:`~mi_lenses.lenses.logit_lens.Lens` (options of
    :func:`~mi_lenses.lenses.logit_lens.run_lens`); it is first checked against (bound to) the model.

    >>> lens = TunedLens.from_model(model)
    >>> lens.weight.shape == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_model)
    True
    """

    name = "tuned lens"

    def __init__(self, n_layers: int, d_model: int, meta: dict[str, Any] | None = None):
        super().__init__()
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.weight = torch.nn.Parameter(torch.zeros(self.n_layers, self.d_model, self.d_model))
        self.bias = torch.nn.Parameter(torch.zeros(self.n_layers, self.d_model))
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_model(cls, model: Any) -> "TunedLens":
        """A zero-initialised lens (== the logit lens) for ``model``, recording what it belongs to."""
        view = ModelView(model)
        return cls(view.n_layers, view.d_model, model_identity(view))

    # ------------------------------------------------------------------------------------------ the map
    def translate(self, hidden: Float[Tensor, "... d_model"], index: int) -> Float[Tensor, "... d_model"]:
        """``h + A_index h + b_index`` (``index`` in tuned-lens indexing)."""
        if not 0 <= index < self.n_layers:
            raise LensInputError(f"tuned-lens layer index {index} is out of range 0..{self.n_layers - 1}.")
        if hidden.shape[-1] != self.d_model:
            raise LensInputError(
                f"hidden states have d_model {hidden.shape[-1]} but this lens was trained for d_model "
                f"{self.d_model}: load the lens for this model."
            )
        w, b = self.weight[index], self.bias[index]
        return hidden + torch.nn.functional.linear(hidden.to(w.dtype), w, b)

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        """The ``Lens`` protocol used by :func:`mi_lenses.run_lens`."""
        if row.is_final:
            return hidden
        if row.label.endswith("_mid"):
            raise LensInputError(
                "the tuned lens was trained on block inputs; it has no translator for resid_mid. "
                "Use point='resid_pre' (default) or 'resid_post'."
            )
        with torch.no_grad():
            return self.translate(hidden, row.lens_index)

    # ------------------------------------------------------------------------------------------ model binding
    def bind(self, model: Any) -> "TunedLens":
        """Check that the lens belongs to ``model`` and return the lens to run on it.

        Raises ``LensInputError`` for another model (layer count, d_model or unembedding differ). A lens trained on a
        mean-free residual stream (LayerNorm model in compatibility mode) is converted exactly for a raw model
        (``A <- A P`` with ``P`` the centring projection); the reverse direction cannot be exact and is refused.
        """
        view = ModelView(model)
        if (self.n_layers, self.d_model) != (view.n_layers, view.d_model):
            raise LensInputError(
                f"this lens is for a model with {self.n_layers} layers and d_model {self.d_model} "
                f"({self.meta.get('model_name', '?')}), but {view.name} has {view.n_layers} layers and d_model "
                f"{view.d_model}: train or load a lens for this model."
            )
        fp = self.meta.get("unembed_fingerprint")
        if fp is not None:
            ours = torch.tensor(unembed_fingerprint(view))
            theirs = torch.tensor(fp, dtype=torch.float32)
            if ours.shape != theirs.shape or (ours - theirs).abs().max() > FINGERPRINT_TOL * theirs.abs().max():
                raise LensInputError(
                    f"this lens was trained for another model ({self.meta.get('model_name', '?')}, unembedding "
                    f"{self.meta.get('unembed_hash', '?')[:12]}), not {view.name} (unembedding "
                    f"{unembed_hash(view)[:12]}): its unembedding differs. Train a lens for this model."
                )
        lens_centered = bool(self.meta.get("residual_centered", False))
        model_centered = residual_is_centered(view)
        if lens_centered == model_centered:
            return self
        if lens_centered:
            return self.centered_to_raw()
        raise LensInputError(
            "this lens was trained on the raw residual stream of a LayerNorm model, but this model runs in "
            "TransformerLens compatibility mode (mean-free residual stream), where the lens cannot be applied "
            "exactly. Load the model with mi_lenses.load_model(..., compatibility_mode=False)."
        )

    def centered_to_raw(self) -> "TunedLens":
        """The same lens for the raw (not mean-free) residual stream: ``A <- A P``, ``P = I - 11^T / d``."""
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.weight -= out.weight.mean(-1, keepdim=True)
        out.meta["residual_centered"] = False
        return out

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, format: Literal["mi_lenses", "tuned-lens"] = "mi_lenses") -> None:
        """Write the lens folder atomically: ``format="mi_lenses"`` (safetensors + JSON) or ``"tuned-lens"``."""
        from mi_lenses.lenses.tuned.io import save_lens

        save_lens(self, path, format=format)

    @classmethod
    def load(cls, path: Any, model: Any = None) -> "TunedLens":
        """Load either format; with ``model`` the lens is checked against (and bound to) it."""
        from mi_lenses.lenses.tuned.io import load_lens

        return load_lens(path, model)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, d_model={self.d_model}, model={self.meta.get('model_name', '?')!r}"


# ---------------------------------------------------------------------------------------------- identity
def residual_is_centered(view: ModelView) -> bool:
    """True for a LayerNorm model whose writing weights were centred (TransformerLens compatibility mode)."""
    if view.decoder.kind != "LN":
        return False
    W_E = view.model.W_E.detach().float()
    return bool(W_E.mean(-1).abs().max() <= 1e-5 * W_E.pow(2).mean().sqrt())


def unembed_fingerprint(view: ModelView) -> list[float]:
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


def unembed_hash(view: ModelView) -> str:
    """A short, human-comparable hash of the unembedding fingerprint (3 significant digits)."""
    fp = unembed_fingerprint(view)
    text = ",".join(f"{v:.2e}" for v in fp)
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(view: ModelView) -> dict[str, Any]:
    return {
        "model_name": view.name,
        "unembed_hash": unembed_hash(view),
        "unembed_fingerprint": unembed_fingerprint(view),
        "residual_centered": residual_is_centered(view),
    }


def tuned_lens(
    model: Any,
    input: PromptInput | None = None,
    *,
    lens: "TunedLens | str | os.PathLike",
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    layers: IndexSpec = None,
    positions: IndexSpec = None,
    point: Point = "resid_pre",
    top_k: int = 5,
    targets: TokenLike | Sequence[TokenLike] | None = None,
    return_logits: bool = False,
    prepend_bos: bool | None = None,
    dtype: MatmulDType | torch.dtype = "float32",
    position_chunk: int = 256,
    vocab_tile: int | None = None,
    fused: bool | None = None,
    check: bool = True,
) -> LensResult:
    """The tuned lens of ``input``: ``lens`` is a :class:`TunedLens` or a lens folder (either file format, loaded and
    checked against ``model``); every other option as :func:`~mi_lenses.lenses.logit_lens.run_lens`."""
    if not isinstance(lens, TunedLens):
        from mi_lenses.lenses.tuned.io import load_lens

        lens = load_lens(lens, model)
    return run_lens(lens, model, input, cache=cache, logits=logits, attention_mask=attention_mask, layers=layers,
                    positions=positions, point=point, top_k=top_k, targets=targets, return_logits=return_logits,
                    prepend_bos=prepend_bos, dtype=dtype, position_chunk=position_chunk, vocab_tile=vocab_tile,
                    fused=fused, check=check)
