"""PatchingResult: a patching grid (exact, attribution, EAP-IG or path patching) with its labels and renderers.

``values`` is ``[layers, *grid axes]`` (``grid_axes`` names them: ``["layer", "pos"]``, ``["layer", "head"]``,
``["layer", "pos", "head"]``, ...). With the default metric a value is the normalised logit difference of the patched
run: 0 = the corrupted run, 1 = the clean run; denoising patches clean activations into the corrupted run, noising the
other way round (see :mod:`mi_lenses.patching.metric`).

Example:
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     answer=" Paris", wrong=" city", what="head_out")
    >>> res.grid_axes, res.values.shape == (3, 6)
    (['layer', 'head'], True)
    >>> label, value = res.top(1)[0]
    >>> value == float(res.values.abs().max()) or value == -float(res.values.abs().max())
    True
    >>> res.to_dataframe().columns.tolist()
    ['layer', 'head', 'label', 'value']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.results import Result, dataframe, jsonable
from mi_lenses.viz.patching import patching_fragment, patching_table


@dataclass
class PatchingResult(Result):
    """One patching grid (see the module docstring).

    ``pos_labels``: one label per grid position (the base run's token; ``clean→corrupted`` where they differ);
    ``clean_value``/``corrupted_value``: the raw metric of the two runs (the default metric's 1 and 0);
    ``engine``: ``"replay"`` (rows computed from the patched block on), ``"forward"`` (whole passes) or
    ``"gradient"``; ``cells_run``/``cells_skipped``/``passes``: what the exact engine ran (a skipped cell's source
    and base activations are identical, so its value is the base run's); ``completeness`` (EAP-IG): the embedding
    cut's attributions summed, and the metric difference they approach.
    """

    model_name: str
    what: str
    by: str
    method: str
    direction: str
    metric: str
    values: Float[Tensor, "L ..."]
    layers: list[int]
    grid_axes: list[str]
    pos_labels: list[str]
    clean_tokens: list[str]
    corrupted_tokens: list[str]
    pos_map: list[tuple[int, int]]
    clean_value: float
    corrupted_value: float
    normalised: bool = True
    n_prompts: int = 1
    engine: str = "replay"
    cells_run: int = 0
    cells_skipped: int = 0
    passes: int = 0
    ig_steps: int | None = None
    completeness: tuple[float, float] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        kind = {"exact": "Activation patching", "attribution": "Attribution patching", "eap_ig": "EAP-IG",
                "path": "Path patching"}.get(self.method, self.method)
        return f"{kind}: {self.model_name}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    # ------------------------------------------------------------------------------------ cells
    def cell(self, flat: int) -> dict[str, int]:
        """The coordinates (``layer`` as a model layer, then the grid axes) of the ``flat``-th cell."""
        idx = torch.unravel_index(torch.tensor(flat), self.values.shape)
        out = {"layer": self.layers[int(idx[0])]}
        out.update({a: int(i) for a, i in zip(self.grid_axes[1:], idx[1:])})
        return out

    def label(self, coords: dict[str, int]) -> str:
        """``L5``, ``L5H3``, ``L5 'tok'@3``, ``L5H3 'tok'@3``, ``L5N17``..."""
        s = f"L{coords['layer']}"
        if "head" in coords:
            s += f"H{coords['head']}"
        if "neuron" in coords:
            s += f"N{coords['neuron']}"
        if "pos" in coords:
            p = coords["pos"]
            s += f" {self.pos_labels[p]!r}@{self.pos_map[p][1 if self.direction == 'denoise' else 0]}"
        return s

    def top(self, k: int = 10, *, by: Literal["abs", "value", "-value"] = "abs") -> list[tuple[str, float]]:
        """The ``k`` cells with the largest ``|value|`` (``by="value"``: most positive, ``"-value"``: most negative)
        as ``(label, value)``; NaN cells (path patching's impossible paths) are left out."""
        flat = self.values.flatten().float()
        key = {"abs": flat.abs(), "value": flat, "-value": -flat}.get(by)
        if key is None:
            raise LensInputError(f"by must be 'abs', 'value' or '-value', got {by!r}.")
        key = torch.where(torch.isnan(key), torch.tensor(-float("inf")), key)
        idx = key.topk(min(k, int((~torch.isnan(flat)).sum()))).indices.tolist()
        return [(self.label(self.cell(i)), float(flat[i])) for i in idx]

    def records(self) -> list[dict[str, Any]]:
        """One record per cell: its coordinates, label and value."""
        out = []
        for i, v in enumerate(self.values.flatten().tolist()):
            c = self.cell(i)
            out.append({**c, "label": self.label(c), "value": v})
        return out

    # ------------------------------------------------------------------------------------ protocol
    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """JSON-ready: the settings, the two runs' metric values, the grid (nested lists, ``null`` for NaN), its axes
        and position labels, and the 10 largest cells."""
        self.check_batch(batch)
        return jsonable({
            "model": self.model_name, "what": self.what, "by": self.by, "method": self.method,
            "direction": self.direction, "metric": self.metric, "normalised": self.normalised,
            "clean_value": self.clean_value, "corrupted_value": self.corrupted_value, "n_prompts": self.n_prompts,
            "layers": self.layers, "axes": self.grid_axes, "positions": self.pos_labels,
            "position_map": [list(p) for p in self.pos_map], "clean_tokens": self.clean_tokens,
            "corrupted_tokens": self.corrupted_tokens, "values": self.values,
            "top": [{"label": label, "value": v} for label, v in self.top(10)],
            "engine": self.engine, "cells_run": self.cells_run, "cells_skipped": self.cells_skipped,
            "passes": self.passes, "ig_steps": self.ig_steps,
            "completeness": None if self.completeness is None else list(self.completeness),
            "seconds": self.seconds, **({"extra": self.extra} if self.extra else {}),
        }, digits=8)

    def to_dataframe(self):
        """Tidy frame, one row per cell: the grid coordinates, ``label`` and ``value``."""
        return dataframe(self.records())

    def table(self, *, batch: int = 0, max_rows: int = 16):
        """A rich table: the grid (layers strided to ``max_rows``) shaded by value, and the largest cells."""
        self.check_batch(batch)
        return patching_table(self, max_rows=max_rows)

    def fragment(self, *, batch: int = 0, level: int = 2) -> str:
        """The page body: the heat map(s) labelled with the tokens, the largest cells, the settings."""
        self.check_batch(batch)
        return patching_fragment(self, level=level)
