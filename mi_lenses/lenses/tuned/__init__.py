"""The tuned lens: per-layer affine translators trained so each layer's decode matches the model's output.

Example::

    import mi_lenses
    from mi_lenses.lenses.tuned import TunedLens, train_lens, evaluate_lens, load_lens
    model = mi_lenses.load_model()
    lens = train_lens(model, "../shared/data/wikitext-2/valid.txt", out="smol_lens")   # ~8 min on 2 CPU cores
    evaluate_lens(lens, model, "../shared/data/wikitext-2/test.txt").show()
    lens(model, "The capital of France is").print()
"""

from mi_lenses.lenses.tuned.evaluate import LensEvaluation, evaluate_lens
from mi_lenses.lenses.tuned.io import load_lens, save_lens
from mi_lenses.lenses.tuned.lens import TunedLens
from mi_lenses.lenses.tuned.train import TrainConfig, TrainingError, train_lens

__all__ = [
    "LensEvaluation",
    "TrainConfig",
    "TrainingError",
    "TunedLens",
    "evaluate_lens",
    "load_lens",
    "save_lens",
    "train_lens",
]
