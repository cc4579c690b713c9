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
    >>> label, value = res.top(1)[0]                        # the cell with the largest |value|
    >>> abs(value) == float(res.values.abs().max())
    True
    >>> layer, head = divmod(int(res.values.abs().argmax()), res.values.shape[1])
    >>> label == f"L{res.layers[layer]}H{head}"
    True
    >>> res.to_dataframe().columns.tolist()
    ['layer', 'head', 'label', 'value']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.patching import (
    circuit_fragment,
    circuit_table,
    edges_fragment,
    edges_table,
    patching_fragment,
    patching_table,
)


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
    mode: str
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

    view_options: ClassVar[dict[str, Any]] = {"top_k": 10, "max_layers": 16, "level": 2}  # see mi_lenses.results

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
        """``L5``, ``L5H3``, ``L5 'tok'@3``, ``L5H3 'tok'@3``, ``L5N17``, ``L5F17`` (a feature)..."""
        s = f"L{coords['layer']}"
        if "head" in coords:
            s += f"H{coords['head']}"
        if "neuron" in coords:
            s += f"N{coords['neuron']}"
        if "feature" in coords:
            s += f"F{coords['feature']}"
        if "pos" in coords:
            p = coords["pos"]
            s += f" {self.pos_labels[p]!r}@{self.pos_map[p][1 if self.mode == 'denoise' else 0]}"
        return s

    def top(self, top_k: int = 10, *, by: Literal["abs", "value", "-value"] = "abs") -> list[tuple[str, float]]:
        """The ``top_k`` cells with the largest ``|value|`` (``by="value"``: most positive, ``"-value"``: most
        negative) as ``(label, value)``; NaN cells (path patching's impossible paths) are left out."""
        flat = self.values.flatten().float()
        key = {"abs": flat.abs(), "value": flat, "-value": -flat}.get(by)
        if key is None:
            raise LensInputError(f"by must be 'abs', 'value' or '-value', got {by!r}.")
        key = torch.where(torch.isnan(key), torch.tensor(-float("inf")), key)
        idx = key.topk(min(top_k, int((~torch.isnan(flat)).sum()))).indices.tolist()
        return [(self.label(self.cell(i)), float(flat[i])) for i in idx]

    def records(self) -> list[dict[str, Any]]:
        """One record per cell: its coordinates, label and value."""
        out = []
        for i, v in enumerate(self.values.flatten().tolist()):
            c = self.cell(i)
            out.append({**c, "label": self.label(c), "value": v})
        return out

    # ------------------------------------------------------------------------------------ protocol
    def to_dict(self, *, batch: int = 0, top_k: int = 10) -> dict[str, Any]:
        """JSON-ready: the settings, the two runs' metric values, the grid (nested lists, ``null`` for NaN), its axes
        and position labels, and the ``top_k`` largest cells."""
        self.check_batch(batch)
        return jsonable({
            "model": self.model_name, "what": self.what, "by": self.by, "method": self.method,
            "mode": self.mode, "metric": self.metric, "normalised": self.normalised,
            "clean_value": self.clean_value, "corrupted_value": self.corrupted_value, "n_prompts": self.n_prompts,
            "layers": self.layers, "axes": self.grid_axes, "positions": self.pos_labels,
            "position_map": [list(p) for p in self.pos_map], "clean_tokens": self.clean_tokens,
            "corrupted_tokens": self.corrupted_tokens, "values": self.values,
            "top": [{"label": label, "value": v} for label, v in self.top(top_k)],
            "engine": self.engine, "cells_run": self.cells_run, "cells_skipped": self.cells_skipped,
            "passes": self.passes, "ig_steps": self.ig_steps,
            "completeness": None if self.completeness is None else list(self.completeness),
            "seconds": self.seconds, **({"extra": self.extra} if self.extra else {}),
        }, digits=8)

    def to_dataframe(self):
        """Tidy frame, one row per cell: the grid coordinates, ``label`` and ``value``."""
        return dataframe(self.records())

    def table(self, *, batch: int = 0, top_k: int = 10, max_layers: int = 16):
        """A rich table: the grid (layers strided to ``max_layers`` rows) shaded by value, and the ``top_k`` largest
        cells."""
        self.check_batch(batch)
        return patching_table(self, top_k=top_k, max_layers=max_layers)

    def fragment(self, *, batch: int = 0, top_k: int = 10, level: int = 2) -> str:
        """The page body (headings at ``level``): the heat map(s) labelled with the tokens, the ``top_k`` largest
        cells, the settings."""
        self.check_batch(batch)
        return patching_fragment(self, top_k=top_k, level=level)

    def _summary(self) -> str:
        top = self.top(1)
        largest = f", largest {top[0][0]} {top[0][1]:+.4f}" if top else ""
        pairs = f", {self.n_prompts} prompt pairs" if self.n_prompts > 1 else ""
        grid = f"{' x '.join(map(str, self.shape))} ({', '.join(self.grid_axes)})"
        return (f"{self.method} on {self.model_name!r}: {self.what} by {self.by}, {self.mode}, grid {grid}{pairs}, "
                f"metric {self.metric}{largest}")


