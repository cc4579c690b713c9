"""Patchscopes (Ghandeharioun et al. 2024): inspect a hidden state by patching it into a target prompt, position,
layer and model, then reading the next token or generating.

Example:
    >>> res = patchscope(model, Source("The capital of France is", layers=[0, 1, 2]), presets.attribute("capital"),
    ...                  max_new_tokens=3)
    >>> res.row_labels, len(res.generated)
    (['0', '1', '2'], 3)
    >>> sw = sweep(model, "The capital of France is", presets.identity(), target_layers="same", progress=False)
    >>> sw.prec_at_1_mean.shape, sw.prec_at_1_mean[-1, 0].item()    # the last layer into itself: the prediction
    (torch.Size([3, 1]), 1.0)
"""

from mi_lenses.patchscopes import presets
from mi_lenses.patchscopes.lens import PatchscopeLens
from mi_lenses.patchscopes.maps import AffineMap, fit, fit_map, paired_states
from mi_lenses.patchscopes.result import PatchscopeResult, SweepResult
from mi_lenses.patchscopes.run import patchscope, verify
from mi_lenses.patchscopes.selfie import SelfIEResult, selfie
from mi_lenses.patchscopes.spec import IDENTITY_PROMPT, Source, Target
from mi_lenses.patchscopes.sweep import sweep

__all__ = [
    "AffineMap",
    "IDENTITY_PROMPT",
    "PatchscopeLens",
    "PatchscopeResult",
    "SelfIEResult",
    "Source",
    "SweepResult",
    "Target",
    "fit",
    "fit_map",
    "paired_states",
    "patchscope",
    "presets",
    "selfie",
    "sweep",
    "verify",
]
