"""Model loading and the ModelView adapter (hooks, GQA layout, tokenisation, the batch prelude and the decoder)."""

from mi_lenses.models.loading import cache_root, embedded_gguf_path, load_model
from mi_lenses.models.parity import ParityReport, check_parity, parity_report, skip_parity
from mi_lenses.models.view import ModelView, ResidualRow

__all__ = ["ModelView", "ParityReport", "ResidualRow", "cache_root", "check_parity", "embedded_gguf_path", "load_model",
           "parity_report", "skip_parity"]
