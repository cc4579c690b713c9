"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, decoded like the logit lens.

For the residual state ``h`` at tuned-lens layer index ``i`` (0 = embeddings, ``i`` = input of block ``i``) the lens
decodes ``h + A_i h + b_i`` through the model's *own* final norm and unembedding (read from the model on every run,
never stored in the lens). ``A`` and ``b`` start at zero, so an untrained lens is exactly the logit lens. It is the
residual-form member of the affine-lens family (:class:`~mi_lenses.lenses.affine.AffineLens`: ``W_i = I + A_i``),
which gives it its model check, its files and its change of residual basis.

Example:
    >>> lens = TunedLens.from_model(model)            # zero init: exactly the logit lens
    >>> res = lens(model, "The capital of France is", targets=" Paris")   # a LensResult, like the logit lens
    >>> bool(torch.equal(res.top_ids, mi_lenses.logit_lens(model, "The capital of France is").top_ids))
    True
    >>> res = mi_lenses.tuned_lens(model, "The capital of France is", lens=lens)  # or lens="path/to/lens_folder"
"""

from __future__ import annotations

import os
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import AffineLens, load_lens
from mi_lenses.lenses.engine import run_lens
from mi_lenses.lenses.options import LensOptions, with_lens_options
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView


class TunedLens(AffineLens, torch.nn.Module):
    """Per-layer affine translators ``h -> h + A_i h + b_i`` for ``i`` in ``0 .. n_layers - 1`` (the final row is
    the model's output and has none).

    Attributes:
        weight: ``[n_layers, d_model, d_model]``, ``A_i`` in ``torch.nn.Linear`` layout (``h @ A_i.T``).
        bias: ``[n_layers, d_model]``.
        meta: what the lens belongs to: ``model_name``, ``unembed_hash``, ``unembed_fingerprint`` (a 64-number sketch
            of the unembedding, compared with a tolerance), ``residual_centered`` (LayerNorm models in
            TransformerLens compatibility mode have a mean-free residual stream); ``training`` once trained.

    Calling the lens runs it like any :class:`~mi_lenses.lenses.lens.Lens` (options of
    :func:`~mi_lenses.lenses.engine.run_lens`); it is first checked against (bound to) the model.

    >>> lens = TunedLens.from_model(model)
    >>> lens.weight.shape == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_model), lens.rows
    (True, [0, 1, 2, 3])
    """

    name = "tuned lens"
    kind = "tuned"
    form = "residual"
    final_identity = True

    def __init__(self, n_layers: int, d_model: int, meta: dict[str, Any] | None = None):
        torch.nn.Module.__init__(self)
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

    # ------------------------------------------------------------------------------------------ affine storage
    def stored_rows(self) -> list[int]:
        return list(range(self.n_layers))

    def stored(self, row: int) -> tuple[Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"]]:
        return self.weight[row], self.bias[row]

    @classmethod
    def from_stored(cls, maps: dict[int, tuple[Tensor, Tensor]], *, n_layers: int, d_model: int, scale: float = 1.0,
                    ahead: int = 0, meta: dict[str, Any] | None = None) -> "TunedLens":
        if sorted(maps) != list(range(n_layers)) or scale != 1.0 or ahead != 0:
            raise LensInputError(f"a tuned lens has one translator for each of the rows 0..{n_layers - 1}, scale 1 "
                                 f"and predicts the next token; got rows {sorted(maps)[:6]}, scale {scale}, ahead "
                                 f"{ahead}: the lens file is corrupt.")
        lens = cls(n_layers, d_model, meta)
        with torch.no_grad():
            for i, (A, b) in maps.items():
                lens.weight[i].copy_(A)
                lens.bias[i].copy_(b)
        return lens

    def translate(self, hidden: Float[Tensor, "... d_model"], index: int) -> Float[Tensor, "... d_model"]:
        """``h + A_index h + b_index`` with gradients to ``A`` and ``b`` (training; ``index`` in tuned-lens
        indexing)."""
        if not 0 <= index < self.n_layers:
            raise LensInputError(f"tuned-lens layer index {index} is out of range 0..{self.n_layers - 1}.")
        if hidden.shape[-1] != self.d_model:
            raise LensInputError(f"hidden states have d_model {hidden.shape[-1]} but this lens was trained for "
                                 f"d_model {self.d_model}: load the lens for this model.")
        w, b = self.weight[index], self.bias[index]
        return hidden + torch.nn.functional.linear(hidden.to(w.dtype), w, b)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "TunedLens":
        """Load a tuned lens folder in any format; with ``model`` the lens is checked against (bound to) it."""
        lens = load_lens(path, model)
        if not isinstance(lens, cls):
            raise LensInputError(f"{path} holds a {lens.name}, not a tuned lens: load it with mi_lenses.load_lens.")
        return lens

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, d_model={self.d_model}, model={self.meta.get('model_name', '?')!r}"


@with_lens_options
def tuned_lens(
    model: Any,
    prompt: PromptInput | None = None,
    *,
    lens: "TunedLens | str | os.PathLike",
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    options: LensOptions | None = None,
) -> LensResult:
    """The tuned lens of ``prompt``: ``lens`` is a :class:`TunedLens` or a lens folder (either file format, loaded and
    checked against ``model``); every other option as :func:`~mi_lenses.lenses.engine.run_lens`.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        prompt: a prompt, a list of prompts (right-padded; padding is masked out), or token ids ``[batch, pos]``.
            With ``cache`` it supplies the token strings and next tokens only; no forward pass is run.
        lens: a :class:`TunedLens`, or the folder of one (loaded with :meth:`TunedLens.load`).
        cache: an ``ActivationCache`` holding the residual hooks, instead of a forward pass.
        logits: the output of the run that ``cache`` holds; it enables ``verify()``.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right).
        options: a :class:`~mi_lenses.lenses.options.LensOptions` record. Its fields (``layers``, ``positions``,
            ``top_k``, ``targets``, ...) are also keyword options here that override it: see ``LensOptions`` and
            :func:`~mi_lenses.lenses.engine.run_lens` for each.

    Returns:
        :class:`~mi_lenses.lenses.result.LensResult`.
    """
    if not isinstance(lens, TunedLens):
        lens = TunedLens.load(lens, model)
    return run_lens(lens, model, prompt, cache=cache, logits=logits, attention_mask=attention_mask, options=options)
