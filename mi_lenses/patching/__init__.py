"""Circuit analysis: activation patching (exact, attribution, EAP-IG), edge attribution, circuits and their
faithfulness, and path patching, on the model as the user has hooked it.

One concept per module: :mod:`~mi_lenses.patching.sites` (what is patched, the grid), :mod:`~mi_lenses.patching.pair`
(the clean and corrupted runs), :mod:`~mi_lenses.patching.metric`, :mod:`~mi_lenses.patching.replay` (the batched
forward passes), :mod:`~mi_lenses.patching.exact`, :mod:`~mi_lenses.patching.gradients` (attribution, EAP-IG),
:mod:`~mi_lenses.patching.graph` (writers and readers), :mod:`~mi_lenses.patching.edges` (edge attribution),
:mod:`~mi_lenses.patching.circuits` (faithfulness), :mod:`~mi_lenses.patching.paths` (path patching),
:mod:`~mi_lenses.patching.result`, and
:func:`activation_patching` (:mod:`~mi_lenses.patching.activation`).

Example:
    >>> res = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                     answer=" Paris", wrong=" city")
    >>> res.grid_axes, res.direction
    (['layer', 'pos'], 'denoise')
"""

from mi_lenses.patching.activation import activation_patching
from mi_lenses.patching.circuits import faithfulness
from mi_lenses.patching.edges import edge_attribution
from mi_lenses.patching.metric import Metric
from mi_lenses.patching.paths import path_patching
from mi_lenses.patching.result import Circuit, EdgeAttribution, PatchingResult
from mi_lenses.patching.sites import Site, resolve_site

__all__ = ["Circuit", "EdgeAttribution", "Metric", "PatchingResult", "Site", "activation_patching",
           "edge_attribution", "faithfulness", "path_patching", "resolve_site"]
