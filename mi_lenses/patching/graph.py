"""The residual-stream graph of edge attribution and circuits: writers, readers and which writer feeds which reader.

Writers put something into the residual stream: ``embed`` (everything entering block 0), every head ``L{l}H{h}``
(``z @ W_O[h]``) and every MLP ``MLP{l}``. Readers take their own copy of it: each head's query input ``L{l}H{h}.q``,
each key/value head's key and value inputs (``L{l}H{g}.k``/``.v``; ``L{l}KV{g}.k`` under grouped-query attention, where
one key/value head serves several query heads), each MLP's input ``MLP{l}.in``, and the logits. Writer ``u`` feeds
reader ``v`` when ``u`` comes first: heads and MLPs of earlier layers, and a layer's own heads for its MLP (unless the
block runs attention and MLP in parallel).

Example:
    >>> g = build_graph(ModelView(model))
    >>> g.writers[:2], g.readers[-1], int(g.valid.sum()) > 0
    (['embed', 'L0H0'], 'logits', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mi_lenses.models.view import ModelView
from mi_lenses.patching.sites import check_head_split


@dataclass
class Graph:
    """Writers and readers in model order, their layers (``embed`` is -1, ``logits`` is ``n_layers``), the reader
    segments per hook (``(hook name, first reader, count)``) and ``valid[w, r]``: writer ``w`` feeds reader ``r``."""

    writers: list[str]
    writer_layers: list[int]
    readers: list[str]
    reader_layers: list[int]
    segments: list[tuple[str, int, int]]
    valid: Tensor
    n_heads: int
    n_kv_heads: int

    def writer_index(self, layer: int) -> tuple[int, int, int]:
        """``(first head, first after the heads = the MLP, end)`` writer indices of block ``layer``."""
        first = 1 + layer * (self.n_heads + self.has_mlp)
        return first, first + self.n_heads, first + self.n_heads + self.has_mlp

    @property
    def has_mlp(self) -> int:
        return int(any(w.startswith("MLP") for w in self.writers))


def build_graph(view: ModelView) -> Graph:
    """The writers, readers and valid edges of ``view``'s model (heads split as ``hook_z`` holds them)."""
    check_head_split(view, "edge attribution")
    L, H, KV = view.n_layers, view.n_heads, view.n_kv_heads
    parallel = bool(getattr(view.cfg, "parallel_attn_mlp", False))
    writers, wl = ["embed"], [-1]
    for l in range(L):
        writers += [f"L{l}H{h}" for h in range(H)]
        wl += [l] * H
        if view.has_mlp:
            writers.append(f"MLP{l}")
            wl.append(l)
    kv = "H" if KV == H else "KV"
    readers: list[str] = []
    rl: list[int] = []
    segments: list[tuple[str, int, int]] = []
    for l in range(L):
        for comp, n, label in (("q", H, "H"), ("k", KV, kv), ("v", KV, kv)):
            segments.append((f"blocks.{l}.hook_{comp}_input", len(readers), n))
            readers += [f"L{l}{label}{g}.{comp}" for g in range(n)]
            rl += [l] * n
        if view.has_mlp:
            segments.append((f"blocks.{l}.hook_mlp_in", len(readers), 1))
            readers.append(f"MLP{l}.in")
            rl.append(l)
    segments.append((view.final_resid_hook, len(readers), 1))
    readers.append("logits")
    rl.append(L)
    w_layer = torch.tensor(wl)[:, None]
    r_layer = torch.tensor(rl)[None, :]
    w_mlp = torch.tensor([w.startswith("MLP") for w in writers])[:, None]
    r_mlp = torch.tensor([r.startswith("MLP") for r in readers])[None, :]
    valid = w_layer < r_layer
    # a block's own heads feed its MLP (sequential blocks); its MLP feeds only later blocks
    valid |= (w_layer == r_layer) & r_mlp & ~w_mlp & torch.tensor(not parallel)
    return Graph(writers, wl, readers, rl, segments, valid, H, KV)


def head_writes(z: Tensor, W_O: Tensor) -> Tensor:
    """Every head's residual write ``z[..., h, :] @ W_O[h]``: ``[B, S, H, d_head] -> [B, S, H, d_model]``."""
    return torch.einsum("bshe,hed->bshd", z.float(), W_O.to(z.device).float())


def writer_outputs(view: ModelView, cache) -> list[Tensor]:
    """The writers' outputs ``[B, S, d]`` in graph order from a cache holding ``blocks.0.hook_resid_pre``, every
    ``attn.hook_z`` and ``hook_mlp_out``."""
    out = [cache[view.hook_name("resid_pre", 0)].float()]
    for l in range(view.n_layers):
        out += list(head_writes(cache[view.attn_hook(l, "z")], view.W_O(l)).unbind(2))
        if view.has_mlp:
            out.append(cache[view.out_hook(l, "mlp")].float())
    return out


def writer_hooks(view: ModelView) -> list[str]:
    """The hooks :func:`writer_outputs` reads (and the attention outputs, to check that heads add up)."""
    names = [view.hook_name("resid_pre", 0)]
    for l in range(view.n_layers):
        names += [view.attn_hook(l, "z"), view.out_hook(l, "attn")]
        names += [view.out_hook(l, "mlp")] if view.has_mlp else []
    return names
