"""Circuit analysis: activation patching (exact, attribution, EAP-IG), edge attribution, circuits and their
faithfulness, and path patching, on the model as the user has hooked it.

One concept per module: :mod:`~mi_lenses.patching.options` (every entry point's options, written once),
:mod:`~mi_lenses.patching.experiment` (the experiment every engine takes), :mod:`~mi_lenses.patching.sites` (what is
patched, the grid), :mod:`~mi_lenses.patching.pair` (the clean and corrupted runs), :mod:`~mi_lenses.patching.metric`,
:mod:`~mi_lenses.patching.replay` (the batched forward passes), the engines :mod:`~mi_lenses.patching.exact`,
:mod:`~mi_lenses.patching.gradients` (attribution, EAP-IG), :mod:`~mi_lenses.patching.edges` (edge attribution) and
:mod:`~mi_lenses.patching.paths` (path patching), :mod:`~mi_lenses.patching.graph` (writers and readers),
:mod:`~mi_lenses.patching.circuits` (faithfulness), :mod:`~mi_lenses.patching.result`, and
:func:`activation_patching` (:mod:`~mi_lenses.patching.activation`).

Example: the whole residual stream entering block 0 carries everything the prompt says, so denoising it gives the
clean run and noising it the corrupted one.

    >>> kw = dict(answer=" Paris", wrong=" city", what="resid_pre", by="layer", layers=[0])
    >>> clean = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is", **kw)
    >>> noised = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                        mode="noise", **kw)
    >>> abs(float(clean.values[0]) - 1.0) < 1e-5, abs(float(noised.values[0])) < 1e-5   # float32 rounding only
    (True, True)
"""

from mi_lenses.patching.activation import activation_patching
from mi_lenses.patching.circuits import faithfulness
from mi_lenses.patching.edges import edge_attribution
from mi_lenses.patching.metric import Metric
from mi_lenses.patching.options import ActivationOptions, EdgeOptions, PairOptions, PathOptions
from mi_lenses.patching.paths import path_patching
from mi_lenses.patching.result import Circuit, EdgeAttribution, PatchingResult
from mi_lenses.patching.sites import Site, resolve_site

__all__ = ["ActivationOptions", "Circuit", "EdgeAttribution", "EdgeOptions", "Metric", "PairOptions",
           "PathOptions", "PatchingResult", "Site", "activation_patching", "edge_attribution", "faithfulness",
           "path_patching", "resolve_site"]
