"""What each layer's attention lets a query see, beyond causality, and what it adds to the softmax: read once per
model, used by the attention patterns, the q·k terms, their verification, the KV cache and fused attention.

* **sliding window** (Mistral, Phi-3, Starcoder2, Gemma 2/3, Cohere 2, EXAONE 4, OLMo 3, GPT-OSS, GPT-Neo's local
  layers): query ``q`` sees keys ``q - window + 1 .. q``;
* **chunked attention** (Llama 4): query ``q`` sees the keys of its own chunk of ``chunk`` positions, up to itself;
* **attention sinks** (GPT-OSS): one learned logit per head joins each row's softmax and takes a share of its
  weight without adding a value, so the pattern's row sums to ``1 - sink share``;
* **soft-capped scores** (Gemma 2): ``cap * tanh(scores / cap)`` before the mask;
* **ALiBi** (BLOOM): position biases added to the scores (the q·k terms do not reproduce them).

Positions count in each prompt's own tokens (padding removed): transformers' windows depend on the distance between
query and key only, and its chunks start at a prompt's first real token.

The types come from the Hugging Face config's ``layer_types`` where it has them (each ``"sliding_attention"`` layer
has ``sliding_window``, each ``"chunked_attention"`` layer ``attention_chunk_size``), else from GPT-Neo's
``attention_layers`` (``"local"``: ``window_size``), else from ``sliding_window`` on every layer (Mistral, Phi-3,
Starcoder2) or Llama 4's ``attention_chunk_size`` on its rotary layers; on a ``HookedTransformer``, from ``cfg.attn_types`` and ``cfg.window_size``.

Example:
    >>> m = LayerMask(window=3)
    >>> m.visible(0, 5, 5).int()
    tensor([[1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1]], dtype=torch.int32)
    >>> LayerMask(chunk=2).visible(3, 2, 5).int()   # queries 3 and 4 of 5 keys
    tensor([[0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1]], dtype=torch.int32)
    >>> attention_masks(model)[0].is_causal        # the doctest model: plain causal attention
    True
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

_READ: "weakref.WeakKeyDictionary[Any, list[LayerMask]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class LayerMask:
    """One layer's attention mask and softmax extras (see the module docstring); all ``None``: causal only."""

    window: int | None = None  # query q sees keys q - window + 1 .. q
    chunk: int | None = None  # query q sees keys of its chunk (position // chunk), up to itself
    sinks: Float[Tensor, " H"] | None = None  # learned sink logit per query head (one more softmax entry, no value)
    score_cap: float | None = None  # soft-capped scores: score_cap * tanh(scores / score_cap)
    alibi: bool = False  # position biases added to the scores

    @property
    def is_causal(self) -> bool:
        """Whether the layer's mask is the causal mask alone."""
        return self.window is None and self.chunk is None

    @property
    def reproducible(self) -> bool:
        """Whether ``scale * q · k`` with this mask (soft-cap, sinks) gives the layer's pattern (not with ALiBi)."""
        return not self.alibi

    def describe(self) -> str:
        """The mask in words (``"a sliding window of 4 keys"``), for messages."""
        if self.window is not None:
            return f"a sliding window of {self.window} keys"
        if self.chunk is not None:
            return f"chunks of {self.chunk} positions"
        return "the causal mask"

    def capped(self, scores: Tensor) -> Tensor:
        """``scores`` soft-capped as the layer caps them (unchanged without a cap)."""
        return scores if self.score_cap is None else self.score_cap * torch.tanh(scores / self.score_cap)

    def visible(self, first: int, n_queries: int, n: int) -> Bool[Tensor, "Q n"]:
        """Which of a prompt's ``n`` keys the queries ``first .. first + n_queries - 1`` may attend to."""
        q = torch.arange(first, first + n_queries)[:, None]
        k = torch.arange(n)[None, :]
        seen = k <= q
        if self.window is not None:
            seen &= k > q - self.window
        if self.chunk is not None:
            seen &= k // self.chunk == q // self.chunk
        return seen


def attention_masks(model: Any) -> list[LayerMask]:
    """Every layer's :class:`LayerMask` (index ``l`` is block ``l``), read once per model."""
    if type(model).__name__ == "ModelView":
        model = model.model
    if model not in _READ:
        _READ[model] = _read(model)
    return _READ[model]


def has_local_attention(model: Any) -> bool:
    """Whether some layer sees less than every earlier key (a sliding window or chunked attention)."""
    return any(not m.is_causal for m in attention_masks(model))


def _read(model: Any) -> list[LayerMask]:
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    config = getattr(getattr(model, "original_model", None), "config", None)
    config = getattr(config, "text_config", None) or config  # a multimodal model's language model
    cap = getattr(config, "attn_logit_softcapping", None) if config is not None else None
    if cap is None:
        cap = getattr(cfg, "attn_scores_soft_cap", None)
    score_cap = float(cap) if cap is not None and float(cap) > 0 else None
    alibi = getattr(cfg, "positional_embedding_type", "standard") == "alibi"
    spans = _spans(cfg, config, n_layers)
    blocks = list(getattr(model, "blocks", []))
    out = []
    for l in range(n_layers):
        sinks = None
        if l < len(blocks):
            sinks = getattr(getattr(getattr(blocks[l], "attn", None), "original_component", None), "sinks", None)
        sinks = sinks.detach().float().cpu() if isinstance(sinks, Tensor) else None
        window, chunk = spans[l]
        out.append(LayerMask(window=window, chunk=chunk, sinks=sinks, score_cap=score_cap, alibi=alibi))
    return out


def _spans(cfg: Any, config: Any, n_layers: int) -> list[tuple[int | None, int | None]]:
    """``(window, chunk)`` of every layer (see the module docstring)."""
    full: tuple[int | None, int | None] = (None, None)
    if config is None:  # a HookedTransformer: TransformerLens's own local attention (GPT-Neo, Gemma 2)
        types, size = getattr(cfg, "attn_types", None), getattr(cfg, "window_size", None)
        if types and size:
            return [(int(size), None) if t == "local" else full for t in types]
        return [full] * n_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types:
        chunk = getattr(config, "attention_chunk_size", None)
        return [(int(window), None) if t == "sliding_attention" and window else
                (None, int(chunk)) if t == "chunked_attention" and chunk else full for t in types]
    local = getattr(config, "attention_layers", None)  # GPT-Neo
    if local and getattr(config, "window_size", None):
        return [(int(config.window_size), None) if t == "local" else full for t in local]
    if window and getattr(config, "use_sliding_window", True) is not False:
        return [(int(window), None)] * n_layers
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk:  # Llama 4 without layer types: its rotary layers are the chunked ones
        rope = getattr(config, "no_rope_layers", None) or [1] * n_layers
        return [(None, int(chunk)) if rope[l] else full for l in range(n_layers)]
    return [full] * n_layers
