"""The logit lens (nostalgebraist 2020) of a prompt or a cache: every residual row decoded as if it were the last.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is", targets=" Paris", top_k=3)
    >>> res.labels[0], res.labels[-1], tuple(res.top_ids.shape)   # rows x prompts x positions x k
    ('embed', 'final', (4, 1, 6, 3))
    >>> res = mi_lenses.logit_lens(model, ["A city", "The quick brown fox"], positions=[-1])
    >>> res.positions, res.token_index.tolist()     # -1 is each prompt's own last token, not the padding
    ([-1], [[2], [4]])
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mi_lenses.lenses.engine import run_lens
from mi_lenses.lenses.lens import LogitLens
from mi_lenses.lenses.options import LensOptions, with_lens_options
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.batch import PromptInput


@with_lens_options
def logit_lens(
    model: Any,
    input: PromptInput | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    options: LensOptions | None = None,
) -> LensResult:
    """The logit lens of ``input`` (or of a ``cache`` you already have): every option as
    :func:`~mi_lenses.lenses.engine.run_lens`."""
    return run_lens(LogitLens(), model, input, cache=cache, logits=logits, attention_mask=attention_mask,
                    options=options)
