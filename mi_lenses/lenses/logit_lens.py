"""The logit lens (nostalgebraist 2020) of a prompt or a cache: every residual row decoded as if it were the last.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is", targets=" Paris", top_k=3)
    >>> res.labels[0], res.labels[-1], tuple(res.top_ids.shape)   # rows x prompts x positions x k
    ('embed', 'final', (4, 1, 6, 3))
    >>> logits = model(model.to_tokens("The capital of France is")).detach()
    >>> bool(torch.equal(res.top_ids[-1, 0], logits[0].topk(3).indices))   # the final row: the model's own top 3
    True
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
    prompt: PromptInput | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    options: LensOptions | None = None,
) -> LensResult:
    """The logit lens of ``prompt`` (or of a ``cache`` you already have): every option as
    :func:`~mi_lenses.lenses.engine.run_lens`.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        prompt: a prompt, a list of prompts (right-padded; padding is masked out), or token ids ``[batch, pos]``.
            With ``cache`` it supplies the token strings and next tokens only; no forward pass is run.
        cache: an ``ActivationCache`` holding the residual hooks, instead of a forward pass.
        logits: the output of the run that ``cache`` holds; it enables ``verify()``.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right).
        options: a :class:`~mi_lenses.lenses.options.LensOptions` record. Its fields (``layers``, ``positions``,
            ``top_k``, ``targets``, ...) are also keyword options here that override it: see ``LensOptions`` and
            :func:`~mi_lenses.lenses.engine.run_lens` for each.

    Returns:
        :class:`~mi_lenses.lenses.result.LensResult`.
    """
    return run_lens(LogitLens(), model, prompt, cache=cache, logits=logits, attention_mask=attention_mask,
                    options=options)
