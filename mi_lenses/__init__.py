"""mi_lenses: lens-style interpretability for TransformerLens models.

Example::

    import mi_lenses
    model = mi_lenses.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    res = mi_lenses.logit_lens(model, "The capital of France is")
    res.print(); res.to_html("logit_lens.html")
    dla = mi_lenses.direct_logit_attribution(model, "When Mary and John went to the store, John gave a drink to",
                                             answer=" Mary", wrong=" John")
    dla.top(5)
"""

from mi_lenses.attribution import DLAResult, direct_logit_attribution, neuron_attribution
from mi_lenses.lenses import Lens, LensResult, LogitLens, VerificationError, logit_lens, run_lens
from mi_lenses.models import LensInputError, ModelLoadError, ModelView, load_model

__version__ = "0.1.0"
__all__ = [
    "DLAResult",
    "Lens",
    "LensInputError",
    "LensResult",
    "LogitLens",
    "ModelLoadError",
    "ModelView",
    "VerificationError",
    "direct_logit_attribution",
    "load_model",
    "logit_lens",
    "neuron_attribution",
    "run_lens",
]
