"""The neurons of a mixture-of-experts block: every expert's neurons weighted by the router, then the shared experts'.

A block writes ``Σ_e w[e] · expert_e(x) + shared(x)``. Each expert is a gated MLP, so its output is a sum over its
neurons of ``activation × output row``; the router weight ``w[e]`` (zero where the token is not routed) scales the
activations. Layouts differ between families, and each difference is read here rather than assumed:

* **routing** is whatever the block's own router computes (its signature, a bias argument such as MiniMax-M2's
  ``e_score_correction_bias`` or AFMoE's ``expert_bias``, grouped top-k, ``routed_scaling_factor`` / ``route_scale``
  inside the router): the block is run on the cached input and the experts' call is captured (its input, expert
  indices and weights), so nothing of the router is re-implemented. Llama 4's router returns two values and scales
  the experts' *input* instead: there the captured per-expert input already carries the weight;
* **experts**: fused ``gate_up_proj`` stored ``[E, 2I, d]`` or transposed ``[E, d, 2I]`` (told apart by ``d_model``),
  an activation ``act_fn(gate) * up`` or the experts' own gate function (GPT-OSS: ``_apply_gate``, clamped and
  interleaved, no ``act_fn``), and biases; a bias of the down projection is one more "neuron" per expert
  (``E{e}.bias``, activation ``w[e]``);
* **block scale**: a ``routed_scaling_factor`` the block applies after its experts (Laguna);
* **shared experts**: ``shared_expert`` or ``shared_experts`` (several fused into one wider MLP, DeepSeek, GLM,
  ERNIE), times ``sigmoid(shared_expert_gate(x))`` where the block has that gate (Qwen2-MoE), their down bias a
  neuron ``S.bias``.

Another layout gives no neurons and a note: the block is then attributed as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor


def _unwrap(module: Any) -> Any:
    while hasattr(module, "original_component") and module.original_component is not None \
            and module.original_component is not module:
        module = module.original_component
    return module


class _Captured(Exception):
    """Raised by the pre-hook on the experts once their call is captured (the rest of the block is not needed)."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one block's routed experts are stored: ``E`` experts of ``I`` neurons each."""

    E: int
    I: int
    transposed: bool  # gate_up [E, d, 2I] and down [E, I, d] (Llama 4, GPT-OSS) instead of [E, 2I, d], [E, d, I]
    gate: Callable[[Tensor], Tensor] | None  # the experts' own gate function on gate_up (GPT-OSS)
    act: Callable[[Tensor], Tensor] | None  # act_fn(gate) * up otherwise
    has_down_bias: bool
    scale: float  # what the block multiplies the routed experts' sum by afterwards (Laguna)


def expert_layout(moe: Any, ex: Any, d_model: int) -> ExpertLayout | str:
    """The layout of ``ex`` (the block's experts module), or why mi_lenses cannot read it."""
    gu, down = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not (isinstance(gu, Tensor) and isinstance(down, Tensor) and gu.ndim == down.ndim == 3):
        return f"the experts of {type(moe).__name__} are not stored as fused gate_up_proj / down_proj tensors"
    E, a, b = gu.shape
    if b == d_model and down.shape[1] == d_model:
        transposed, I = False, a // 2
    elif a == d_model and down.shape[2] == d_model:
        transposed, I = True, b // 2
    else:
        return f"the expert weights of {type(moe).__name__} have shapes mi_lenses does not read " \
               f"({tuple(gu.shape)}, {tuple(down.shape)})"
    gate = getattr(ex, "_apply_gate", None)
    act = getattr(ex, "act_fn", None)
    if gate is None and act is None:
        return f"the experts of {type(moe).__name__} have neither act_fn nor a gate function"
    scale = getattr(moe, "routed_scaling_factor", None)  # applied by the block itself (routers apply their own)
    return ExpertLayout(E, I, transposed, gate, act, isinstance(getattr(ex, "down_proj_bias", None), Tensor),
                        float(scale) if isinstance(scale, (int, float)) else 1.0)


