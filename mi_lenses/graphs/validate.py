"""Validating a graph by intervention (circuit-tracer's ``feature_intervention``): edit a set of its feature nodes and
compare the change of the logit nodes in the local replacement model (attention and norms frozen, every transcoder's
features recomputed, the errors kept) and in the real model (our :func:`~mi_lenses.intervene`: the MLPs run, the
edited features' decoder rows are added to their outputs, every later layer recomputed).

Example:
    >>> ts = mi_lenses.load_dictionary(model=model, progress=False)
    >>> g = mi_lenses.attribution_graph(model, "The capital of France is", ts, progress=False)
    >>> top = g.top_features(1)[0]
    >>> res = g.intervene({top: 0.0})                     # ablate the feature the logits lean on most
    >>> res.replacement.shape == res.model.shape == (len(g.logit_tokens),)
    True
    >>> bool(res.replacement.abs().max() > 0)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from rich.table import Table
from torch import Tensor

from mi_lenses.features.dictionary import DictionarySet
from mi_lenses.features.intervene import intervene
from mi_lenses.results import Result, dataframe, plural
from mi_lenses.viz.graph import intervention_fragment, intervention_table


@dataclass(eq=False)
class GraphIntervention(Result):
    """The change of each logit node's de-meaned logit after editing feature nodes: ``replacement`` in the local
    replacement model, ``model`` in the real model (``None`` for a cross-layer transcoder, which the real model cannot
    be edited with), ``[n_logits]``; ``base`` the logits before."""

    view_options: ClassVar = {}

    model_name: str
    edits: dict[str, float]
    logit_tokens: list[str]
    base: Float[Tensor, " n_logits"]
    replacement: Float[Tensor, " n_logits"]
    model: Float[Tensor, " n_logits"] | None
    active_hooks: tuple[str, ...] = ()

    def _summary(self) -> str:
        return (f"on {self.model_name!r}: {plural(len(self.edits), 'edit')}, "
                f"max |Δ logit| replacement {float(self.replacement.abs().max()):.3g}"
                + ("" if self.model is None else f", model {float(self.model.abs().max()):.3g}"))

    def _rows(self) -> list[dict[str, Any]]:
        return [{"token": t, "logit": float(self.base[i]), "replacement_delta": float(self.replacement[i]),
                 "model_delta": None if self.model is None else float(self.model[i])}
                for i, t in enumerate(self.logit_tokens)]

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        self.check_batch(batch)
        return {"model": self.model_name, "edits": self.edits, "logits": self._rows()}

    def to_dataframe(self) -> Any:
        return dataframe(self._rows())

    def table(self, *, batch: int = 0) -> Table:
        self.check_batch(batch)
        return intervention_table(self.model_name, self.edits, self._rows())

    def fragment(self, *, batch: int = 0) -> str:
        self.check_batch(batch)
        return intervention_fragment(self._rows())


def demeaned(rep: Any, logits: Float[Tensor, " V"], ids: Tensor) -> Float[Tensor, " n"]:
    """The logit nodes' quantity: each token's logit before the soft-cap (Gemma 2's) less the mean logit, as the
    edges into logit nodes measure it."""
    z = rep.view.decoder.uncap(logits.float())
    return z[ids] - z.mean()


def edit_functions(edits: dict[tuple[int, int, int], float]) -> dict[str, Callable[[Tensor], Tensor]]:
    """``{"L{layer}F{feature}": a -> a with the edited positions set}`` for :func:`~mi_lenses.intervene`."""
    by_feature: dict[str, list[tuple[int, float]]] = {}
    for (layer, pos, feature), value in edits.items():
        by_feature.setdefault(f"L{layer}F{feature}", []).append((pos, value))

    def setter(items: list[tuple[int, float]]) -> Callable[[Tensor], Tensor]:
        def fn(a: Tensor) -> Tensor:
            a = a.clone()
            for pos, value in items:
                a[:, pos] = value
            return a
        return fn

    return {label: setter(items) for label, items in by_feature.items()}


def run_interventions(rep: Any, ids: Tensor, edits: dict[tuple[int, int, int], float]
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(base, Δ replacement, Δ model)`` of the logit nodes ``ids`` under ``edits``."""
    base = demeaned(rep, rep.logits, ids)
    replaced = demeaned(rep, rep.run(edits), ids) - demeaned(rep, rep.run(), ids)
    if rep.cross:
        return base, replaced, None
    with torch.no_grad(), intervene(rep.view.model, DictionarySet(rep.members), edit_functions(edits)):
        model = demeaned(rep, rep.view.model(rep.tokens)[0, -1].float().cpu(), ids) - base
    return base, replaced, model
