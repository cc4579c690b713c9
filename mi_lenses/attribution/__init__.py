"""Direct logit attribution: embeddings, heads, MLPs, neurons, and source positions through heads.

Example::

    from mi_lenses.attribution import direct_logit_attribution
    res = direct_logit_attribution(model, "When Mary and John went to the store, John gave a drink to",
                                   answer=" Mary", wrong=" John")
    res.verify(); res.top(5); res.to_html("dla.html")
"""

from mi_lenses.attribution.components import direct_logit_attribution, required_hooks
from mi_lenses.attribution.directions import Direction, resolve_direction
from mi_lenses.attribution.neurons import neuron_attribution
from mi_lenses.attribution.result import Component, DLAResult

__all__ = [
    "Component",
    "DLAResult",
    "Direction",
    "direct_logit_attribution",
    "neuron_attribution",
    "required_hooks",
    "resolve_direction",
]