def routing(moe: Any, ex_module: Any, x: Float[Tensor, "N d"], E: int
            ) -> tuple[Float[Tensor, "E N d"], Float[Tensor, "N E"]]:
    """Each expert's input and each token's weight per expert (zero where not routed), from the block's own router:
    the block runs on ``x`` until it calls its experts, whose call is captured."""
    got: dict[str, Any] = {}

    def capture(mod, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Captured

    handle = ex_module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        moe(x[None])
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in got:
        raise RuntimeError(f"{type(moe).__name__} did not call its experts")
    args = list(got["args"]) + list(got["kwargs"].values())
    if len(args) == 1:  # Llama 4: the input repeated per expert, already scaled by the router's score
        return args[0].reshape(E, -1, x.shape[-1]), torch.ones(x.shape[0], E, device=x.device)
    hidden, idx, weights = args[:3]
    w = torch.zeros(x.shape[0], E, device=x.device)
    valid = idx < E  # some experts modules accept an index E meaning "no expert"
    w.scatter_add_(1, torch.where(valid, idx, 0).long(), torch.where(valid, weights.float(), 0.0))
    return hidden.reshape(1, -1, x.shape[-1]).expand(E, -1, -1), w


def expert_activations(ex: Any, lay: ExpertLayout, inputs: Float[Tensor, "E N d"]) -> Float[Tensor, "N E I"]:
    """Every expert's neuron activations (before the router weight) on its input."""
    gu = ex.gate_up_proj
    h = torch.einsum("end,edi->nei" if lay.transposed else "end,eid->nei", inputs.to(gu.dtype), gu)
    bias = getattr(ex, "gate_up_proj_bias", None)
    if isinstance(bias, Tensor):
        h = h + bias
    if lay.gate is not None:
        return lay.gate(h).float()
    gate, up = h.float().chunk(2, dim=-1)
    return lay.act(gate) * up  # type: ignore[misc]


def expert_rows_on(ex: Any, lay: ExpertLayout, d: Float[Tensor, "N d"]) -> Float[Tensor, "N E I"]:
    """Every expert neuron's output row dotted with ``d``."""
    down = ex.down_proj.detach().float().to(d.device)
    return torch.einsum("nd,eid->nei" if lay.transposed else "nd,edi->nei", d, down)


@dataclass(frozen=True)
class Shared:
    """The shared expert(s) of a block: a gated MLP (several shared experts are one wider MLP) and its gate."""

    mlp: Any
    gate: Any | None  # Qwen2-MoE's shared_expert_gate (a sigmoid of it scales the shared expert)
    act: Callable[[Tensor], Tensor]
    size: int
    has_bias: bool

    @classmethod
    def of(cls, moe: Any) -> Shared | str | None:
        mlp = _unwrap(getattr(moe, "shared_expert", None) or getattr(moe, "shared_experts", None))
        if mlp is None:
            return None
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
        if act is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return f"the shared expert of {type(moe).__name__} is not a gated MLP mi_lenses reads"
        down = _unwrap(mlp.down_proj)
        return cls(mlp, getattr(moe, "shared_expert_gate", None), act, int(down.weight.shape[1]),
                   isinstance(getattr(down, "bias", None), Tensor))

    def activations(self, x: Float[Tensor, "N d"]) -> Float[Tensor, "N n"]:
        acts = self.act(self.mlp.gate_proj(x).float()) * self.mlp.up_proj(x).float()
        g = torch.ones(x.shape[0], 1, device=x.device) if self.gate is None else torch.sigmoid(self.gate(x).float())
        acts = acts * g
        return torch.cat([acts, g], -1) if self.has_bias else acts

    def rows_on(self, d: Float[Tensor, "N d"]) -> Float[Tensor, "N n"]:
        down = _unwrap(self.mlp.down_proj)
        rows = d @ down.weight.detach().float().to(d.device)
        return torch.cat([rows, (d @ down.bias.detach().float().to(d.device))[:, None]], -1) if self.has_bias \
            else rows
