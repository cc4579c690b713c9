"""Influence, pruning and the graph scores, as circuit-tracer 0.5.0 defines them, on the rectangular edge matrix.

A graph's nodes are laid out ``[features, errors, tokens, logits]``; only features and logits receive edges, only
features, errors and tokens send them, so the edges are stored as ``E [targets, sources]`` with targets = features
then logits and sources = features, errors, tokens (never the square node × node matrix, whose error and token
rows are all zeros).

* **Normalised edges**: ``|E|`` with each row divided by its sum.
* **Influence** of a node on the logits: ``w @ (Â + Â² + ...)`` (``Â`` the normalised square matrix, ``w`` the logit
  probabilities on the logit nodes): every path from the node to a logit, weighted.
* **Pruning** (``prune_graph``): keep the nodes holding ``node_threshold`` of the cumulative influence (tokens and
  logits always), then the edges holding ``edge_threshold`` of the edge influence, then drop, until nothing changes,
  the features and errors left without an outgoing edge and the features left without an incoming one.
* **Replacement score**: the share of the tokens' and errors' influence that is the tokens'; **completeness**: the
  influence-weighted share of every node's input that does not come from an error node.

Example:
    >>> E = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]])      # 1 feature, 1 error, 1 token; 1 logit
    >>> layout = Layout(n_features=1, n_errors=1, n_tokens=1, n_logits=1)
    >>> influence(E, torch.tensor([1.0]), layout)                # logit -> feature 3/4, error 1/4 + 3/4·2/3
    tensor([0.7500, 0.7500, 0.2500])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How many nodes of each kind, in the order ``[features, errors, tokens, logits]``."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n_sources(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.n_sources + self.n_logits

    def row_nodes(self) -> Tensor:
        """The node index of each row of ``E``: the features, then the logits."""
        return torch.cat([torch.arange(self.n_features), torch.arange(self.n_sources, self.n_nodes)])


def normalized(E: Float[Tensor, "T S"]) -> Float[Tensor, "T S"]:
    a = E.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(E: Float[Tensor, "T S"], weights: Float[Tensor, " n_logits"], layout: Layout, *,
              normalize: bool = True, max_iter: int = 1000) -> Float[Tensor, " n_sources"]:
    """Each source node's influence on the logits (module docstring): ``Σ_k w Â^k`` over the columns, propagated
    through the feature rows (features are the only nodes both sending and receiving)."""
    A = normalized(E) if normalize else E
    nf = layout.n_features
    cur = torch.cat([torch.zeros(nf), weights.float()])  # the rows' weights: features, then logits
    total = torch.zeros(layout.n_sources)
    for _ in range(max_iter):
        step = cur @ A
        if not step.any():
            return total
        total += step
        cur = torch.cat([step[:nf], torch.zeros(layout.n_logits)])
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the edges are not acyclic.")


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score at which the largest scores reach ``threshold`` of their sum (circuit-tracer's ``find_threshold``)."""
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)).item()), len(s) - 1)
    return s[i]


@dataclass
class Pruned:
    node_mask: Bool[Tensor, " n_nodes"]
    edge_mask: Bool[Tensor, "T S"]
    cumulative: Float[Tensor, " n_nodes"]  # each node's place in the cumulative influence (0..1)


def prune(E: Float[Tensor, "T S"], weights: Float[Tensor, " n_logits"], layout: Layout, *,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's ``prune_graph`` (module docstring)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {v}.")
    nf, ns, nl = layout.n_features, layout.n_sources, layout.n_logits
    node_inf = torch.cat([influence(E, weights, layout), torch.zeros(nl)])
    node_mask = node_inf >= find_threshold(node_inf, node_threshold)
    node_mask[ns - layout.n_tokens:] = True  # tokens and logits
    rows = layout.row_nodes()
    P = E.clone()
    P[~node_mask[rows]] = 0
    P[:, ~node_mask[:ns]] = 0
    A = normalized(P)
    row_inf = torch.cat([influence(P, weights, layout)[:nf], weights.float()])  # each row node's influence, + w
    scores = A * row_inf[:, None]
    edge_mask = scores >= find_threshold(scores, edge_threshold)
    sends = slice(0, nf + layout.n_errors)
    old = node_mask.clone()
    node_mask[sends] &= edge_mask[:, sends].any(0)
    node_mask[:nf] &= edge_mask[:nf].any(1)
    while not torch.equal(node_mask, old):
        old = node_mask.clone()
        edge_mask[~node_mask[rows]] = False
        edge_mask[:, ~node_mask[:ns]] = False
        node_mask[sends] &= edge_mask[:, sends].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
    order = torch.argsort(node_inf, descending=True)
    cum = torch.cumsum(node_inf[order], 0) / node_inf.sum().clamp(min=1e-30)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order] = cum
    return Pruned(node_mask, edge_mask, cumulative)


def scores(E: Float[Tensor, "T S"], weights: Float[Tensor, " n_logits"], layout: Layout) -> tuple[float, float]:
    """``(replacement score, completeness score)`` (module docstring; circuit-tracer's ``compute_graph_scores``)."""
    nf, ne = layout.n_features, layout.n_errors
    A = normalized(E)
    inf = influence(E, weights, layout)
    tok, err = inf[nf + ne:].sum(), inf[nf:nf + ne].sum()
    replacement = float(tok / (tok + err).clamp(min=1e-30))
    non_error = torch.ones(layout.n_nodes)
    non_error[layout.row_nodes()] = 1 - A[:, nf:nf + ne].sum(1)
    out_inf = torch.cat([inf, weights.float()])
    completeness = float((non_error * out_inf).sum() / out_inf.sum().clamp(min=1e-30))
    return replacement, completeness


def partial_influence(E: Float[Tensor, "T S"], row_nodes: Tensor, weights: Float[Tensor, " n_logits"],
                      max_iter: int = 128, chunk: int = 64) -> Float[Tensor, " S"]:
    """The influence on the logits of every source, from the rows computed so far (``row_nodes``: the source index of
    each feature row, ``-1`` for a logit row): how features are ranked for expansion (circuit-tracer's
    ``compute_partial_influences``). The influence is propagated within the computed rows (``[T, T]``), then read on
    every column once, ``(Σ_k w_k) Â`` (the same sum), without a normalised copy of ``E``."""
    rowsum = torch.cat([E[i:i + chunk].abs().sum(1) for i in range(0, E.shape[0], chunk)]).clamp(min=1e-8)
    is_logit = row_nodes < 0
    feat_rows = (~is_logit).nonzero()[:, 0]
    block = E[:, row_nodes[feat_rows]].abs() / rowsum[:, None]  # [T, feature rows]: row r -> that feature's node
    cur = torch.zeros(E.shape[0])
    cur[is_logit] = weights.float().cpu()
    acc = torch.zeros(E.shape[0])
    for _ in range(max_iter):
        acc += cur
        nxt = torch.zeros(E.shape[0])
        nxt[feat_rows] = cur @ block
        if not nxt.any():
            w = acc / rowsum
            return sum(w[i:i + chunk] @ E[i:i + chunk].abs() for i in range(0, E.shape[0], chunk))
        cur = nxt
    raise RuntimeError(f"influence did not converge in {max_iter} steps.")
