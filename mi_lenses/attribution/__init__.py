"""Direct logit attribution: embeddings, heads, MLPs, neurons, and source positions through heads.

Example:
    >>> res = direct_logit_attribution(model, "The capital of France is", answer=" Paris", wrong=" city")
    >>> res.direction
    "logit[' Paris'] - logit[' city']"
    >>> len(res.top(5)), res.to_html(tmp / "dla.html").startswith("<!DOCTYPE html>")
    (5, True)
"""

from mi_lenses.attribution.components import direct_logit_attribution, required_hooks
from mi_lenses.attribution.directions import Direction, resolve_direction
from mi_lenses.attribution.neurons import neuron_attribution
from mi_lenses.attribution.result import Component, DLAResult, NeuronAttribution

__all__ = [
    "Component",
    "DLAResult",
    "Direction",
    "NeuronAttribution",
    "direct_logit_attribution",
    "neuron_attribution",
    "required_hooks",
    "resolve_direction",
]
