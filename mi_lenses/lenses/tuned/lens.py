"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, decoded like the logit lens.

For the residual state ``h`` at tuned-lens layer index ``i`` (0 = embeddings, ``i`` = input of block ``i``) the lens
decodes ``h + A_i h + b_i`` through the model's *own* final norm and unembedding (read from the model on every run,
never stored in the lens). ``A`` and ``b`` start at zero, so an untrained lens is exactly the logit lens.

Example::

    import mi_lenses
    from mi_lenses.lenses.tuned import TunedLens, load_lens
    model = mi_lenses.load_model()
    lens = load_lens("smol_lens", model)            # either file format
    res = lens(model, "The capital of France is", targets=" Paris")   # a LensResult, like the logit lens
    res.print(); res.to_html("tuned.html")
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.logit_lens import run_lens
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.view import ModelView, ResidualRow

FINGERPRINT_TOL = 1e-3  # relative tolerance when comparing unembedding fingerprints


class TunedLens(torch.nn.Module):
    """Per-layer affine translators ``h -> h + A_i h + b_i`` for ``i`` in ``0 .. n_layers - 1``.

    Attributes:
        weight: ``[n_layers, d_model, d_model]``, ``A_i`` in ``torch.nn.Linear`` layout (``h @ A_i.T``).
        bias: ``[n_layers, d_model]``.
        meta: what the lens belongs to: ``model_name``, ``unembed_hash``, ``unembed_fingerprint`` (a 64-number sketch
            of the unembedding, compared with a tolerance), ``residual_centered`` (LayerNorm models in
            TransformerLens compatibility mode have a mean-free residual stream).

    Example::

        lens = TunedLens.from_model(model)               # zero init: identical to the logit lens
        res = lens(model, "The capital of France is")    # LensResult
        lens.save("my_lens"); lens.save("their_lens", format="tuned-lens")
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

    def run(self, model: Any, input: Any = None, **kwargs: Any) -> LensResult:
        """Run the lens on ``model`` (checked to be the model it belongs to); arguments as :func:`run_lens`."""
        return run_lens(self.bind(model), model, input, **kwargs)

    def __call__(self, model: Any, input: Any = None, **kwargs: Any) -> LensResult:
        """``lens(model, prompt, ...)`` -> :class:`LensResult`, like ``LogitLens``."""
        return self.run(model, input, **kwargs)

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
    def save(self, path: Any, format: str = "mi_lenses") -> None:
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
    kind = view.final_norm()[0]
    if kind != "LN":
        return False
    W_E = view.model.W_E.detach().float()
    return bool(W_E.mean(-1).abs().max() <= 1e-5 * W_E.pow(2).mean().sqrt())


def unembed_fingerprint(view: ModelView) -> list[float]:
    """64 numbers sketching the effective unembedding: final-norm gain folded in, centred over the vocabulary and,
    for LayerNorm, over d_model, so the same model in raw and compatibility mode agrees. ``R1^T W R2`` with fixed
    seeded Gaussian ``R1, R2``."""
    W, _ = view.unembed()
    W = W.detach().float().cpu()
    W = W - W.mean(-1, keepdim=True)
    if view.final_norm()[0] == "LN":  # LayerNorm centres its input: only P W matters (P = I - 11^T / d)
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
