"""Lenses: decode the residual stream at every layer (the protocol, the options, the engine and each lens)."""

from mi_lenses.lenses.engine import run_lens
from mi_lenses.lenses.lens import Lens, LogitLens, lens_by_name, register_lens
from mi_lenses.lenses.logit_lens import logit_lens
from mi_lenses.lenses.options import LensOptions
from mi_lenses.lenses.result import LensResult

__all__ = ["Lens", "LensOptions", "LensResult", "LogitLens", "lens_by_name", "logit_lens", "register_lens",
           "run_lens"]
