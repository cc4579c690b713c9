"""What each block of a TransformerBridge is made of: attention heads, another token mixer, an MLP.

A transformer block has attention heads and an MLP. State-space and hybrid models (Mamba, Mamba 2, Jamba, Bamba,
Nemotron-H, Zamba 2, LFM2, Qwen3-Next, Qwen3.5, OLMo-hybrid, Granite-MoE-hybrid, RWKV, RecurrentGemma) mix tokens
in some blocks without heads: a state-space model (SSM), linear attention, a short convolution, RWKV's time-mix, or
a block TransformerLens wraps whole. Such a **mixer** is one component: what it adds to the residual stream is the
difference of the two residual hooks around it (``span``), exact whatever it computes inside, so the parts of a
direct logit attribution still sum to the logit. An MLP whose neurons cannot be read as ``activation x W_out`` row
(RWKV's receptance-gated channel-mix, Nemotron-H's MLP blocks) is one component in the same way.

Example (Llama: every block has heads and an MLP with neurons):
    >>> lay = block_layout(model, 0)
    >>> lay.heads, lay.mixer, lay.mlp, lay.mlp_span
    (True, None, 'mlp', None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mi_lenses.models.blocks import unwrap

# bridge child -> what the mixer is (the first one a block has)
MIXERS = (("linear_attn", "linear attention"), ("conv", "short convolution"), ("time_mix", "RWKV time-mix"),
          ("mixer", "SSM"))
MLPS = ("mlp", "shared_mlp")  # MLP children whose neurons are read (mi_lenses.models.blocks)
WHOLE_MLPS = ("channel_mix",)  # MLP children attributed as a whole


@dataclass(frozen=True)
class BlockLayout:
    """Block ``layer``'s parts. ``heads``: attention heads are read per head (``attn.hook_z``, ``W_O``);
    ``mixer``: what mixes tokens instead (``"SSM"``, ``"linear attention"``, ``"short convolution"``,
    ``"RWKV time-mix"``, ``"attention"`` not split into heads, ``"block"``: the whole block), written as
    ``cache[span[1]] - cache[span[0]]``; ``mlp``: the MLP child whose neurons are read, or ``mlp_span`` for an MLP
    attributed as a whole; ``note``: why a part is coarser than a head or a neuron."""

    layer: int
    heads: bool = True
    mixer: str | None = None
    span: tuple[str, str] | None = None
    mlp: str | None = "mlp"
    mlp_span: tuple[str, str] | None = None
    note: str | None = None

    @property
    def hooks(self) -> list[str]:
        """The residual hooks the mixer's and a whole MLP's values read."""
        return [*(self.span or ()), *(self.mlp_span or ())]


def _child(block: Any, name: str) -> Any:
    mod = block._modules.get(name) if isinstance(block, torch.nn.Module) else None
    return mod


def _inner_name(mod: Any) -> str:
    return type(unwrap(mod)).__name__


def block_layout(model: Any, layer: int, hook_names: frozenset[str] | None = None) -> BlockLayout:
    """The :class:`BlockLayout` of block ``layer`` (a HookedTransformer's blocks are all transformer blocks)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "original_model"):
        return BlockLayout(layer, mlp=None if getattr(model.cfg, "attn_only", False) else "mlp")
    names = frozenset(getattr(model, "hook_dict", {})) if hook_names is None else hook_names
    block = blocks[layer]
    p = f"blocks.{layer}"
    pre, mid, post = f"{p}.hook_resid_pre", f"{p}.hook_resid_mid", f"{p}.hook_resid_post"
    if f"{p}.pre_ln.hook_out" in names:  # RWKV normalises the embeddings in block 0: they are written after it
        pre = f"{p}.pre_ln.hook_out"
    heads = _child(block, "attn") is not None and f"{p}.attn.hook_z" in names
    mlp = next((m for m in MLPS if _child(block, m) is not None), None)
    whole_mlp = next((m for m in WHOLE_MLPS if _child(block, m) is not None), None)
    has_mid = mid in names
    mixer = next(((attr, kind) for attr, kind in MIXERS if _child(block, attr) is not None), None)
    if heads:
        return BlockLayout(layer, mlp=mlp, mlp_span=(mid, post) if whole_mlp and has_mid else None)
    cls = type(getattr(block, "original_component", block)).__name__
    if mixer is None:  # nothing inside is exposed (RecurrentGemma, Zamba 2's hybrid blocks)
        if _child(block, "attn") is not None:
            return BlockLayout(layer, False, "attention", (pre, mid) if has_mid else (pre, post), mlp,
                               note=f"block {layer}'s attention has no per-head hooks in TransformerLens: it is "
                                    "attributed as a whole")
        return BlockLayout(layer, False, "block", (pre, post), None,
                           note=f"TransformerLens wraps block {layer} ({cls}) whole, exposing nothing inside it: "
                                "its output is one part (mixer and MLP together)")
    attr, kind = mixer
    inner = _inner_name(_child(block, attr))
    if attr == "mixer" and "Attention" in inner:  # Nemotron-H: one mixer per block, of any kind
        kind = "attention"
    elif attr == "mixer" and ("MLP" in inner or "MoE" in inner or "Experts" in inner):
        return BlockLayout(layer, False, None, None, None, (pre, post),
                           note=f"block {layer}'s MLP ({inner}) is one part: TransformerLens exposes no neurons in it")
    if mlp is None and whole_mlp is None:
        return BlockLayout(layer, False, kind, (pre, post), None,
                           note=f"block {layer}'s attention ({inner}) has no per-head hooks in TransformerLens: it is "
                                "attributed as a whole" if kind == "attention" else None)
    if not has_mid:
        return BlockLayout(layer, False, kind, (pre, post), None,
                           note=f"block {layer} has no hook between its {kind} and its MLP: both are one part")
    note = f"block {layer}'s {whole_mlp} ({_inner_name(_child(block, whole_mlp))}) is one part: its output is " \
        "gated after the output projection, so it has no neurons" if whole_mlp else None
    return BlockLayout(layer, False, kind, (pre, mid), mlp, (mid, post) if whole_mlp else None, note)