# ------------------------------------------------------------------------------------------------ edges and circuits
@dataclass
class PairSpec:
    """What a circuit's faithfulness is measured on: the two runs' tokens, the metric (answer/wrong ids or a
    callable) and the ``mode`` (``"denoise"`` or ``"noise"``); ``clean_value``/``corrupted_value`` the raw metric of
    the two runs."""

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    mode: str
    metric: str
    answer_ids: Tensor | None = None
    wrong_ids: Tensor | None = None
    metric_fn: Any = field(default=None, repr=False)
    clean_value: float = float("nan")
    corrupted_value: float = float("nan")

    @classmethod
    def of(cls, pair, met) -> "PairSpec":
        """The spec of an experiment's pair and metric (once measured)."""
        return cls(pair.clean.tokens.cpu(), pair.corrupted.tokens.cpu(), pair.mode, met.name, met.answer_ids,
                   met.wrong_ids, met.fn, met.clean, met.corrupted)

    def to_dict(self) -> dict[str, Any]:
        return {"clean_tokens": self.clean_tokens, "corrupted_tokens": self.corrupted_tokens,
                "mode": self.mode, "metric": self.metric, "answer_ids": self.answer_ids,
                "wrong_ids": self.wrong_ids, "clean_value": self.clean_value, "corrupted_value": self.corrupted_value}


