"""mi_lenses: lens-style interpretability for TransformerLens models.

Example::

    import mi_lenses
    model = mi_lenses.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    res = mi_lenses.logit_lens(model, "The capital of France is")
    res.print(); res.to_html("logit_lens.html")
    dla = mi_lenses.direct_logit_attribution(model, "When Mary and John went to the store, John gave a drink to",
                                             answer=" Mary", wrong=" John")
    dla.top(5)
    ps = mi_lenses.patchscopes.patchscope(model, mi_lenses.patchscopes.Source("Diana, Princess of Wales", layer=8),
                                          mi_lenses.patchscopes.presets.description(), max_new_tokens=8)
"""

from mi_lenses import patchscopes
from mi_lenses.attribution import DLAResult, direct_logit_attribution, neuron_attribution
from mi_lenses.lenses import Lens, LensResult, LogitLens, VerificationError, logit_lens, run_lens
from mi_lenses.lenses.tuned import LensEvaluation, TunedLens, evaluate_lens, load_lens, train_lens
from mi_lenses.models import LensInputError, ModelLoadError, ModelView, load_model

__version__ = "0.1.0"
__all__ = [
    "DLAResult",
    "Lens",
    "LensEvaluation",
    "LensInputError",
    "LensResult",
    "LogitLens",
    "ModelLoadError",
    "ModelView",
    "TunedLens",
    "VerificationError",
    "direct_logit_attribution",
    "evaluate_lens",
    "load_lens",
    "load_model",
    "logit_lens",
    "neuron_attribution",
    "patchscopes",
    "run_lens",
    "train_lens",
]
