"""Direct logit attribution (DLA): the engine.

The final residual stream is a sum of what every component wrote: the embeddings, every attention head
(``z @ W_O[h]``) plus each layer's output bias ``b_O``, and every MLP (``post @ W_out + b_out``, itself a sum over
neurons). With the final norm's scale frozen from the run the logit is linear in the residual stream, so each
component's *direct* effect is its output dotted with the effective direction ``d'`` (see
:mod:`mi_lenses.attribution.directions`), and the parts add up to the model's own logit (difference) up to the
constants no component produces (``b_U`` and the final LayerNorm's bias).

Example::

    import mi_lenses
    model = mi_lenses.load_model()
    res = mi_lenses.direct_logit_attribution(
        model, "When Mary and John went to the store, John gave a drink to", answer=" Mary", wrong=" John")
    res.verify()           # parts sum to the model's logit difference; sources sum to heads; neurons to MLPs
    res.top(5)             # [('L..H..', value), ...]
    res.to_html("dla.html")
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from mi_lenses.attribution.directions import (
    Direction,
    TokenSpec,
    effective_directions,
    model_value,
    resolve_direction,
)
from mi_lenses.attribution.result import DLAResult
from mi_lenses.attribution.sources import source_attribution
from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView


def required_hooks(model: Any) -> list[str]:
    """Every hook a direct logit attribution reads (pass it as ``names_filter`` to keep a cache small)."""
    view = ModelView(model)
    names = [hook for _, hook in view.embed_hooks]
    for l in range(view.n_layers):
        names += [view.attn_hook(l, name) for name in ("z", "pattern", "v")] + [view.out_hook(l, "attn")]
        if view.has_mlp:
            names += [view.mlp_hook(l, "post"), view.out_hook(l, "mlp")]
    names.append(view.final_resid_hook)
    return names


def direct_logit_attribution(
    model: Any,
    input: str | Sequence[str] | Tensor | None = None,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    direction: Tensor | None = None,
    position: int = -1,
    cache: Any = None,
    logits: Tensor | None = None,
    prepend_bos: bool | None = None,
    through_final_norm: bool = True,
    check: bool = True,
) -> DLAResult:
    """Attribute a logit, a logit difference or a direction to every embedding, head, MLP, neuron and source position.

    Args:
        model: a TransformerLens model (raw ``TransformerBridge``, compatibility mode, or ``HookedTransformer``).
        input: a prompt, a list of prompts (right-padded; ``position`` counts within each prompt), or tokens
            ``[batch, pos]``. With ``cache`` it only supplies the token strings (optional).
        answer: the token whose logit is attributed: a string that is exactly one token, an id, or one per prompt.
        wrong: optional token(s) subtracted: the attributed quantity is ``logit[answer] - logit[wrong]``.
        direction: instead of tokens, a ``[d_model]`` or ``[batch, d_model]`` vector read through the final norm like
            a column of ``W_U`` (``through_final_norm=False``: a plain residual projection).
        position: the position attributed, per prompt (default ``-1``, each prompt's last token).
        cache: an ``ActivationCache`` with the hooks of :func:`required_hooks`; with ``logits`` (that run's output)
            the result is checked against the model's own logits, else ``actual`` is computed from the final
            residual stream.
        check: run ``verify()`` when the model's logits are known (always, unless you pass ``False``).

    Returns:
        :class:`~mi_lenses.attribution.result.DLAResult`.

    The final norm's scale is frozen from the run (the standard DLA linearisation). On a raw bridge the final norm's
    gain (and a LayerNorm's bias, into the constants) is applied here, so raw and compatibility-mode models give the
    same head and MLP values up to TransformerLens's weight processing.
    """
    view = ModelView(model)
    if not isinstance(position, int) or isinstance(position, bool):
        raise LensInputError(f"position must be an int (negative counts from each prompt's end), got {position!r}.")
    if input is None and cache is None:
        raise LensInputError("pass a prompt, a list of prompts, tokens, or cache=ActivationCache.")
    tokens = view.to_tokens(input, prepend_bos) if input is not None else None

    names = required_hooks(view)
    if cache is None:
        wanted = set(names)
        with torch.no_grad():
            logits, cache = view.model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    missing = [n for n in names if n not in _keys(cache)]
    if missing:
        raise LensInputError(
            f"the cache lacks {len(missing)} hook(s) DLA needs, e.g. {missing[:3]}: run model.run_with_cache(tokens) "
            "without a names_filter (or with mi_lenses.attribution.required_hooks(model)), or pass the prompt instead."
        )
    resid_all = cache[view.final_resid_hook]
    if resid_all.ndim != 3:
        raise LensInputError(f"expected a cache with a batch dimension ([batch, pos, d_model]), got "
                             f"{tuple(resid_all.shape)}.")
    B, S, _ = resid_all.shape
    if tokens is not None and tuple(tokens.shape) != (B, S):
        raise LensInputError(f"tokens {tuple(tokens.shape)} do not match the cache's [batch, pos] = {(B, S)}.")
    if tokens is not None and isinstance(input, (list, tuple)) and all(isinstance(p, str) for p in input):
        lengths = view.token_lengths(input, tokens, prepend_bos)
    else:
        lengths = [S] * B
    pos = _resolve_positions(position, lengths)
    rows = torch.arange(B)

    dirn = resolve_direction(view, B, answer, wrong, direction, through_final_norm)
    dev = resid_all.device
    with torch.no_grad():
        pos_list = pos.tolist()

        def at(t: Tensor) -> Tensor:  # [B, S, ...] -> [B, ...] at each row's position (basic indexing: fast)
            return torch.stack([t[b, p] for b, p in enumerate(pos_list)]).float()

        resid = at(resid_all)  # [B, d_model]
        d_eff, scale = effective_directions(view, dirn, resid)  # [B, d_model], [B]

        def proj(hook: str) -> Tensor:
            return (at(cache[hook]) * d_eff).sum(-1).cpu()

        embed = torch.stack([proj(hook) for _, hook in view.embed_hooks], -1)  # [B, E]
        L, H = view.n_layers, view.n_heads
        heads = torch.zeros(B, L, H)
        attn_bias = torch.zeros(B, L)
        attn_out = torch.zeros(B, L)
        mlps = torch.zeros(B, L)
        mlp_bias = torch.zeros(B, L)
        neurons = torch.zeros(B, L, view.d_mlp)
        sources = torch.zeros(B, L, H, S)
        has_b_O = has_b_out = False
        for l in range(L):
            z = at(cache[view.attn_hook(l, "z")])  # [B, H, d_head]
            wod = torch.einsum("hdm,bm->bhd", view.W_O(l).to(dev), d_eff)  # W_O[h] @ d'
            heads[:, l] = (z * wod).sum(-1).cpu()
            b_O = view.b_O(l)
            if b_O is not None:
                has_b_O = True
                attn_bias[:, l] = (d_eff @ b_O.to(dev)).cpu()
            attn_out[:, l] = proj(view.out_hook(l, "attn"))
            sources[:, l] = source_attribution(view, cache, l, pos, wod).cpu()
            if view.has_mlp:
                mlps[:, l] = proj(view.out_hook(l, "mlp"))
                post = at(cache[view.mlp_hook(l, "post")])  # [B, d_mlp]
                neurons[:, l] = (post * (d_eff @ view.W_out(l).to(dev).T)).cpu()
                b_out = view.b_out(l)
                if b_out is not None:
                    has_b_out = True
                    mlp_bias[:, l] = (d_eff @ b_out.to(dev)).cpu()
        actual, actual_source = model_value(view, dirn, logits, resid, rows, pos)

    tokens_cpu = tokens.cpu() if tokens is not None else None
    str_tokens = _str_tokens(view, tokens_cpu, lengths)
    result = DLAResult(
        model_name=view.name,
        direction=dirn.label,
        answer=dirn.answer_strs,
        wrong=dirn.wrong_strs,
        str_tokens=str_tokens,
        positions=pos.tolist(),
        embed_labels=[label for label, _ in view.embed_hooks],
        embed=embed,
        heads=heads,
        attn_bias=attn_bias if has_b_O else None,
        mlps=mlps if view.has_mlp else None,
        mlp_bias=mlp_bias if has_b_out else None,
        neurons=neurons,
        sources=sources,
        constants={k: v.detach().float().cpu() for k, v in dirn.constants.items()},
        actual=actual,
        actual_source=actual_source,
        attn_out=attn_out,
        scale=scale.cpu(),
        raw_bridge=view.is_bridge and not view.is_compat,
    )
    if check and actual_source == "logits":
        result.verify()
    return result


def _keys(cache: Any) -> set[str]:
    keys = cache.keys() if hasattr(cache, "keys") else []
    return set(keys)


def _resolve_positions(position: int, lengths: list[int]) -> Tensor:
    out = []
    for b, n in enumerate(lengths):
        p = position if position >= 0 else n + position
        if not 0 <= p < n:
            raise LensInputError(
                f"position {position} is out of range for prompt {b}, which has {n} tokens: use 0..{n - 1}, or "
                f"-1..-{n} from the end."
            )
        out.append(p)
    return torch.tensor(out, dtype=torch.long)


def _str_tokens(view: ModelView, tokens: Tensor | None, lengths: list[int]) -> list[list[str]]:
    if tokens is None:
        return [[f"[{i}]" for i in range(n)] for n in lengths]
    vocab = view.id_to_str_map(tokens)
    return [[vocab[t] for t in row[:n]] for row, n in zip(tokens.tolist(), lengths)]


# Short alias.
dla = direct_logit_attribution
__all__ = ["Direction", "direct_logit_attribution", "dla", "required_hooks"]
