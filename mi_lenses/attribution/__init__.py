"""Direct logit attribution: embeddings, heads, MLPs, neurons, and source positions through heads.

Example:
    >>> res = direct_logit_attribution(model, "The capital of France is", answer=" Paris", wrong=" city")
    >>> res.metric
    "logit[' Paris'] - logit[' city']"
    >>> logits = model(model.to_tokens("The capital of France is")).detach()[0, -1]
    >>> paris, city = model.to_single_token(" Paris"), model.to_single_token(" city")
    >>> abs(float(res.actual[0]) - float(logits[paris] - logits[city])) < 1e-4   # the model's own logit difference
    True
    >>> abs(float(res.total[0]) - float(res.actual[0])) < 1e-3   # ... which the parts sum to
    True
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
