"""Interventions on a dictionary's features: ablate, clamp, scale or add features in the model's forward pass, with
the reconstruction error kept.

At the hook a dictionary writes (an SAE's ``hook``, a transcoder's ``hook_out``) the activation ``y`` is the
dictionary's output plus its error, ``y = decode(acts, x) + error``. An intervention edits the activations
``acts -> acts'`` and writes ``decode(acts', x) + error``, which is computed as ``y + decode(acts', x) -
decode(acts, x)``: the output is linear in the activations (the bias, the skip and the normalisation depend on
``x`` only), so this is ``y + ((acts' - acts) @ W_dec') * scale`` (see :mod:`~mi_lenses.features.dictionary`). The
error is never recomputed, and where no activation changes the hook returns the activation untouched: an intervention
that changes nothing leaves the logits bit for bit as they were.

``edits`` maps a feature index to a number (the activation is set to it: ``0.0`` ablates, a value clamps) or to a
function of the feature's activations ``[batch, pos]`` (``lambda a: 2 * a`` scales, ``lambda a: a + 3.0`` adds).
Steering (Templeton et al. 2024) clamps a feature to a multiple of its maximum over some text
(``features(...).activations[..., i].max()``).

:func:`intervene` returns an :class:`Intervention`: a context manager (``with mi_lenses.intervene(...):`` runs every
forward pass, ``model.generate`` included, under the edits; the user's own hooks stay, ours are removed on leaving,
also on an exception) whose ``hooks`` are plain TransformerLens hooks (``model.run_with_hooks(tokens,
fwd_hooks=iv.hooks)``).

Example:
    >>> D = model.cfg.d_model
    >>> g = torch.Generator().manual_seed(0)
    >>> d = mi_lenses.Dictionary(torch.randn(D, 16, generator=g), torch.zeros(16), torch.randn(16, D, generator=g),
    ...                          torch.zeros(D), hook="blocks.1.hook_resid_post")
    >>> tokens = model.to_tokens("The capital of France is")
    >>> with torch.no_grad():
    ...     plain = model(tokens)
    ...     with mi_lenses.intervene(model, d, {3: lambda a: a}):      # changes nothing
    ...         same = model(tokens)
    ...     with mi_lenses.intervene(model, d, {3: 50.0}):             # clamps feature 3 everywhere
    ...         steered = model(tokens)
    >>> bool(torch.equal(plain, same)), bool((steered - plain).abs().max() > 1e-3)
    (True, True)
"""

from __future__ import annotations

import contextlib
from numbers import Real
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.reading import DictionaryInput, as_dictionary, check_dictionary
from mi_lenses.indexing import IndexSpec, int_list, resolve_indices
from mi_lenses.models.view import ModelView

Edit = float | Callable[[Tensor], Tensor]