@dataclass
class EdgeAttribution(Result):
    """Every edge's attribution (see :mod:`mi_lenses.patching.edges`): ``scores[w, r]`` for writer ``writers[w]``
    into reader ``readers[r]``, NaN where ``w`` does not feed ``r``; normalised like the patching metric.

    Example:
        >>> edges = mi_lenses.edge_attribution(model, "The capital of France is", "The capital of Rome is",
        ...                                    answer=" Paris", wrong=" city")
        >>> node, score = edges.top_nodes(1)[0]
        >>> abs(score - float(edges.node_scores()[edges.writers.index(node)])) < 1e-6
        True
    """

    model_name: str
    method: str
    mode: str
    metric: str
    writers: list[str]
    readers: list[str]
    writer_layers: list[int]
    reader_layers: list[int]
    scores: Float[Tensor, "W R"]
    clean_value: float
    corrupted_value: float
    normalised: bool
    ig_steps: int | None
    n_layers: int
    n_heads: int
    n_kv_heads: int
    spec: PairSpec = field(repr=False)
    seconds: float = 0.0

    view_options: ClassVar[dict[str, Any]] = {"top_k": 20, "level": 2}  # see mi_lenses.results

    @property
    def title(self) -> str:
        return f"Edge attribution ({'EAP-IG' if self.method == 'eap_ig' else 'EAP'}): {self.model_name}"

    @property
    def n_edges(self) -> int:
        return int((~torch.isnan(self.scores)).sum())

    def top_edges(self, top_k: int = 20) -> list[tuple[str, str, float]]:
        """The ``top_k`` edges with the largest ``|score|`` as ``(writer, reader, score)``."""
        flat = self.scores.flatten()
        key = torch.where(torch.isnan(flat), torch.tensor(-1.0), flat.abs())
        idx = key.topk(min(top_k, self.n_edges)).indices.tolist()
        R = len(self.readers)
        return [(self.writers[i // R], self.readers[i % R], float(flat[i])) for i in idx]

    def node_scores(self) -> Float[Tensor, " W"]:
        """Each writer's score: the sum over the readers it feeds (its node attribution)."""
        return self.scores.nan_to_num(0.0).sum(-1)

    def top_nodes(self, top_k: int = 20) -> list[tuple[str, float]]:
        """The ``top_k`` writers with the largest ``|node score|`` as ``(writer, score)``."""
        s = self.node_scores()
        idx = s.abs().topk(min(top_k, len(s))).indices.tolist()
        return [(self.writers[i], float(s[i])) for i in idx]

    def circuit(self, *, edges: int | None = None, nodes: int | None = None,
                threshold: float | None = None) -> "Circuit":
        """A :class:`Circuit` of the top ``edges`` edges, the top ``nodes`` writers (heads and MLPs; the embeddings
        are always kept), or every edge with ``|score| >= threshold``. Measure it with
        :func:`~mi_lenses.patching.circuits.faithfulness`."""
        if sum(x is not None for x in (edges, nodes, threshold)) != 1:
            raise LensInputError("pass exactly one of edges=N, nodes=N or threshold=T.")
        if nodes is not None:
            ranked = [(w, v) for w, v in self.top_nodes(len(self.writers)) if w != "embed"][:nodes]
            return Circuit(self.model_name, "nodes", [], [w for w, _ in ranked], {w: v for w, v in ranked},
                           len(self.writers) - 1, self.n_layers, self.n_heads, self.n_kv_heads, self.spec)
        if threshold is not None:
            picked = [e for e in self.top_edges(self.n_edges) if abs(e[2]) >= threshold]
        else:
            if not isinstance(edges, int) or edges < 0:
                raise LensInputError(f"edges must be a non-negative int, got {edges!r}.")
            picked = self.top_edges(edges)
        return Circuit(self.model_name, "edges", [(w, r) for w, r, _ in picked], [],
                       {f"{w}->{r}": s for w, r, s in picked}, self.n_edges, self.n_layers, self.n_heads,
                       self.n_kv_heads, self.spec)

    def to_dict(self, *, batch: int = 0, top_k: int = 20) -> dict[str, Any]:
        """JSON-ready: the settings, the two runs' metric values, the ``top_k`` largest edges and nodes."""
        self.check_batch(batch)
        return jsonable({"model": self.model_name, "method": self.method, "mode": self.mode,
                         "metric": self.metric, "ig_steps": self.ig_steps, "clean_value": self.clean_value,
                         "corrupted_value": self.corrupted_value, "n_edges": self.n_edges,
                         "top_edges": [{"writer": w, "reader": r, "score": s} for w, r, s in self.top_edges(top_k)],
                         "top_nodes": [{"node": w, "score": s} for w, s in self.top_nodes(top_k)],
                         "seconds": self.seconds}, digits=8)

    def to_dataframe(self):
        """One row per edge: ``writer``, ``reader``, their layers and the ``score``."""
        ok = torch.nonzero(~torch.isnan(self.scores)).tolist()
        return dataframe([{"writer": self.writers[w], "reader": self.readers[r], "writer_layer": self.writer_layers[w],
                           "reader_layer": self.reader_layers[r], "score": float(self.scores[w, r])} for w, r in ok])

    def table(self, *, batch: int = 0, top_k: int = 20):
        """A rich table of the ``top_k`` largest edges."""
        self.check_batch(batch)
        return edges_table(self, top_k=top_k)

    def fragment(self, *, batch: int = 0, top_k: int = 20, level: int = 2) -> str:
        """The page body (headings at ``level``): the ``top_k`` largest edges as a graph and a table, the ``top_k``
        largest nodes."""
        self.check_batch(batch)
        return edges_fragment(self, top_k=top_k, level=level)

    def _summary(self) -> str:
        top = self.top_edges(1)
        largest = f", largest {top[0][0]} -> {top[0][1]} {top[0][2]:+.4f}" if top else ""
        method = "EAP-IG" if self.method == "eap_ig" else "EAP"
        return (f"{method} on {self.model_name!r}: {self.n_edges} edges ({len(self.writers)} writers x "
                f"{len(self.readers)} readers), {self.mode}, metric {self.metric}{largest}")


@dataclass
class Circuit(Result):
    """A circuit: the kept ``edges`` (``(writer, reader)``; ``kind="edges"``) or ``nodes`` (heads and MLPs;
    ``kind="nodes"``), their attribution ``scores``, and, once measured by
    :func:`~mi_lenses.patching.circuits.faithfulness`, the recovered fraction of the clean-corrupted gap with
    everything outside the circuit ablated (``faithfulness``; 1 = the clean run, 0 = the corrupted run).

    Example:
        >>> edges = mi_lenses.edge_attribution(model, "The capital of France is", "The capital of Rome is",
        ...                                    answer=" Paris", wrong=" city")
        >>> full = mi_lenses.faithfulness(model, edges.circuit(threshold=0.0))     # every edge kept: the clean run
        >>> abs(full.faithfulness - 1.0) < 1e-4
        True
        >>> empty = mi_lenses.faithfulness(model, edges.circuit(edges=0))        # nothing kept: the corrupted run
        >>> abs(empty.faithfulness) < 1e-4
        True
    """

    model_name: str
    kind: str
    edges: list[tuple[str, str]]
    nodes: list[str]
    scores: dict[str, float]
    n_total: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    spec: PairSpec = field(repr=False)
    faithfulness: float | None = None
    ablation: str | None = None
    ablated_value: float | None = None
    seconds: float = 0.0

    view_options: ClassVar[dict[str, Any]] = {"top_k": 20, "level": 2}  # see mi_lenses.results

    @property
    def size(self) -> int:
        """The number of edges (or nodes) kept."""
        return len(self.edges) if self.kind == "edges" else len(self.nodes)

    @property
    def title(self) -> str:
        return f"Circuit: {self.model_name}"

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        self.check_batch(batch)
        return jsonable({"model": self.model_name, "kind": self.kind, "size": self.size, "total": self.n_total,
                         "edges": [list(e) for e in self.edges], "nodes": self.nodes, "scores": self.scores,
                         "faithfulness": self.faithfulness, "ablation": self.ablation,
                         "ablated_value": self.ablated_value, "pair": self.spec.to_dict()}, digits=8)

    def to_dataframe(self):
        """One row per kept edge (``writer``, ``reader``, ``score``) or node (``node``, ``score``)."""
        if self.kind == "edges":
            return dataframe([{"writer": w, "reader": r, "score": self.scores.get(f"{w}->{r}", float("nan"))}
                              for w, r in self.edges])
        return dataframe([{"node": n, "score": self.scores.get(n, float("nan"))} for n in self.nodes])

    def table(self, *, batch: int = 0, top_k: int = 20):
        """A rich table of the circuit's ``top_k`` strongest edges (or nodes) and its faithfulness."""
        self.check_batch(batch)
        return circuit_table(self, top_k=top_k)

    def fragment(self, *, batch: int = 0, level: int = 2) -> str:
        """The page body (headings at ``level``): the circuit as a graph, its edges or nodes, its faithfulness."""
        self.check_batch(batch)
        return circuit_fragment(self, level=level)

    def _summary(self) -> str:
        faith = "not measured" if self.faithfulness is None else f"{self.faithfulness:+.4f} ({self.ablation})"
        return (f"on {self.model_name!r}: {self.size} of {plural(self.n_total, self.kind[:-1])}, faithfulness "
                f"{faith}")
