"""The tuned lens: per-layer affine translators trained so each layer's decode matches the model's output.

Example (on the embedded model; a few minutes on a CPU)::

    lens = mi_lenses.train_lens(model, "corpus.txt", out="smol_lens")
    mi_lenses.evaluate_lens(lens, model, "held_out.txt").print()
    mi_lenses.tuned_lens(model, "The capital of France is", lens="smol_lens").print()
"""

from mi_lenses.lenses.tuned.evaluate import LensEvaluation, evaluate_lens
from mi_lenses.lenses.tuned.lens import TunedLens, tuned_lens
from mi_lenses.lenses.tuned.train import TrainConfig, TrainingError, train_lens

__all__ = ["LensEvaluation", "TrainConfig", "TrainingError", "TunedLens", "evaluate_lens", "train_lens",
           "tuned_lens"]
