"""The nodes of an attribution graph: the four kinds, one :class:`Node` per node, and the node table as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.graphs.influence import Layout

KINDS = ("feature", "error", "token", "logit")
FEATURE, ERROR, TOKEN, LOGIT = range(4)


@dataclass(frozen=True)
class Node:
    """One node: ``kind`` (feature, error, token, logit), ``layer`` (a token's is -1, a logit's ``n_layers``),
    ``position``, ``feature`` (a feature's index in its transcoder; a token's or logit's token id), ``activation``
    (a feature's), ``probability`` (a logit's), ``label`` (``L3F120@5``, ``err L3@5``, ``tok ' Paris'@5``, ``logit
    ' Paris'``) and ``influence`` (its share of the cumulative influence on the logits, 0..1, where computed)."""

    kind: str
    layer: int
    position: int
    feature: int
    activation: float | None
    probability: float | None
    label: str
    influence: float | None = None


@dataclass(eq=False)
class Nodes:
    """The node table as tensors (one entry per node, in node order)."""

    layout: Layout
    kind: Int[Tensor, " N"]
    layer: Int[Tensor, " N"]
    pos: Int[Tensor, " N"]
    feature: Int[Tensor, " N"]
    value: Float[Tensor, " N"]  # a feature's activation, a logit's probability, else 0

    @classmethod
    def build(cls, layout: Layout, *, features: tuple[Tensor, Tensor, Tensor, Tensor], errors: tuple[Tensor, Tensor],
              tokens: Tensor, logits: tuple[Tensor, Tensor], n_pos: int) -> Nodes:
        fl, fp, ff, fa = features
        el, ep = errors
        S, n_layers = n_pos, int(el.max()) + 1 if el.numel() else 0
        ids, probs = logits

        def full(n: int, v: int) -> Tensor:
            return torch.full((n,), v, dtype=torch.long)

        kind = torch.cat([full(len(fl), FEATURE), full(len(el), ERROR), full(S, TOKEN), full(len(ids), LOGIT)])
        layer = torch.cat([fl, el, full(S, -1), full(len(ids), n_layers)])
        pos = torch.cat([fp, ep, torch.arange(S), full(len(ids), S - 1)])
        feature = torch.cat([ff, full(len(el), -1), tokens.long(), ids.long()])
        value = torch.cat([fa.float(), torch.zeros(len(el) + S), probs.float()])
        return cls(layout, kind, layer.long(), pos.long(), feature.long(), value)

    def subset(self, keep: Bool[Tensor, " N"]) -> Nodes:
        k = self.kind[keep]
        layout = Layout(*(int((k == c).sum()) for c in range(4)))
        return Nodes(layout, k, self.layer[keep], self.pos[keep], self.feature[keep], self.value[keep])
