"""The attribution graph of one prompt: its nodes, its edges, the checks, pruning, circuit-tracer's JSON and the views.

Nodes are laid out ``[features, errors, tokens, logits]`` (circuit-tracer's order); ``edges`` ``[targets, sources]``
holds the edge into each feature or logit node (rows, in node order) from each feature, error or token node
(columns, in node order): ``edges[t, s]`` is ``A[t ← s]`` (:mod:`~mi_lenses.graphs.replacement`). A pruned graph
keeps a subset of the nodes and an ``edge_mask``; its ``edges`` are the unpruned values between the nodes it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.features.dla import decode_directions
from mi_lenses.graphs import influence as inf
from mi_lenses.graphs.export import circuit_tracer_json
from mi_lenses.graphs.influence import Layout
from mi_lenses.graphs.nodes import ERROR, FEATURE, KINDS, LOGIT, TOKEN, Node, Nodes
from mi_lenses.results import Result, dataframe, plural
from mi_lenses.viz.graph import graph_fragment, graph_table


@dataclass(eq=False)
class AttributionGraph(Result):
    """The attribution graph of one prompt (module docstring), from :func:`~mi_lenses.attribution_graph`."""

    view_options: ClassVar = {"top_k": 5, "node_threshold": 0.8, "edge_threshold": 0.98}

    model_name: str
    transcoders_name: str
    str_tokens: list[str]
    tokens: list[int]
    n_layers: int
    nodes_table: Nodes
    edges: Float[Tensor, "targets sources"]
    source_index: Int[Tensor, " sources"]  # each source node's index among the replacement model's sources
    logit_token_strs: list[str]
    n_active: int  # active features on the prompt (the expanded ones are the feature nodes)
    edge_mask: Bool[Tensor, "targets sources"] | None = None  # a pruned graph's kept edges
    replacement: Any = field(default=None, repr=False)
    feature_type: str = "per-layer transcoder"
    cumulative: Float[Tensor, " N"] | None = None
    active_hooks: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------ reading
    @property
    def layout(self) -> Layout:
        return self.nodes_table.layout

    @property
    def logit_tokens(self) -> list[str]:
        """The logit nodes' tokens, most probable first."""
        return list(self.logit_token_strs)

    @property
    def logit_probabilities(self) -> Tensor:
        return self.nodes_table.value[self.nodes_table.kind == LOGIT]

    @property
    def weighted_edges(self) -> Tensor:
        """``edges`` with the pruned edges zeroed (a pruned graph), else ``edges``."""
        return self.edges if self.edge_mask is None else self.edges * self.edge_mask

    @property
    def nodes(self) -> list[Node]:
        """Every node as a :class:`Node`, in node order."""
        t, cum = self.nodes_table, self.cumulative
        out = []
        for i in range(len(t.kind)):
            k, l, p, f = int(t.kind[i]), int(t.layer[i]), int(t.pos[i]), int(t.feature[i])
            v = float(t.value[i])
            out.append(Node(KINDS[k], l, p, f, v if k == FEATURE else None, v if k == LOGIT else None,
                            self._label(i), None if cum is None else float(cum[i])))
        return out

    def _label(self, i: int) -> str:
        t = self.nodes_table
        k, l, p, f = int(t.kind[i]), int(t.layer[i]), int(t.pos[i]), int(t.feature[i])
        if k == FEATURE:
            return f"L{l}F{f}@{p}"
        if k == ERROR:
            return f"err L{l}@{p}"
        if k == TOKEN:
            return f"tok {self.str_tokens[p]!r}@{p}"
        return f"logit {self.logit_token_strs[int((t.kind[:i] == LOGIT).sum())]!r}"

    @property
    def adjacency(self) -> Float[Tensor, "N N"]:
        """The square ``[node, node]`` matrix of circuit-tracer's ``Graph.adjacency_matrix`` (rows: targets, columns:
        sources; pruned edges zeroed). Mind the size: the error nodes alone are ``n_layers × n_pos``."""
        lay = self.layout
        A = torch.zeros(lay.n_nodes, lay.n_nodes)
        A[lay.row_nodes()[:, None], torch.arange(lay.n_sources)[None]] = self.weighted_edges
        return A

    def scores(self) -> tuple[float, float]:
        """``(replacement score, completeness score)`` (:mod:`~mi_lenses.graphs.influence`)."""
        return inf.scores(self.weighted_edges, self.logit_probabilities, self.layout)

    # ------------------------------------------------------------------------------------------ the checks
    def verify(self, tolerance: float = 1e-4) -> AttributionGraph:
        """Check the graph against forward passes of the frozen replacement model (no gradients):

        * with every node as recorded it reproduces the model's logits, and each feature's pre-activation;
        * every target's input (a feature's pre-activation, a logit node's de-meaned logit) is the sum of its
          incoming edges from this graph's sources plus its constant: the input with only these sources on, less the
          input with no source on.

        ``tolerance`` is relative to the largest of the row's absolute edge sum and the inputs. Raises
        ``VerificationError`` naming the first node that fails; returns the graph."""
        rep = self._need_replacement()
        reads, _, logits = rep.replay()
        self._close(logits, rep.logits, tolerance, "the frozen replacement model's logits", "the model's logits")
        n_sources = rep.sources.n_features + rep.n_layers * rep.n_pos + rep.n_pos
        on = torch.zeros(n_sources)
        on[self.source_index] = 1.0
        on_reads, on_resid, _ = rep.replay(on)
        off_reads, off_resid, _ = rep.replay(torch.zeros(n_sources))
        rows = self.edges.sum(1)
        lay, t = self.layout, self.nodes_table
        for r, node in enumerate(lay.row_nodes().tolist()):
            if int(t.kind[node]) == FEATURE:
                l, p, f = int(t.layer[node]), int(t.pos[node]), int(t.feature[node])
                d = rep.members[l]
                recorded_pre, act = float(d.pre_activations(reads[l][p])[f]), float(t.value[node])
                if abs(recorded_pre - act) > tolerance * max(1.0, abs(act)):
                    raise VerificationError(f"node {self._label(node)}: the frozen replacement model gives it the "
                                            f"pre-activation {recorded_pre:.6g}, but it was recorded with {act:.6g}.")
                delta = float(d.pre_activations(on_reads[l][p])[f] - d.pre_activations(off_reads[l][p])[f])
            else:
                vec = rep.logit_vectors(torch.tensor([int(t.feature[node])]))[0]
                delta = float(vec @ (on_resid[-1] - off_resid[-1]))
            scale = max(1.0, float(self.edges[r].abs().sum()), abs(delta))
            if abs(delta - float(rows[r])) > tolerance * scale:
                raise VerificationError(
                    f"node {self._label(node)}: its edges sum to {float(rows[r]):.6g}, but in the frozen replacement "
                    f"model its input moves by {delta:.6g} when this graph's sources are switched on.")
        return self

    def _close(self, a: Tensor, b: Tensor, tolerance: float, what_a: str, what_b: str) -> None:
        gap = float((a - b).abs().max())
        if gap > tolerance * max(1.0, float(b.abs().max())):
            raise VerificationError(f"{what_a} differ from {what_b} by {gap:.3g}.")

    def _need_replacement(self) -> Any:
        if self.replacement is None:
            raise LensInputError("this graph has no replacement model attached (it was read from a file): rebuild it "
                                 "with mi_lenses.attribution_graph to verify or intervene.")
        return self.replacement

    # ------------------------------------------------------------------------------------------ pruning
    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """The graph pruned by influence (circuit-tracer's defaults: the nodes holding 0.8 of the cumulative influence,
        the edges holding 0.98; tokens and logits always kept): a graph with fewer nodes and an ``edge_mask``."""
        res = inf.prune(self.weighted_edges, self.logit_probabilities, self.layout, node_threshold=node_threshold,
                        edge_threshold=edge_threshold)
        keep = res.node_mask
        lay = self.layout
        rows_keep = keep[lay.row_nodes()]
        cols_keep = keep[: lay.n_sources]
        mask = res.edge_mask if self.edge_mask is None else res.edge_mask & self.edge_mask
        return AttributionGraph(
            model_name=self.model_name, transcoders_name=self.transcoders_name, str_tokens=self.str_tokens,
            tokens=self.tokens, n_layers=self.n_layers, nodes_table=self.nodes_table.subset(keep),
            edges=self.edges[rows_keep][:, cols_keep], source_index=self.source_index[cols_keep],
            logit_token_strs=self.logit_token_strs, n_active=self.n_active,
            edge_mask=mask[rows_keep][:, cols_keep], replacement=self.replacement, feature_type=self.feature_type,
            cumulative=res.cumulative[keep], active_hooks=self.active_hooks)

    # ------------------------------------------------------------------------------------------ views
    def _summary(self) -> str:
        lay = self.layout
        top = ", ".join(f"{s!r} {float(p):.2f}" for s, p in zip(self.logit_token_strs[:3], self.logit_probabilities))
        pruned = f", {int(self.edge_mask.sum())} edges kept" if self.edge_mask is not None else ""
        return (f"attribution graph on {self.model_name!r}: {plural(len(self.tokens), 'token')}, "
                f"{plural(lay.n_features, 'feature node')} of {self.n_active} active, "
                f"{plural(lay.n_errors, 'error node')}, logits {top}{pruned}")

    def to_dict(self, *, batch: int = 0, node_threshold: float = 0.8, edge_threshold: float = 0.98
                ) -> dict[str, Any]:
        """circuit-tracer's graph JSON (``metadata``, ``qParams``, ``nodes``, ``links``), which its frontend and
        Neuronpedia open; an unpruned graph is pruned first with the thresholds, as ``create_graph_files`` does."""
        self.check_batch(batch)
        g = self if self.edge_mask is not None else self.prune(node_threshold, edge_threshold)
        return circuit_tracer_json(g, node_threshold)

    def to_dataframe(self) -> Any:
        return dataframe([{**vars(n)} for n in self.nodes])

    def table(self, *, batch: int = 0, top_k: int = 5) -> Any:
        """The strongest paths into each logit (terminal summary)."""
        self.check_batch(batch)
        return graph_table(self, top_k)

    def fragment(self, *, batch: int = 0, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> str:
        """The interactive graph (nodes by layer × position, edges by weight, a pruning slider)."""
        self.check_batch(batch)
        p = self if self.edge_mask is not None else self.prune(node_threshold, edge_threshold)
        return graph_fragment(p, p.feature_lens(), self.layout.n_features, node_threshold, edge_threshold)

    def feature_lens(self, top_k: int = 5) -> dict[int, str]:
        """Per feature node (its index): the tokens its decoder row promotes and suppresses most through the final
        norm and the unembedding (empty without the replacement model)."""
        rep, t = self.replacement, self.nodes_table
        idx = (t.kind == FEATURE).nonzero()[:, 0].tolist()
        if rep is None or not idx:
            return {}
        rows = torch.stack([rep.members[int(t.layer[i])].decoder_rows()[int(t.feature[i])] for i in idx])
        if rows.shape[-1] != rep.view.d_model:
            return {}
        return {i: "promotes " + " ".join(repr(s) for s, _ in up) + "; suppresses " + " ".join(repr(s) for s, _ in dn)
                for i, (up, dn) in zip(idx, decode_directions(rep.view, rows, top_k))}
