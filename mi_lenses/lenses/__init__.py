"""Lenses: decode the residual stream at every layer."""

from mi_lenses.lenses.logit_lens import Lens, LogitLens, logit_lens, run_lens
from mi_lenses.lenses.result import LensResult

__all__ = ["Lens", "LogitLens", "LensResult", "logit_lens", "run_lens"]
