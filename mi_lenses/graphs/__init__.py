"""Attribution graphs through transcoders (Ameisen et al. 2025): :func:`attribution_graph` and its result."""

from mi_lenses.graphs.build import attribution_graph
from mi_lenses.graphs.result import AttributionGraph, Node
from mi_lenses.graphs.validate import GraphIntervention

__all__ = ["AttributionGraph", "GraphIntervention", "Node", "attribution_graph"]