class Intervention:
    """The hooks of an intervention (see the module docstring): ``hooks`` (TransformerLens ``(name, fn)`` pairs) and,
    as a context manager, those hooks active on the model. ``dictionary``, ``edits`` and ``positions`` are what
    :func:`intervene` was given."""

    def __init__(self, view: ModelView, dictionary: Dictionary, edits: dict[int, Edit], positions: IndexSpec):
        self.view, self.dictionary, self.edits, self.positions = view, dictionary, edits, positions
        self._inputs: list[Tensor] = []
        self._stack: contextlib.ExitStack | None = None
        d = dictionary
        self.hooks: list[tuple[str, Callable]] = []
        if d.is_transcoder:
            self.hooks.append((d.hook, self._read))
        self.hooks.append((d.writes, self._write))

    def __repr__(self) -> str:
        return f"<Intervention on {self.dictionary.writes}: features {sorted(self.edits)}>"

    # ------------------------------------------------------------------------------------------ the hooks
    def _read(self, t: Tensor, hook: Any = None) -> None:
        self._inputs[:] = [t]

    def _write(self, t: Tensor, hook: Any = None) -> Tensor | None:
        d = self.dictionary
        x = self._inputs.pop() if d.is_transcoder and self._inputs else t
        if x.shape[:-1] != t.shape[:-1]:
            raise LensInputError(f"the dictionary's input at {d.hook} has shape {tuple(x.shape)}, its output at "
                                 f"{d.writes} {tuple(t.shape)}: they must cover the same tokens.")
        delta = self.delta(x)
        if delta is None:
            return None  # nothing changed: the activation as the model computed it, bit for bit
        return t + delta.to(t.device, t.dtype)

    def delta(self, x: Tensor) -> Tensor | None:
        """What the edits add to the dictionary's output for inputs ``x`` ``[batch, pos, d_in]`` (None: nothing)."""
        d = self.dictionary.to(x.device)
        with torch.no_grad():
            acts = d.encode(x.detach())
        idx = torch.tensor(sorted(self.edits), dtype=torch.long, device=x.device)
        old = acts[..., idx]
        new = old.clone()
        pos = slice(None) if self.positions is None or acts.ndim < 3 else torch.tensor(
            resolve_indices(self.positions, acts.shape[-2], "position",
                            f"this forward pass has {acts.shape[-2]} positions", ordered=False), device=x.device)
        for j, f in enumerate(idx.tolist()):
            edit = self.edits[f]
            cur = old[..., pos, j] if acts.ndim >= 3 else old[..., j]
            val = edit(cur.clone()) if callable(edit) else torch.full_like(cur, float(edit))
            val = torch.as_tensor(val, dtype=cur.dtype, device=cur.device).expand_as(cur)
            if acts.ndim >= 3:
                new[..., pos, j] = val
            else:
                new[..., j] = val
        change = new - old
        if not bool(change.any()):
            return None
        _, scale, _ = d._stats(x)
        if d.is_transcoder:  # a transcoder's output is not denormalised
            scale = torch.ones_like(scale)
        return (change @ d.decoder_rows()[idx].to(x.device)) * scale

    # ------------------------------------------------------------------------------------------ the context
    def __enter__(self) -> "Intervention":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.view.model.hooks(fwd_hooks=self.hooks))
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._inputs.clear()
        if stack is not None:
            stack.close()


def intervene(model: Any, dictionary: DictionaryInput, edits: Mapping[int, Edit], *,
              positions: IndexSpec = None) -> Intervention:
    """Edit a dictionary's feature activations in the model's forward passes, keeping the reconstruction error (see
    :mod:`~mi_lenses.features.intervene`): an edit that changes nothing leaves the logits bit-identical.

    Args:
        model: a TransformerLens model, hooked as you like (your hooks stay; ours leave with the ``with`` block,
            also on an exception).
        dictionary: one :class:`~mi_lenses.features.dictionary.Dictionary` (an SAE or a transcoder; a folder; one
            member of a :class:`~mi_lenses.features.dictionary.DictionarySet`).
        edits: ``{feature: value}``: a number sets the activation (``0.0`` ablates, another value clamps), a
            function of the feature's activations ``[batch, pos]`` returns the new ones (``lambda a: 2 * a`` scales,
            ``lambda a: a + 1.0`` adds).
        positions: the positions edited in each forward pass (default all; negative from the end; generating with a
            KV cache, each step's pass holds the new token only).

    Returns:
        an :class:`Intervention`: a context manager, and its ``hooks`` for ``run_with_hooks``.
    """
    view = ModelView(model)
    d = as_dictionary(dictionary)
    if isinstance(d, DictionarySet):
        if len(d.dictionaries) != 1 or d.cross:
            raise LensInputError("intervene edits one dictionary: pass a member of the set "
                                 "(dictionary_set.dictionaries[i]); a cross-layer transcoder's features write into "
                                 "several layers and are not supported.")
        d = d.dictionaries[0]
    check_dictionary(view, d)
    if not isinstance(edits, Mapping) or not edits:
        raise LensInputError("edits must be a non-empty {feature index: number or function} mapping.")
    out: dict[int, Edit] = {}
    for f, v in edits.items():
        if isinstance(f, bool) or not isinstance(f, int) or not -d.n_features <= f < d.n_features:
            raise LensInputError(f"feature {f!r} is not an index of this dictionary's {d.n_features} features.")
        if not (callable(v) or (isinstance(v, Real) and not isinstance(v, bool))):
            raise LensInputError(f"edits[{f}] must be a number (the activation it is set to) or a function of the "
                                 f"activations, got {type(v).__name__}.")
        out[f % d.n_features] = v
    if positions is not None:
        int_list(positions)  # the form only: the lengths vary per forward pass
    return Intervention(view, d, out, positions)
