"""What each block writes into the residual stream, and every linear step between a write and the logit.

Read from a TransformerBridge (and its HF modules) once per :class:`~mi_lenses.models.view.ModelView`, for direct
logit attribution:

* a **sublayer path** per block and sublayer (``"attn"``, ``"mlp"``): the hook holding what the sublayer computes
  (the sum of its heads plus ``b_O``; the MLP's output) *before* anything the block applies to it, then a
  **post-norm** (Gemma 2/3, OLMo 2: ``post_attention_layernorm``/``post_feedforward_layernorm``), the **residual
  multiplier** (Granite), and on post-LN blocks (OPT-350m) the **residual norm** applied to the stream after the add;
* the **MLP's neurons**: activation and output row of every neuron, for dense MLPs ``hook_post`` and ``W_out``; for
  mixture-of-experts blocks every expert's neurons weighted by the router (zero where the token is not routed) and
  the shared experts' times their gate, recomputed from the block's input and the experts' weights
  (:mod:`mi_lenses.models.experts`), so that they sum to what the block writes.

Every norm on the way is linearised with its scale frozen at its input in the run (the convention of the final norm),
so the parts of a direct logit attribution still add up exactly to the logit.

Example (a Llama block: each sublayer's output goes straight into the stream, a dense MLP):
    >>> view = ModelView(model)
    >>> path = view.sublayer(0, "attn")
    >>> path.out_hook, path.post_norm, path.multiplier, path.resid_norm
    ('blocks.0.hook_attn_out', None, 1.0, None)
    >>> nr = view.neurons(0)
    >>> nr.size == model.cfg.d_mlp, nr.hooks, nr.groups
    (True, ('blocks.0.mlp.hook_post',), ())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.models.decode import Norm, NormKind
from mi_lenses.models.experts import Shared, expert_activations, expert_layout, expert_rows_on, routing


def unwrap(module: Any) -> Any:
    """The HF module inside a TransformerLens bridge component (the module itself when it is not wrapped)."""
    while hasattr(module, "original_component") and module.original_component is not None \
            and module.original_component is not module:
        module = module.original_component
    return module


def norm_kind(module: Any) -> NormKind:
    """``"RMS"`` or ``"LN"`` from the (bridge or HF) norm module's class."""
    names = (type(module).__name__, type(unwrap(module)).__name__)
    return "RMS" if any("RMS" in n for n in names) else "LN"


@dataclass(frozen=True)
class NormSite:
    """A norm between a write and the logit; its input is the sum of the cached ``inputs`` (its scale is frozen
    there)."""

    label: str  # e.g. "L3.ln1_post"
    norm: Norm
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class SublayerPath:
    """How block ``layer``'s ``sublayer`` output reaches the residual stream:
    ``resid += multiplier * post_norm(out)``, then (post-LN) ``resid = resid_norm(resid)``."""

    layer: int
    sublayer: str  # "attn" | "mlp"
    out_hook: str
    post_norm: NormSite | None = None
    multiplier: float = 1.0
    resid_norm: NormSite | None = None

    @property
    def hooks(self) -> list[str]:
        names = [self.out_hook]
        for site in (self.post_norm, self.resid_norm):
            if site is not None:
                names += list(site.inputs)
        return names


def _norm_site(model: Any, block: Any, attr: str, label: str, inputs: tuple[str, ...]) -> NormSite:
    module = getattr(block, attr)
    kind = norm_kind(module)
    offset = bool(getattr(model.cfg, "rmsnorm_uses_offset", False)) and kind == "RMS"
    return NormSite(label, Norm.from_module(module, kind, float(getattr(model.cfg, "eps", 1e-5)), offset=offset),
                    inputs)


def is_post_ln(model: Any) -> bool:
    """Whether the blocks normalise the residual stream after each sublayer's add (OPT with
    ``do_layer_norm_before=False``, i.e. OPT-350m)."""
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(hf_cfg, "do_layer_norm_before", True) is False


def sublayer_path(model: Any, layer: int, sublayer: str) -> SublayerPath:
    """The :class:`SublayerPath` of block ``layer``'s ``"attn"`` or ``"mlp"`` on a bridge (on a HookedTransformer:
    ``hook_{sublayer}_out`` straight into the stream)."""
    p = f"blocks.{layer}"
    block = model.blocks[layer]
    post_attr = "ln1_post" if sublayer == "attn" else "ln2_post"
    mult = float(getattr(block, "residual_contribution_scale", 1.0) or 1.0)
    post = resid = None
    if isinstance(getattr(block, post_attr, None), torch.nn.Module) and hasattr(model, "original_model"):
        out_hook = f"{p}.{post_attr}.hook_in"
        post = _norm_site(model, block, post_attr, f"L{layer}.{post_attr}", (out_hook,))
    elif mult != 1.0:  # a scaled-residual block: hook_attn_out / hook_mlp_out hold the scaled contribution
        out_hook = f"{p}.{sublayer if sublayer == 'attn' else mlp_name(block)}.hook_out"
    else:
        out_hook = f"{p}.hook_{sublayer}_out"
    if is_post_ln(model):
        if sublayer == "attn":
            resid = _norm_site(model, block, "ln1", f"L{layer}.ln1", (f"{p}.hook_resid_pre", out_hook))
        else:
            resid = _norm_site(model, block, "ln2", f"L{layer}.ln2", (f"{p}.ln1.hook_out", out_hook))
    return SublayerPath(layer, sublayer, out_hook, post, mult, resid)


