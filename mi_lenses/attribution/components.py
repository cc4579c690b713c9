"""Direct logit attribution (DLA): the engine.

The final residual stream is a sum of what every component wrote: the embeddings, every attention head
(``z @ W_O[h]``) plus each layer's output bias ``b_O``, and every MLP (``post @ W_out + b_out``, itself a sum over
neurons). With the final norm's scale frozen from the run the logit is linear in the residual stream, so each
component's *direct* effect is its output dotted with the effective direction ``d'`` (see
:mod:`mi_lenses.attribution.directions`), and the parts add up to the model's own logit (difference) up to the
constants no component produces (``b_U`` and the final LayerNorm's bias).

The same convention holds for every other norm between a component and the logit: each is linearised with its scale
frozen from the run (:func:`~mi_lenses.attribution.directions.write_directions`). A head of Gemma 2/3 or OLMo 2
writes ``post_attention_layernorm(Σ heads)``, so its part is ``(gain ⊙ z_h W_O[h] / s) · d'`` with ``s`` the
post-norm's scale at that position; OPT-350m's post-LN residual norms carry ``d'`` back to everything written before
them (their biases are constants ``L{l}.ln1.b``); Granite's residual multiplier scales heads, MLPs and neurons where
the block applies it. A mixture-of-experts MLP is what the block writes, split per expert (router weight × expert
output, the shared expert times its gate) in ``experts`` and per expert neuron in ``neurons``. So the parts still sum
exactly to the logit on every architecture.

The engine runs in four steps: **prepare** (the batch and the positions, checked before any forward pass), **forward**
(one pass caching :func:`required_hooks`, or your cache), **reduce** (every component dotted with the direction) and
**assemble** (a :class:`~mi_lenses.attribution.result.DLAResult`, verified against the model's own logits).

Example:
    >>> res = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> _ = res.verify()     # parts sum to the model's logit; sources sum to heads; neurons to MLPs
    >>> abs(float(res.total[0] - res.actual[0])) < 1e-3
    True
    >>> (label, value), = res.top(1, kinds="head", batch=0)     # the head with the largest direct effect
    >>> l, h = map(int, label[1:].split("H")); abs(value - float(res.heads[0, l, h])) < 1e-6
    True
    >>> bool(torch.allclose(res.heads.sum(-1) + (0 if res.attn_bias is None else res.attn_bias), res.attn_out,
    ...                     atol=1e-4))                     # the heads of a layer sum to its attention output
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.attribution.directions import (
    Direction,
    TokenSpec,
    effective_directions,
    model_value,
    resolve_direction,
    write_directions,
    write_hooks,
)
from mi_lenses.attribution.interventions import find_edits, intervention_hooks, plain_residual
from mi_lenses.attribution.result import DLAResult
from mi_lenses.attribution.sources import pattern_rows_kept, source_attribution
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.indexing import resolve_positions
from mi_lenses.models.batch import Batch, Cached, PromptInput, cached_forward, make_batch
from mi_lenses.models.gaps import refuse
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.progress import bar


def required_hooks(model: Any) -> list[str]:
    """Every hook a direct logit attribution reads (pass it as ``names_filter`` to keep a cache small)."""
    view = ModelView(model)
    names = [hook for _, hook in view.embed_hooks]
    for l in range(view.n_layers):
        lay = view.layout(l)
        if lay.heads:
            names += [view.attn_hook(l, name) for name in ("z", "pattern", "v", "q_gate")
                      if name != "q_gate" or getattr(view.cfg, "gated_q_proj", False)]
            names += [view.output_gate(l)[0]] if view.output_gate(l) else []  # type: ignore[index]
        if view.has_mlp and lay.mlp:
            names += list(view.neurons(l).hooks)
    names += write_hooks(view)
    names.append(view.final_resid_hook)
    return list(dict.fromkeys(names))


def direct_logit_attribution(
    model: Any,
    prompt: PromptInput | None = None,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    direction: Tensor | None = None,
    position: int = -1,
    cache: Any = None,
    logits: Tensor | None = None,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    through_final_norm: bool = True,
    beyond_context: bool = False,
    progress: bool = True,
    check: bool = True,
) -> DLAResult:
    """Attribute a logit, a logit difference or a direction to every embedding, head, MLP, neuron and source position.

    Args:
        model: a TransformerLens model (raw ``TransformerBridge``, compatibility mode, or ``HookedTransformer``).
        prompt: a prompt, a list of prompts (right-padded; ``position`` counts within each prompt), or token ids
            ``[batch, pos]`` (with ``attention_mask`` when padded). With ``cache`` it only supplies the token strings.
        answer: the token whose logit is attributed: a string that is exactly one token, an id, or one per prompt.
        wrong: optional token(s) subtracted: the attributed quantity is ``logit[answer] - logit[wrong]``.
        direction: instead of tokens, a ``[d_model]`` or ``[batch, d_model]`` vector read through the final norm like
            a column of ``W_U`` (``through_final_norm=False``: a plain residual projection).
        position: the position attributed, counted in each prompt's own tokens (default ``-1``: its last token).
        cache: an ``ActivationCache`` with the hooks of :func:`required_hooks`; with ``logits`` (that run's output)
            the result is checked against the model's own logits, else ``actual`` is computed from the final
            residual stream.
        attention_mask: with token ids: 1 on real tokens, 0 on padding (left or right).
        prepend_bos: add the BOS token when tokenising text prompts (default: the model's setting).
        beyond_context: accept prompts longer than the model's context (``cfg.n_ctx``).
        progress: show a bar over the layers when the attribution takes more than a couple of seconds.
        check: run ``verify()`` when the model's logits are known (always, unless you pass ``False``).

    Returns:
        :class:`~mi_lenses.attribution.result.DLAResult`.

    The final norm's scale is frozen from the run (the standard DLA linearisation). On a raw bridge the final norm's
    gain (and a LayerNorm's bias, into the constants) is applied here, so raw and compatibility-mode models give the
    same head and MLP values up to TransformerLens's weight processing (in compatibility mode each head's value bias
    moves into its layer's ``b_O``). Every norm after a component (sublayer post-norms, post-LN residual norms) is
    linearised the same way, with its scale frozen from the run, so the parts sum exactly to the logit (see the
    module docstring and ``docs/dla.md``).

    Under your own hooks (``with model.hooks(...)``, ``model.add_hook``) every value is the hooked model's; what a
    hook changed between the cached states is a part of its own (``res.interventions``, see
    :mod:`mi_lenses.attribution.interventions`) and the hooks are listed in ``res.active_hooks``.
    """
    view = ModelView(model)
    refuse(view.model, "dla", "direct logit attribution")
    hooks = active_hooks(view.model)
    if not isinstance(position, int) or isinstance(position, bool):
        raise LensInputError(f"position must be an int (negative counts from each prompt's end), got {position!r}.")
    # our own forward pass keeps each pattern only at the attributed positions (sources.pattern_rows_kept)
    batch = None if prompt is None else make_batch(view, prompt, prepend_bos=prepend_bos, attention_mask=attention_mask,
                                                  beyond_context=beyond_context)
    patterns = {view.attn_hook(l, "pattern") for l in view.attn_layers}
    required = [name for name in required_hooks(view) if name not in patterns]
    names = required + (intervention_hooks(view) if hooks else [])
    reduce = [] if cache is not None or batch is None else pattern_rows_kept(view, _positions(batch, position))
    run = cached_forward(view, batch, names=names, required=required, what="direct logit attribution",
                         cache=cache, logits=logits, attention_mask=attention_mask, shape_hook=view.final_resid_hook,
                         hint=" (or with mi_lenses.attribution.required_hooks(model))", progress=progress,
                         reduce=reduce)
    batch, cache, logits = run.batch, run, run.logits
    pos = _positions(batch, position)
    dirn = resolve_direction(view, batch.shape[0], answer, wrong, direction, through_final_norm)
    parts = _reduce(view, cache, dirn, pos, progress)
    edits = find_edits(view, cache, parts, dirn, pos, hooks) if hooks else None
    actual, actual_source = model_value(view, dirn, logits, parts.resid, torch.arange(batch.shape[0]), pos)
    result = DLAResult(
        model_name=view.name,
        metric=dirn.label,
        answer=dirn.answer_strs,
        wrong=dirn.wrong_strs,
        str_tokens=view.str_tokens(batch, known=prompt is not None),
        positions=(pos - torch.tensor(batch.offsets)).tolist(),
        embed_labels=[label for label, _ in view.embed_hooks],
        embed=parts.embed,
        heads=parts.heads,
        attn_bias=parts.attn_bias,
        mlps=parts.mlps,
        mlp_bias=parts.mlp_bias,
        neurons=parts.neurons,
        sources=batch.own_positions(parts.sources, dims=(-1,), fill=0.0),  # padding stays zero
        constants={**{k: v.detach().float().cpu() for k, v in dirn.constants.items()}, **parts.constants},
        actual=actual,
        actual_source=actual_source,
        attn_out=parts.attn_out,
        mixers=parts.mixers,
        mixer_kinds=parts.mixer_kinds,
        scale=parts.scale.cpu(),
        raw_bridge=view.is_bridge and not view.is_compat,
        experts=parts.experts,
        expert_names=parts.expert_names,
        neuron_names=parts.neuron_names,
        notes=parts.notes,
        interventions=edits.values if edits else {},
        sources_unavailable=edits.unavailable if edits else {},
        model_dtype=str(view.dtype).replace("torch.", ""),
    )
    if edits is not None and not plain_residual(view) and actual_source == "logits":
        _check_separable(result, hooks)
    if check and actual_source == "logits":
        result.verify()
    return recorded(result, hooks)


def _positions(batch: Batch, position: int) -> Int[Tensor, " B"]:
    """The padded-sequence index of the attributed ``position`` in each prompt."""
    return resolve_positions([position], batch.lengths, batch.offsets, every_prompt=True).index[:, 0]


def _check_separable(result: DLAResult, hooks: list[str]) -> None:
    """On a model whose blocks normalise or scale what they add (post-norms, residual multipliers, post-LN), an edit
    of the user's at a sublayer output or in the residual stream cannot be separated from the parts (the stream is not
    their plain sum): refuse clearly rather than return parts that do not add up (also with ``check=False``)."""
    try:
        result.verify()
    except VerificationError as err:
        raise LensInputError(
            f"direct logit attribution cannot separate what your hooks ({', '.join(hooks)}) changed on this model: "
            "its blocks normalise or scale their outputs before adding them to the residual stream (post-norms, "
            "residual multipliers), so an edit at hook_attn_out, hook_mlp_out or a residual point is not a part of "
            "its own. Hooks inside the sublayers (attn.hook_z, attn.hook_pattern, mlp.hook_post, ...) are "
            f"attributed exactly here; move the intervention there. ({err})") from None


# ------------------------------------------------------------------------------------------------ reduce
@dataclass
class _Parts:
    resid: Float[Tensor, "B d_model"]
    scale: Float[Tensor, " B"]
    embed: Float[Tensor, "B E"]
    heads: Float[Tensor, "B L H"]
    attn_bias: Float[Tensor, "B L"] | None
    attn_out: Float[Tensor, "B L"]
    mlps: Float[Tensor, "B L"] | None
    mlp_bias: Float[Tensor, "B L"] | None
    neurons: Float[Tensor, "B L N"]
    sources: Float[Tensor, "B L H S"]
    constants: dict[str, Tensor]
    experts: Float[Tensor, "B L X"] | None
    expert_names: list[str]
    neuron_names: list[str] | None
    notes: list[str]
    mixers: Float[Tensor, "B L"] | None = None
    mixer_kinds: list[str] | None = None


@torch.no_grad()
def _reduce(view: ModelView, cache: Cached, dirn: Direction, pos: Tensor, progress: bool) -> _Parts:
    """Every component's output at each row's position, dotted with the row's direction carried to where the
    component writes (:func:`~mi_lenses.attribution.directions.write_directions`)."""
    pos_list = pos.tolist()

    def at(t: Tensor) -> Tensor:  # [B, S, ...] -> [B, ...] at each row's position (basic indexing: fast)
        return torch.stack([t[b, p] for b, p in enumerate(pos_list)]).float()

    resid = at(cache[view.final_resid_hook])
    d_eff, scale = effective_directions(view, dirn, resid)  # [B, d_model], [B]
    dev = resid.device
    dirs = write_directions(view, d_eff, cache, at)

    def proj(hook: str, d: Tensor) -> Tensor:
        return (at(cache[hook]) * d).sum(-1).cpu()

    B, S = resid.shape[0], cache[view.final_resid_hook].shape[1]
    L, H, N = view.n_layers, view.n_heads, view.d_mlp
    heads, attn_bias, attn_out = torch.zeros(B, L, H), torch.zeros(B, L), torch.zeros(B, L)
    mlps, mlp_bias, neurons = torch.zeros(B, L), torch.zeros(B, L), torch.zeros(B, L, N)
    sources = torch.zeros(B, L, H, S)
    has_b_O = has_b_out = False
    groups: dict[str, int] = {}
    expert_vals: dict[tuple[int, str], Tensor] = {}
    neuron_names: list[str] | None = None
    notes: list[str] = []
    mixers, kinds = torch.zeros(B, L), [""] * L
    has_mlp = False

    def span(hooks: tuple[str, str], d: Tensor) -> Tensor:  # what a mixer / whole MLP adds to the stream, on d
        return ((at(cache[hooks[1]]) - at(cache[hooks[0]])) * d).sum(-1).cpu()

    progress_bar = bar(L, "direct logit attribution", unit="layer", enabled=progress)
    for l in range(L):
        lay = view.layout(l)
        if lay.note and lay.note not in notes:
            notes.append(lay.note)
        kinds[l] = "heads" if lay.heads else lay.mixer or ""
        if lay.span is not None:
            mixers[:, l] = span(lay.span, dirs.resid[l])
        if lay.mlp_span is not None:
            has_mlp = True
            mlps[:, l] = span(lay.mlp_span, dirs.resid[l])
        if lay.heads:
            d_attn = dirs.attn[l]
            z = view.split_heads(at(cache[view.attn_hook(l, "z")]))  # [B, H, d_value]
            wod = torch.einsum("hdm,bm->bhd", view.W_O(l).to(dev), d_attn)  # W_O[h] @ d'
            heads[:, l] = (z * wod).sum(-1).cpu()
            b_O = view.b_O(l)
            if b_O is not None:
                has_b_O = True
                attn_bias[:, l] = (d_attn @ b_O.to(dev)).cpu()
            attn_out[:, l] = proj(view.sublayer(l, "attn").out_hook, d_attn)
            sources[:, l] = source_attribution(view, cache, l, pos, wod).cpu()
        if view.has_mlp and lay.mlp:
            has_mlp = True
            d_mlp = dirs.mlp[l]
            mlps[:, l] = proj(view.sublayer(l, "mlp").out_hook, d_mlp)
            nr = view.neurons(l)
            if nr.note and nr.note not in notes:
                notes.append(nr.note)
            if nr.size:
                vals = nr.activations(cache, at) * nr.project(d_mlp).to(dev)  # [B, n]: activation x row · d'
                neurons[:, l, : nr.size] = vals.cpu()
                if nr.names is not None and nr.size == N:
                    neuron_names = list(nr.names)
                for label, sl in nr.groups:
                    groups.setdefault(label, len(groups))
                    expert_vals[(l, label)] = vals[:, sl].sum(-1).cpu()
            if nr.b_out is not None:
                has_b_out = True
                mlp_bias[:, l] = (d_mlp @ nr.b_out.to(dev)).cpu()
        progress_bar.update(1)
    progress_bar.close()
    embed = torch.stack([proj(hook, dirs.embed) for _, hook in view.embed_hooks], -1)  # [B, E]
    experts = None
    if groups:
        experts = torch.zeros(B, L, len(groups))
        for (l, label), v in expert_vals.items():
            experts[:, l, groups[label]] = v
    constants = {k: v.cpu() for k, v in dirs.constants.items()}
    hybrid = any(k != "heads" for k in kinds)
    return _Parts(resid, scale, embed, heads, attn_bias if has_b_O else None, attn_out,
                  mlps if has_mlp else None, mlp_bias if has_b_out else None, neurons, sources, constants,
                  experts, list(groups), neuron_names, notes, mixers if hybrid else None, kinds if hybrid else None)

