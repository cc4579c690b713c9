"""Attention patterns, per-head diagnostics (attention sinks, entropy, previous-token and induction scores) and the
``q · k`` terms behind every score, with head, model and neuron views (see :mod:`mi_lenses.attn.engine`)."""

from mi_lenses.attn.engine import attention, required_hooks
from mi_lenses.attn.result import AttentionResult, QKTerms

__all__ = ["AttentionResult", "QKTerms", "attention", "required_hooks"]
