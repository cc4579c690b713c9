"""Directions for attribution: a token's logit, a logit difference, or any vector read through the final norm.

A direction is what a component's output is dotted with. For a token ``a`` the logit is
``ln_final(resid) · W_U[:, a] + b_U[a]``; with the final norm's scale ``s`` frozen from the run, the norm is linear:

    logit_a = resid · d' + const,   d' = centre(g ⊙ W_U[:, a]) / s,   const = β · W_U[:, a] + b_U[a]

where ``g``/``β`` are the final norm's gain and bias (ones/zeros once TransformerLens folded them into ``W_U``) and
``centre`` subtracts the mean over ``d_model`` (LayerNorm only: its mean-centring is linear, so it moves onto the
direction). On a raw bridge the gain is *not* in ``W_U``; it is applied here, so the numbers are right either way.

Example:
    >>> d = resolve_direction(ModelView(model), batch=1, answer=" Paris", wrong=" city")
    >>> W_U, paris, city = ModelView(model).decoder.W, model.to_single_token(" Paris"), model.to_single_token(" city")
    >>> d.label, bool(torch.allclose(d.vectors[0], W_U[:, paris] - W_U[:, city], atol=1e-6))   # W_U's columns
    ("logit[' Paris'] - logit[' city']", True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView

TokenSpec = str | int | Sequence[str | int] | Tensor


@dataclass
class Direction:
    """A per-row direction in the unembedding basis (before the final norm's scale), plus its constant terms.

    ``vectors[b]`` is ``g ⊙ u_b`` (gain applied, not yet centred or scaled); ``constants`` maps a name (``"b_U"``,
    ``"ln_final.b"``) to the per-row constant that no residual component produces.
    """

    label: str
    vectors: Float[Tensor, "B d_model"]
    constants: dict[str, Float[Tensor, " B"]]
    answer_ids: Int[Tensor, " B"] | None = None
    wrong_ids: Int[Tensor, " B"] | None = None
    through_final_norm: bool = True
    answer_strs: list[str] = field(default_factory=list)
    wrong_strs: list[str] = field(default_factory=list)

    @property
    def is_token(self) -> bool:
        return self.answer_ids is not None


def _token_ids(view: ModelView, spec: TokenSpec, batch: int, what: str) -> Tensor:
    """One token id per row: a single token (shared) or one per prompt."""
    if isinstance(spec, Tensor):
        spec = spec.flatten().tolist() if spec.ndim <= 1 else spec
        if isinstance(spec, Tensor):
            raise LensInputError(f"{what} must be one token or a 1-D list of tokens (one per prompt), got shape "
                                 f"{tuple(spec.shape)}.")
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    if not items:
        raise LensInputError(f"{what} is empty: pass a token string (mind the leading space) or an id.")
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise LensInputError(
            f"got {len(items)} {what} tokens for {batch} prompts: pass one {what} per prompt, or a single one for all."
        )
    ids = []
    for item in items:
        try:
            ids.append(view.to_single_token(item))
        except LensInputError as err:
            raise LensInputError(f"{what}: {err}") from None
    return torch.tensor(ids, dtype=torch.long)


def resolve_direction(
    view: ModelView,
    batch: int,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    direction: Tensor | None = None,
    through_final_norm: bool = True,
) -> Direction:
    """Build the per-row :class:`Direction` for ``answer`` (``- wrong``) or a ``[d_model]`` / ``[B, d_model]`` vector.

    A vector ``direction`` is read like a column of ``W_U``: its value is ``ln_final(resid) · v`` (pass
    ``through_final_norm=False`` for a plain residual projection ``resid · v``, e.g. a probe).
    """
    if (answer is None) == (direction is None):
        raise LensInputError("pass exactly one of answer= (a token, optionally with wrong=) or direction= (a vector).")
    if direction is not None and wrong is not None:
        raise LensInputError("wrong= only goes with answer=; for a vector direction subtract it yourself.")
    if answer is not None and not through_final_norm:
        raise LensInputError("a token's logit is always read through the final norm: through_final_norm=False only "
                             "goes with direction= (a plain residual projection).")
    dec = view.decoder
    kind, gain, bias = dec.kind, dec.gain, dec.bias
    if bias is not None and not torch.any(bias != 0):
        bias = None  # folded into b_U (compatibility mode)
    if not through_final_norm:
        gain = bias = None
    elif kind is not None and gain is None and view.is_bridge and not view.is_compat:
        raise LensInputError(
            "this raw TransformerBridge's final norm gain could not be read, so a direct logit attribution would be "
            "silently wrong: call model.enable_compatibility_mode() first (it folds the gain into W_U)."
        )
    d = view.d_model
    if direction is not None:
        v = torch.as_tensor(direction).detach().float().to(view.device)
        shape = tuple(v.shape)
        if v.ndim == 1:
            v = v[None].expand(batch, -1)
        if v.ndim != 2 or v.shape[-1] != d or v.shape[0] not in (1, batch):
            raise LensInputError(
                f"direction has shape {shape}; expected [d_model] = [{d}] or [batch, d_model] = "
                f"[{batch}, {d}] (one per prompt)."
            )
        bad = torch.nonzero(~torch.isfinite(v))
        if len(bad):
            where = tuple(bad[0].tolist()) if v.shape[0] > 1 and shape[0:1] != (d,) else int(bad[0, -1])
            raise LensInputError(f"direction holds {int(len(bad))} non-finite value(s) (NaN or inf; the first at "
                                 f"index {where}): every attribution would be NaN. Pass a finite vector.")
        v = v.expand(batch, -1).clone()
        consts = {"ln_final.b": v @ bias.float()} if bias is not None else {}
        label = "direction" + ("" if through_final_norm else " (no final norm)")
        vec = v * gain.float() if gain is not None else v
        return Direction(label, vec, consts, through_final_norm=through_final_norm)

    a_ids = _token_ids(view, answer, batch, "answer")
    w_ids = _token_ids(view, wrong, batch, "wrong") if wrong is not None else None
    if w_ids is not None and bool((a_ids == w_ids).any()):
        b = int(torch.nonzero(a_ids == w_ids)[0, 0])
        which = "" if batch == 1 else f" for prompt {b}"
        raise LensInputError(f"answer and wrong are the same token{which} ({view.id_to_str(int(a_ids[b]))!r}): "
                             "logit[answer] - logit[wrong] is 0 whatever the model does. Pass another wrong token, "
                             "or leave wrong out.")
    # the unembedding as the model applies it after its final norm (project_out, logit multiplier folded in)
    U, c = dec.unembed_columns(a_ids)
    u = U.T  # [B, d_model]
    if w_ids is not None:
        U_w, c_w = dec.unembed_columns(w_ids)
        u = u - U_w.T
        c = None if c is None else c - c_w
    consts: dict[str, Tensor] = {}
    if c is not None and torch.any(c != 0):
        consts["b_U"] = c
    if bias is not None:
        consts["ln_final.b"] = u @ bias.float().to(u.device)
    vec = u * gain.float() if gain is not None else u
    a_strs = [view.id_to_str(i) for i in a_ids.tolist()]
    w_strs = [view.id_to_str(i) for i in w_ids.tolist()] if w_ids is not None else []
    if len(set(a_strs)) == 1 and len(set(w_strs)) <= 1:
        label = f"logit[{a_strs[0]!r}]" + (f" - logit[{w_strs[0]!r}]" if w_strs else "")
    else:
        label = "logit[answer]" + (" - logit[wrong]" if w_strs else "") + " (per prompt)"
    return Direction(label, vec, consts, a_ids, w_ids, True, a_strs, w_strs)


def centred_vectors(view: ModelView, direction: Direction) -> Float[Tensor, "B d_model"]:
    """The direction with the final LayerNorm's mean-centring moved onto it (unchanged for RMSNorm / no norm)."""
    vec = direction.vectors.float()
    if direction.through_final_norm and view.decoder.kind == "LN":
        vec = vec - vec.mean(-1, keepdim=True)
    return vec


def final_scale(view: ModelView, direction: Direction, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
    """The final norm's scale at each residual state (the norm's input), frozen from the run: ``sqrt(var + eps)``
    (LayerNorm) or ``sqrt(mean(x²) + eps)`` (RMSNorm); ones when the direction is not read through the norm."""
    if not direction.through_final_norm:
        return torch.ones(resid.shape[:-1], device=resid.device)
    return view.decoder.scale(resid)


def effective_directions(
    view: ModelView, direction: Direction, resid: Float[Tensor, "... B d_model"]
) -> tuple[Float[Tensor, "... B d_model"], Float[Tensor, "... B"]]:
    """``(d', scale)``: the direction each component is dotted with at a residual state ``resid`` (the final norm's
    input), i.e. centred (LayerNorm) and divided by the norm's scale frozen from ``resid``."""
    scale = final_scale(view, direction, resid)
    vec = centred_vectors(view, direction).to(resid.device)
    return vec / scale[..., None], scale


def model_value(view: ModelView, direction: Direction, logits: Tensor | None, resid: Tensor, rows: Tensor,
                pos: Tensor) -> tuple[Float[Tensor, " B"], str]:
    """The quantity being attributed, measured from the run: the model's own logit (difference) at each row's
    position when ``logits`` are available (pre-soft-cap), else computed from the final residual state.

    Returns ``(value, source)`` with source ``"logits"`` or ``"resid"``."""
    if direction.is_token and logits is not None:
        lg = view.decoder.uncap(logits.detach().float()[rows.to(logits.device), pos.to(logits.device)])  # [B, V]
        val = lg.gather(-1, direction.answer_ids.to(lg.device)[:, None])[:, 0]
        if direction.wrong_ids is not None:
            val = val - lg.gather(-1, direction.wrong_ids.to(lg.device)[:, None])[:, 0]
        return val.cpu(), "logits"
    d_eff, _ = effective_directions(view, direction, resid)
    consts = sum(direction.constants.values(), torch.zeros(resid.shape[0], device=resid.device))
    val = (resid.float() * d_eff).sum(-1) + consts
    return val.cpu(), "resid"


@dataclass
class WriteDirections:
    """Where each component's output is dotted: the direction on block 0's input (the embeddings), and per layer on
    what the attention and the MLP compute (``view.sublayer(l, ...).out_hook``), each carried back from the final
    norm through every norm on the way (frozen scales), residual multipliers included; ``constants`` holds what
    those norms' biases add (``L{l}.ln1.b``, ...); ``resid`` per layer on the residual stream itself, where a mixer
    or a whole MLP (:mod:`mi_lenses.models.layout`) is read as a difference of residual states."""

    embed: Float[Tensor, "... d_model"]
    attn: list[Float[Tensor, "... d_model"]]
    mlp: list[Float[Tensor, "... d_model"]]
    constants: dict[str, Float[Tensor, "..."]]
    resid: list[Float[Tensor, "... d_model"]] = field(default_factory=list)


def write_directions(view: ModelView, final: Float[Tensor, "... d_model"], cache: Any,
                     at: Callable[[Tensor], Tensor]) -> WriteDirections:
    """Carry the direction ``final`` on the final norm's input back to every write into the residual stream.

    ``at`` picks the attributed positions from a cached ``[batch, pos, ...]`` tensor (the leading dims of
    ``final``). Each norm is linearised with its scale frozen at its input in the run:
    ``post_norm(x) ≈ gain * centre(x) / s``, so a part's value is linear in the part and the parts still sum exactly
    to the logit; a post-LN residual norm carries the direction to everything written before it.
    """
    L = view.n_layers
    d = final.float()
    attn: list[Tensor] = [d] * L
    mlp: list[Tensor] = [d] * L
    resid: list[Tensor] = [d] * L
    consts: dict[str, Tensor] = {}

    def through(site: Any, d: Tensor) -> Tensor:
        x = sum(at(cache[h]).float() for h in site.inputs)
        c = site.norm.constant(d)
        if c is not None:
            consts[f"{site.label}.b"] = c
        return site.norm.pullback(d, site.norm.scale(x))

    for l in reversed(range(L)):
        lay = view.layout(l)
        resid[l] = d
        pa = view.sublayer(l, "attn") if lay.heads else None
        pm = view.sublayer(l, "mlp") if view.has_mlp and lay.mlp else None
        if pm is not None and pm.resid_norm is not None:
            d = through(pm.resid_norm, d)
        m_dir = d
        if pa is not None and pa.resid_norm is not None:
            d = through(pa.resid_norm, d)
        a_dir = d
        for path, dirn, out in ((pa, a_dir, attn), (pm, m_dir, mlp)):
            if path is None:
                continue
            if path.post_norm is not None:
                dirn = through(path.post_norm, dirn)
            out[l] = dirn * path.multiplier if path.multiplier != 1.0 else dirn
    return WriteDirections(d, attn, mlp, consts, resid)


def write_hooks(view: ModelView) -> list[str]:
    """The hooks :func:`write_directions` reads (sublayer outputs, norm inputs; residual states around a mixer)."""
    names: list[str] = []
    for l in range(view.n_layers):
        lay = view.layout(l)
        if lay.heads:
            names += view.sublayer(l, "attn").hooks
        if view.has_mlp and lay.mlp:
            names += view.sublayer(l, "mlp").hooks
        names += lay.hooks
    return names
