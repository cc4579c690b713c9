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
On a :class:`~mi_lenses.features.dictionary.DictionarySet` (per-layer transcoders) a feature is its index in the set's
features concatenated layer by layer (as :func:`~mi_lenses.features.reading.features` lays them out) or its label
``"L{layer}F{i}"``; each member edits its own features at its own hook, a later layer reading what the earlier edits
left (cross-layer transcoders are refused).
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
from mi_lenses.features.reading import DictionaryInput, as_dictionary, check_dictionary, feature_labels
from mi_lenses.indexing import IndexSpec, int_list, resolve_indices
from mi_lenses.models.view import ModelView

Edit = float | Callable[[Tensor], Tensor]


class Intervention:
    """The hooks of an intervention (see the module docstring): ``hooks`` (TransformerLens ``(name, fn)`` pairs) and,
    as a context manager, those hooks active on the model. ``dictionary``, ``edits`` and ``positions`` are what
    :func:`intervene` was given."""

    def __init__(self, view: ModelView, dictionary: Dictionary | DictionarySet, edits: dict[int, Edit],
                 positions: IndexSpec):
        self.view, self.dictionary, self.edits, self.positions = view, dictionary, edits, positions
        self._inputs: list[Tensor] = []
        self._stack: contextlib.ExitStack | None = None
        self.hooks: list[tuple[str, Callable]] = []
        # a set: one Intervention per member with edits (its own features, indexed from 0), hooks in layer order
        self.parts: list[Intervention] = []
        if isinstance(dictionary, DictionarySet):
            for d, at in zip(dictionary.dictionaries, dictionary.offsets):
                mine = {f - at: e for f, e in edits.items() if at <= f < at + d.n_features}
                if mine:
                    self.parts.append(Intervention(view, d, mine, positions))
                    self.hooks += self.parts[-1].hooks
            return
        d = dictionary
        if d.is_transcoder:
            self.hooks.append((d.hook, self._read))
        self.hooks.append((d.writes, self._write))

    def __repr__(self) -> str:
        if self.parts:
            return (f"<Intervention on {len(self.parts)} dictionaries of a set: features "
                    f"{[label for p in self.parts for label in p._labels()]}>")
        return f"<Intervention on {self.dictionary.writes}: features {sorted(self.edits)}>"

    def _labels(self) -> list[str]:
        layer = self.dictionary.layer
        return [f"L{layer}F{f}" for f in sorted(self.edits)]

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
        """What the edits add to the dictionary's output for inputs ``x`` ``[batch, pos, d_in]`` (None: nothing); on
        a set, each member's is its part's (``parts[i].delta``)."""
        if isinstance(self.dictionary, DictionarySet):
            raise LensInputError("this intervention edits several dictionaries of a set: each one's delta is "
                                 "intervention.parts[i].delta(x).")
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
        for p in self.parts:
            p._inputs.clear()
        if stack is not None:
            stack.close()


def intervene(model: Any, dictionary: DictionaryInput, edits: Mapping[int | str, Edit], *,
              positions: IndexSpec = None) -> Intervention:
    """Edit a dictionary's feature activations in the model's forward passes, keeping the reconstruction error (see
    :mod:`~mi_lenses.features.intervene`): an edit that changes nothing leaves the logits bit-identical.

    Args:
        model: a TransformerLens model, hooked as you like (your hooks stay; ours leave with the ``with`` block,
            also on an exception).
        dictionary: a :class:`~mi_lenses.features.dictionary.Dictionary` (an SAE or a transcoder), a
            :class:`~mi_lenses.features.dictionary.DictionarySet` of per-layer dictionaries (not a cross-layer
            transcoder), or a folder :func:`~mi_lenses.load_dictionary` reads.
        edits: ``{feature: value}``: a number sets the activation (``0.0`` ablates, another value clamps), a
            function of the feature's activations ``[batch, pos]`` returns the new ones (``lambda a: 2 * a`` scales,
            ``lambda a: a + 1.0`` adds). A feature is an index (on a set: into its features concatenated layer by
            layer, as ``features(...).activations``) or a label (``"F7"``; on a set ``"L3F7"``).
        positions: the positions edited in each forward pass (default all; negative from the end; generating with a
            KV cache, each step's pass holds the new token only).

    Returns:
        an :class:`Intervention`: a context manager, and its ``hooks`` for ``run_with_hooks``.
    """
    view = ModelView(model)
    d = as_dictionary(dictionary)
    if isinstance(d, DictionarySet):
        if d.cross:
            raise LensInputError("intervene does not edit a cross-layer transcoder: its features also write into "
                                 "every later layer through the cross decoders, which the edit would drop. Edit "
                                 "per-layer dictionaries (a DictionarySet without cross decoders, or one member).")
        if len(d.dictionaries) == 1:
            d = d.dictionaries[0]
    check_dictionary(view, d)
    if not isinstance(edits, Mapping) or not edits:
        raise LensInputError("edits must be a non-empty {feature index: number or function} mapping.")
    n = d.n_features
    labels = feature_labels(d)
    index = {label: i for i, label in enumerate(labels)} if any(isinstance(f, str) for f in edits) else {}
    out: dict[int, Edit] = {}
    for f, v in edits.items():
        if isinstance(f, str) and f in index:
            i = index[f]
        elif isinstance(f, bool) or not isinstance(f, int) or not -n <= f < n:
            raise LensInputError(f"feature {f!r} is not an index of this dictionary's {n} features nor a label "
                                 f"({labels[0]} .. {labels[-1]}).")
        else:
            i = f % n
        if not (callable(v) or (isinstance(v, Real) and not isinstance(v, bool))):
            raise LensInputError(f"edits[{f!r}] must be a number (the activation it is set to) or a function of the "
                                 f"activations, got {type(v).__name__}.")
        if i in out:
            raise LensInputError(f"feature {labels[i]} is edited twice (two keys of edits name it, one {f!r}).")
        out[i] = v
    if positions is not None:
        int_list(positions)  # the form only: the lengths vary per forward pass
    return Intervention(view, d, out, positions)
