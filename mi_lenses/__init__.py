"""mi_lenses: lens-style interpretability for TransformerLens models.

Example::

    import mi_lenses
    model = mi_lenses.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    res = mi_lenses.logit_lens(model, "The capital of France is")
    res.print(); res.to_html("logit_lens.html")
"""

from mi_lenses.lenses import Lens, LensResult, LogitLens, VerificationError, logit_lens, run_lens
from mi_lenses.models import LensInputError, ModelLoadError, ModelView, load_model

__version__ = "0.1.0"
__all__ = [
    "Lens",
    "LensInputError",
    "LensResult",
    "LogitLens",
    "ModelLoadError",
    "ModelView",
    "VerificationError",
    "load_model",
    "logit_lens",
    "run_lens",
]
