"""Patchscopes (Ghandeharioun et al. 2024): inspect a hidden state by patching it into a target prompt, position,
layer and model, then reading the next token or generating.

Example::

    import mi_lenses
    from mi_lenses.patchscopes import Source, patchscope, presets, sweep
    model = mi_lenses.load_model()
    res = patchscope(model, Source("Diana, Princess of Wales", layer=[3, 9, 15]), presets.description())
    res.print(); res.to_html("patchscope.html")
    sw = sweep(model, "The Eiffel Tower is in Paris", presets.identity(), target_layers="same")
"""

from mi_lenses.patchscopes import presets
from mi_lenses.patchscopes.maps import AffineMap, fit, fit_map, paired_states
from mi_lenses.patchscopes.result import PatchscopeResult, SweepResult
from mi_lenses.patchscopes.run import patchscope, verify
from mi_lenses.patchscopes.spec import IDENTITY_PROMPT, Source, Target
from mi_lenses.patchscopes.sweep import sweep

__all__ = [
    "AffineMap",
    "IDENTITY_PROMPT",
    "PatchscopeResult",
    "Source",
    "SweepResult",
    "Target",
    "fit",
    "fit_map",
    "paired_states",
    "patchscope",
    "presets",
    "sweep",
    "verify",
]
