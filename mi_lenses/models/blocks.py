"""What each block writes into the residual stream, and every linear step between a write and the logit.

Read from a TransformerBridge (and its HF modules) once per :class:`~mi_lenses.models.view.ModelView`, for direct
logit attribution:

* a **sublayer path** per block and sublayer (``"attn"``, ``"mlp"``): the hook holding what the sublayer computes
  (the sum of its heads plus ``b_O``; the MLP's output) *before* anything the block applies to it, then a
  **post-norm** (Gemma 2/3, OLMo 2: ``post_attention_layernorm``/``post_feedforward_layernorm``), the **residual
  multiplier** (Granite), and on post-LN blocks (OPT-350m) the **residual norm** applied to the stream after the add;
* the **MLP's neurons**: activation and output row of every neuron, for dense MLPs ``hook_post`` and ``W_out``; for
  mixture-of-experts blocks (Mixtral, OLMoE, Qwen2-MoE and its shared expert) every expert's neurons weighted by the
  router (zero where the token is not routed) and the shared expert's times its gate, recomputed from the block's
  input and the experts' weights, so that they sum to what the block writes.

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
        out_hook = f"{p}.{sublayer}.hook_out"
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


def dense_neurons(model: Any, layer: int) -> Neurons:
    mlp = model.blocks[layer].mlp
    hook = f"blocks.{layer}.mlp.hook_post"
    b = getattr(mlp, "b_out", None)

    def project(d: Tensor) -> Tensor:
        W_out = mlp.W_out.detach()  # [d_mlp, d_model]
        return d.float().to(W_out.device) @ W_out.float().T  # float32 (a transient copy of low-precision weights)

    return Neurons(int(mlp.W_out.shape[0]), None if b is None else b.detach().float(), (hook,),
                   lambda cache, at: at(cache[hook]).float(), project)


def _experts(moe: Any) -> Any:
    ex = unwrap(getattr(moe, "experts", None))
    return ex if all(isinstance(getattr(ex, a, None), Tensor) for a in ("gate_up_proj", "down_proj")) else None


def is_moe(model: Any, layer: int) -> bool:
    mlp = model.blocks[layer].mlp
    inner = unwrap(mlp)
    return "MoE" in type(mlp).__name__ or (hasattr(inner, "experts") and
                                          (hasattr(inner, "gate") or hasattr(inner, "router")))


def moe_neurons(model: Any, layer: int) -> Neurons:
    """The router-weighted expert neurons of a mixture-of-experts block (experts with fused ``gate_up_proj``
    ``[E, 2I, d]`` and ``down_proj`` ``[E, d, I]``, a top-k router returning ``(logits, weights, indices)``), then the
    shared expert's neurons times ``sigmoid(shared_expert_gate)``. Another MoE layout gives no neurons (and a note):
    the layer is then attributed as a whole."""
    moe = unwrap(model.blocks[layer].mlp)
    hook = f"blocks.{layer}.mlp.hook_in"
    ex = _experts(moe)
    router = unwrap(getattr(moe, "gate", None) or getattr(moe, "router", None))
    if ex is None or router is None:
        return Neurons(0, None, (), lambda cache, at: torch.zeros(0), lambda d: torch.zeros(0),
                       note=f"the experts of {type(moe).__name__} are not in a layout mi_lenses reads: the MLP is "
                            "attributed as a whole, without experts or neurons")
    E, two_i, _ = ex.gate_up_proj.shape
    I = two_i // 2
    names = [f"E{e}N{n}" for e in range(E) for n in range(I)]
    groups = [(f"E{e}", slice(e * I, (e + 1) * I)) for e in range(E)]
    shared = unwrap(getattr(moe, "shared_expert", None))
    shared_gate = unwrap(getattr(moe, "shared_expert_gate", None))
    n_shared = 0
    if shared is not None:
        n_shared = int(unwrap(shared.down_proj).weight.shape[1])
        names += [f"SN{n}" for n in range(n_shared)]
        groups.append(("shared", slice(E * I, E * I + n_shared)))

    def activations(cache: Any, at: Callable[[Tensor], Tensor]) -> Tensor:
        x = at(cache[hook])
        lead, d = x.shape[:-1], x.shape[-1]
        dtype = ex.gate_up_proj.dtype
        x = x.reshape(-1, d).to(dtype)
        with torch.no_grad():
            _, weights, idx = router(x)
            w = torch.zeros(x.shape[0], E, device=x.device).scatter_(1, idx.long(), weights.float())
            gate, up = torch.einsum("nd,eid->nei", x, ex.gate_up_proj).float().chunk(2, dim=-1)
            acts = [(ex.act_fn(gate) * up * w[..., None]).reshape(x.shape[0], E * I)]
            if shared is not None:
                act = getattr(shared, "act_fn", torch.nn.functional.silu)
                g = act(unwrap(shared.gate_proj)(x).float()) * unwrap(shared.up_proj)(x).float()
                if shared_gate is not None:
                    g = g * torch.sigmoid(shared_gate(x).float())
                acts.append(g)
        return torch.cat(acts, -1).reshape(*lead, -1)

    def project(d: Tensor) -> Tensor:
        lead = d.shape[:-1]
        flat = d.reshape(-1, d.shape[-1]).float().to(ex.down_proj.device)
        parts = [torch.einsum("nd,edi->nei", flat, ex.down_proj.detach().float()).reshape(flat.shape[0], E * I)]
        if shared is not None:
            parts.append(flat @ unwrap(shared.down_proj).weight.detach().float())
        return torch.cat(parts, -1).reshape(*lead, -1)

    return Neurons(E * I + n_shared, None, (hook,), activations, project, tuple(names), tuple(groups))


def neurons(model: Any, layer: int) -> Neurons:
    """Block ``layer``'s :class:`Neurons` (dense or mixture-of-experts)."""
    return moe_neurons(model, layer) if is_moe(model, layer) else dense_neurons(model, layer)
