"""Attention on a model the user has hooked: heads whose pattern the queries and keys no longer reproduce.

The patterns (and the queries and keys) are the hooked model's own. A hook on ``hook_pattern`` or
``hook_attn_scores`` makes ``softmax(scale * q · k)`` differ from the pattern the head used: that head's q·k terms
(the neuron view) are reported unavailable, with the reason, instead of failing ``AttentionResult.verify``; every
diagnostic (sink, entropy, previous-token, induction) is computed from the hooked patterns as usual.

Example:
    >>> def uniform(p, hook):
    ...     return torch.tril(torch.ones_like(p)) / torch.tril(torch.ones_like(p)).sum(-1, keepdim=True)
    >>> with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
    ...     att = mi_lenses.attention(model, "The capital of France is", induction_length=0)
    >>> sorted(att.qk_unavailable)[:2], bool(torch.isnan(att.q[0, 0]).any())
    (['L0H0', 'L0H1'], True)
"""

from __future__ import annotations

import torch

from mi_lenses.attn.scores import probabilities, row_scores


def unreproduced_heads(parts, lengths: list[int], layers: list[int], hooked: list[str], atol: float) -> dict[str, str]:
    """Heads (``"L{l}H{h}"`` -> reason) whose pattern ``softmax(scale * q · k)`` does not reproduce within ``atol``
    (``AttentionResult.verify``'s tolerance for the model's dtype); their queries become NaN in ``parts`` (and their
    layer's score check, unchecked)."""
    if parts.q is None or parts.k is None:
        return {}
    names = {entry.split(" ")[0] for entry in hooked}
    out: dict[str, str] = {}
    for i, l in enumerate(layers):
        for b, n in enumerate(lengths):
            first, w = parts.rows(b, n)
            s = row_scores(parts.q[b, i, :w], parts.k[b, i], parts.scales[i], first, n, parts.masks[i])
            err = (probabilities(s, parts.masks[i])[0] - parts.patterns[b, i, :, :w, :n]).abs().amax((-1, -2))
            for h in torch.nonzero(err > atol)[:, 0].tolist():
                parts.q[b, i, :, h] = float("nan")
                parts.score_error[i] = float("nan")
                where = [n_ for n_ in names if n_.startswith(f"blocks.{l}.attn.hook_") and
                         n_.endswith(("pattern", "attn_scores"))]
                out[f"L{l}H{h}"] = (f"{'your hook on ' + where[0] if where else 'one of your hooks'} changed this "
                                    "head's attention, so scale * q · k no longer gives its pattern: the pattern and "
                                    "its diagnostics are the hooked model's, the q·k terms are not defined")
    return out
