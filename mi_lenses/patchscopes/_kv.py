"""Private KV-cache adapter: the only code in patchscopes that knows how a model keeps past keys and values.

A ``TransformerBridge`` (TL 4.x) forwards ``past_key_values`` (a transformers ``DynamicCache``) to the wrapped HF model
and returns the updated cache with ``return_type="logits_and_cache"``; positions are derived from the cache length.
Other models (TL 3.x ``HookedTransformer``) report ``supported() == False`` and the engine recomputes the whole
sequence instead (same numbers, slower). Candidate for ``ModelView`` once more than one feature needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def supported(model: Any) -> bool:
    """Whether ``model`` can run a forward pass on top of a cache of earlier positions."""
    return hasattr(model, "original_model") and type(model).__name__ == "TransformerBridge"


def forward(model: Any, tokens: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
    """Logits of ``tokens`` (continuing ``cache`` if given) and the cache extended by them."""
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs["past_key_values"] = cache
    logits, new_cache = model(tokens, return_type="logits_and_cache", **kwargs)
    if new_cache is None:
        raise RuntimeError("the model returned no KV cache; run without the cache (use_kv_cache=False).")
    return logits, new_cache


def repeat(cache: Any, n: int) -> Any:
    """A new cache holding every row of ``cache`` (batch 1) ``n`` times; ``cache`` itself is left unchanged."""
    from transformers import DynamicCache

    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise RuntimeError(f"unsupported KV cache type {type(cache).__name__}.")
    with torch.no_grad():
        data = [(layer.keys.expand(n, *layer.keys.shape[1:]).contiguous(),
                 layer.values.expand(n, *layer.values.shape[1:]).contiguous()) for layer in layers]
    return DynamicCache(ddp_cache_data=data)


def length(cache: Any) -> int:
    return int(cache.get_seq_length())
