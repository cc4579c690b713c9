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
from mi_lenses.graphs.validate import GraphIntervention, demeaned, run_interventions
from mi_lenses.results import Result, dataframe, plural
from mi_lenses.viz.graph import graph_fragment, graph_table, paths_into


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
    thresholds: tuple[float, float] | None = None  # a pruned graph's (node_threshold, edge_threshold)
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
        return f"logit {self.logit_token_strs[i - self.layout.n_sources]!r}"  # logits come last

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
        reads, resid, logits = rep.replay()
        self._close(logits, rep.logits, tolerance, "the frozen replacement model's logits", "the model's logits")
        n_sources = rep.sources.n_features + rep.n_layers * rep.n_pos + rep.n_pos
        on = torch.zeros(n_sources)
        on[self.source_index] = 1.0
        on_reads, on_resid, _ = (reads, resid, None) if on.all() else rep.replay(on)  # every source: the same run
        off_reads, off_resid, _ = rep.replay(torch.zeros(n_sources))
        lay, t, nf = self.layout, self.nodes_table, self.layout.n_features
        recorded, delta = torch.zeros(nf), torch.zeros(lay.n_features + lay.n_logits)
        for l in t.layer[:nf].unique().tolist():
            sel = (t.layer[:nf] == l).nonzero()[:, 0]
            d, p, f = rep.members[l], t.pos[sel], t.feature[sel]
            recorded[sel] = d.pre_activations(reads[l])[p, f].cpu()
            delta[sel] = (d.pre_activations(on_reads[l])[p, f] - d.pre_activations(off_reads[l])[p, f]).cpu()
        vecs = rep.logit_vectors(t.feature[t.kind == LOGIT])
        delta[nf:] = (vecs @ (on_resid[-1] - off_resid[-1]).to(vecs.device)).cpu()
        act = t.value[:nf]
        off = (recorded - act).abs() > tolerance * act.abs().clamp(min=1.0)
        if off.any():
            i = int(off.nonzero()[0])
            raise VerificationError(f"node {self._label(i)}: the frozen replacement model gives it the pre-activation "
                                    f"{float(recorded[i]):.6g}, but it was recorded with {float(act[i]):.6g}.")
        rows = self.edges.sum(1)
        scale = torch.maximum(self.edges.abs().sum(1), delta.abs()).clamp(min=1.0)
        bad = (delta - rows).abs() > tolerance * scale
        if bad.any():
            r = int(bad.nonzero()[0])
            raise VerificationError(
                f"node {self._label(int(lay.row_nodes()[r]))}: its edges sum to {float(rows[r]):.6g}, but in the "
                f"frozen replacement model its input moves by {float(delta[r]):.6g} when this graph's sources are "
                "switched on.")
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

    def paths(self, logit: int | str = 0, top_k: int = 5) -> list[tuple[float, list[str], list[float]]]:
        """The ``top_k`` strongest paths into a logit node (its rank among the logit nodes, or its token): per path its
        strength (the product of each edge's share of its target's absolute input), its nodes' labels (source first)
        and its edge weights; a path starts at a token, an error node or a feature without inputs."""
        k = self.logit_token_strs.index(logit) if isinstance(logit, str) else int(logit)
        if not 0 <= k < self.layout.n_logits:
            raise LensInputError(f"logit {logit!r} is not a logit node of this graph: {self.logit_token_strs}.")
        return [(s, [self._label(n) for n in nodes], w)
                for s, nodes, w in paths_into(self, self.layout.n_features + k, top_k)]

    # ------------------------------------------------------------------------------------------ interventions
    def top_features(self, top_k: int = 10) -> list[str]:
        """The labels of the ``top_k`` feature nodes with the most influence on the logits."""
        lay = self.layout
        infl = inf.influence(self.weighted_edges, self.logit_probabilities, lay)[: lay.n_features]
        return [self._label(int(i)) for i in infl.argsort(descending=True)[:top_k]]

    def _feature_key(self, node: int | str) -> tuple[int, int, int]:
        t = self.nodes_table
        if isinstance(node, str):
            labels = {self._label(i): i for i in range(self.layout.n_features)}
            if node not in labels:
                raise LensInputError(f"{node!r} is not a feature node of this graph (labels look like 'L3F120@5'; "
                                     "g.top_features() lists some).")
            node = labels[node]
        if not 0 <= int(node) < self.layout.n_features:
            raise LensInputError(f"node {node} is not a feature node (0..{self.layout.n_features - 1}).")
        return int(t.layer[node]), int(t.pos[node]), int(t.feature[node])

    def intervene(self, edits: dict[int | str, float]) -> GraphIntervention:
        """Set feature nodes (their labels, ``"L3F120@5"``, or node indices) to values (``0.0`` ablates, a multiple of
        the activation steers) and report each logit node's change in the local replacement model and in the real
        model (:mod:`~mi_lenses.graphs.validate`)."""
        rep = self._need_replacement()
        keyed = {self._feature_key(k): float(v) for k, v in edits.items()}
        ids = self.nodes_table.feature[self.nodes_table.kind == LOGIT]
        base, replaced, model = run_interventions(rep, ids, keyed)
        return GraphIntervention(self.model_name, {f"L{l}F{f}@{p}": v for (l, p, f), v in keyed.items()},
                                 self.logit_tokens, base, replaced, model, active_hooks=self.active_hooks)

    def faithfulness(self) -> float:
        """How much of the top logit node's de-meaned logit this graph's feature nodes carry in the local replacement
        model: ``(graph - empty) / (full - empty)``, where *full* keeps every feature, *graph* only this graph's
        feature nodes and *empty* none (the error nodes and tokens always stay), as a circuit's faithfulness."""
        rep = self._need_replacement()
        t, S = self.nodes_table, rep.n_pos
        keep = [torch.zeros(S, d.n_features) for d in rep.members]
        for i in (t.kind == FEATURE).nonzero()[:, 0].tolist():
            keep[int(t.layer[i])][int(t.pos[i]), int(t.feature[i])] = 1.0
        top = t.feature[t.kind == LOGIT][:1]
        full = demeaned(rep, rep.run(), top)
        graph = demeaned(rep, rep.run(keep=keep), top)
        empty = demeaned(rep, rep.run(keep=[torch.zeros_like(k) for k in keep]), top)
        return float((graph - empty) / (full - empty))

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
            cumulative=res.cumulative[keep], thresholds=(node_threshold, edge_threshold),
            active_hooks=self.active_hooks)

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
        return circuit_tracer_json(g, g.thresholds[0] if g.thresholds else node_threshold)

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
        return graph_fragment(p, p.feature_lens(), *(p.thresholds or (node_threshold, edge_threshold)))

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