# ------------------------------------------------------------------------------------------------ MLP neurons
@dataclass(frozen=True)
class Neurons:
    """The ``size`` neurons of one MLP: ``activations(cache, at)`` ``[..., N]`` times each neuron's output row (``project(d)``
    ``[..., N]`` = every row dotted with ``d``) sums to what the MLP computes before its bias ``b_out``. No weight is
    copied: the rows are read from the model at each call. ``groups``: ``(label, slice)`` of each expert (MoE)."""

    size: int
    b_out: Float[Tensor, " d_model"] | None
    hooks: tuple[str, ...]
    activations: Callable[[Any, Callable[[Tensor], Tensor]], Tensor]
    project: Callable[[Tensor], Tensor]
    names: tuple[str, ...] | None = None  # per neuron, e.g. "E2N5"; None: "N{n}"
    groups: tuple[tuple[str, slice], ...] = ()
    note: str | None = None


def mlp_name(block: Any) -> str:
    """The block's MLP child: ``mlp``, or Granite-MoE-hybrid's ``shared_mlp``."""
    return "mlp" if hasattr(block, "mlp") or not hasattr(block, "shared_mlp") else "shared_mlp"


def dense_neurons(model: Any, layer: int) -> Neurons:
    name = mlp_name(model.blocks[layer])
    mlp = getattr(model.blocks[layer], name)
    hook = f"blocks.{layer}.{name}.hook_post"
    b = getattr(mlp, "b_out", None)

    def project(d: Tensor) -> Tensor:
        W_out = mlp.W_out.detach()  # [d_mlp, d_model]
        return d.float().to(W_out.device) @ W_out.float().T  # float32 (a transient copy of low-precision weights)

    return Neurons(int(mlp.W_out.shape[0]), None if b is None else b.detach().float(), (hook,),
                   lambda cache, at: at(cache[hook]).float(), project)


def is_moe(model: Any, layer: int) -> bool:
    mlp = getattr(model.blocks[layer], mlp_name(model.blocks[layer]))
    inner = unwrap(mlp)
    dense = hasattr(mlp, "W_out") and not hasattr(inner, "experts")  # Jamba: dense layers in an MoE bridge too
    return ("MoE" in type(mlp).__name__ and not dense) or (hasattr(inner, "experts") and
                                          (hasattr(inner, "gate") or hasattr(inner, "router")))


def moe_neurons(model: Any, layer: int) -> Neurons:
    """The router-weighted expert neurons of a mixture-of-experts block, then the shared experts' (times their gate),
    in every layout :mod:`mi_lenses.models.experts` reads (router signatures, scaling factors, transposed or biased
    experts, several shared experts). Another layout gives no neurons (and a note): the layer is then attributed as a
    whole."""
    moe = unwrap(model.blocks[layer].mlp)
    hook = f"blocks.{layer}.mlp.hook_in"
    ex_module = getattr(moe, "experts", None)
    ex = unwrap(ex_module)
    lay = expert_layout(moe, ex, int(model.cfg.d_model)) if ex is not None else \
        f"{type(moe).__name__} has no experts module"
    shared = Shared.of(moe)
    if isinstance(lay, str) or isinstance(shared, str):
        why = lay if isinstance(lay, str) else shared
        return Neurons(0, None, (), lambda cache, at: torch.zeros(0), lambda d: torch.zeros(0),
                       note=f"{why}: the MLP is attributed as a whole, without experts or neurons")
    E, I, bias = lay.E, lay.I, int(lay.has_down_bias)
    names = [f"E{e}N{n}" for e in range(E) for n in range(I)] if not bias else \
        [f"E{e}N{n}" if n < I else f"E{e}.bias" for e in range(E) for n in range(I + 1)]
    groups = [(f"E{e}", slice(e * (I + bias), (e + 1) * (I + bias))) for e in range(E)]
    n_routed = E * (I + bias)
    n_shared = 0 if shared is None else shared.size + int(shared.has_bias)
    if shared is not None:
        names += [f"SN{n}" for n in range(shared.size)] + (["S.bias"] if shared.has_bias else [])
        groups.append(("shared", slice(n_routed, n_routed + n_shared)))

    def activations(cache: Any, at: Callable[[Tensor], Tensor]) -> Tensor:
        x = at(cache[hook])
        lead, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d).to(ex.gate_up_proj.dtype)
        with torch.no_grad():
            inputs, w = routing(moe, ex_module, x, E)
            acts = expert_activations(ex, lay, inputs) * (w * lay.scale)[..., None]  # [N, E, I]
            if bias:
                acts = torch.cat([acts, (w * lay.scale)[..., None]], -1)
            parts = [acts.reshape(x.shape[0], n_routed)]
            if shared is not None:
                parts.append(shared.activations(x))
        return torch.cat(parts, -1).reshape(*lead, -1)

    def project(d: Tensor) -> Tensor:
        lead = d.shape[:-1]
        flat = d.reshape(-1, d.shape[-1]).float().to(ex.down_proj.device)
        rows = expert_rows_on(ex, lay, flat)  # [N, E, I]
        if bias:
            rows = torch.cat([rows, (flat @ ex.down_proj_bias.detach().float().T)[..., None]], -1)
        parts = [rows.reshape(flat.shape[0], n_routed)]
        if shared is not None:
            parts.append(shared.rows_on(flat))
        return torch.cat(parts, -1).reshape(*lead, -1)

    return Neurons(n_routed + n_shared, None, (hook,), activations, project, tuple(names), tuple(groups))


def neurons(model: Any, layer: int) -> Neurons:
    """Block ``layer``'s :class:`Neurons` (dense or mixture-of-experts)."""
    return moe_neurons(model, layer) if is_moe(model, layer) else dense_neurons(model, layer)
