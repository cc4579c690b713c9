"""Model loading and the ModelView adapter."""

from mi_lenses.models.loading import ModelLoadError, cache_root, embedded_gguf_path, load_model
from mi_lenses.models.view import LensInputError, ModelView, ResidualRow

__all__ = ["ModelLoadError", "LensInputError", "ModelView", "ResidualRow", "cache_root", "embedded_gguf_path",
           "load_model"]
