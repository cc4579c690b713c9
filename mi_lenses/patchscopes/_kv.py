"""Private KV-cache adapter: the only code in patchscopes that knows how a model keeps past keys and values.

A ``TransformerBridge`` (TL 4.x) forwards ``past_key_values`` (a transformers ``DynamicCache``) to the wrapped HF model
and returns the updated cache with ``return_type="logits_and_cache"``; positions are derived from the cache length.
Other models (TL 3.x ``HookedTransformer``) report ``supported() == False`` and the engine recomputes the whole
sequence instead (same numbers, slower).

transformers 5.24 renamed the attention modules' cache argument from ``past_key_values`` to ``cache``; TL 4.3's
attention bridges still read ``past_key_values``, so without help they silently skip the cache update (every cached
step would attend to itself alone). While our cached forward runs, a forward pre-hook on each attention bridge hands
it the cache under the old name as well. ``supported()`` probes the model once and reports ``False`` if the cache
still does not grow as it should, so the engine falls back to recomputing rather than returning wrong numbers.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

_PROBED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _is_bridge(model: Any) -> bool:
    return hasattr(model, "original_model") and type(model).__name__ == "TransformerBridge"


def supported(model: Any) -> bool:
    """Whether ``model`` can run a forward pass on top of a cache of earlier positions (probed once per model)."""
    if not _is_bridge(model):
        return False
    if model not in _PROBED:
        ok = False
        try:
            probe = torch.zeros(1, 2, dtype=torch.long, device=model.W_U.device)
            with torch.no_grad():
                _, cache = _forward(model, probe[:, :1], None)
                _, cache = _forward(model, probe[:, 1:], cache)
            ok = cache is not None and int(cache.get_seq_length()) == 2
        except Exception:  # noqa: BLE001 - any failure means: recompute instead
            ok = False
        _PROBED[model] = ok
    return _PROBED[model]


@contextlib.contextmanager
def _cache_alias(model: Any) -> Iterator[None]:
    """Hand every attention bridge the cache as ``past_key_values`` too (see the module docstring); removed on exit."""

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()
               if hasattr(m, "_update_kv_cache")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: Any, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs["past_key_values"] = cache
    with _cache_alias(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        return model(tokens, return_type="logits_and_cache", **kwargs)


def forward(model: Any, tokens: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
    """Logits of ``tokens`` (continuing ``cache`` if given) and the cache extended by them."""
    before = 0 if cache is None else int(cache.get_seq_length())
    logits, new_cache = _forward(model, tokens, cache)
    if new_cache is None or int(new_cache.get_seq_length()) != before + tokens.shape[1]:
        raise RuntimeError("the model's KV cache did not grow by the tokens fed; run without the cache "
                           "(use_kv_cache=False).")
    return logits, new_cache


def repeat(cache: Any, n: int) -> Any:
    """A new cache holding every row of ``cache`` (batch 1) ``n`` times; ``cache`` itself is left unchanged."""
    from transformers import DynamicCache

    layers = getattr(cache, "layers", None)
    if layers is None or not all(getattr(layer, "keys", None) is not None for layer in layers):
        raise RuntimeError(f"unsupported KV cache type {type(cache).__name__}.")
    with torch.no_grad():
        data = [(layer.keys.expand(n, *layer.keys.shape[1:]).contiguous(),
                 layer.values.expand(n, *layer.values.shape[1:]).contiguous()) for layer in layers]
    return DynamicCache(ddp_cache_data=data)


def native_cache_works(model: Any) -> bool:
    """Whether the bridge's KV cache works without the ``_cache_alias`` shim (i.e. TL's own cached ``generate``)."""
    if not _is_bridge(model):
        return False
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.W_U.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        _, cache = model(probe, return_type="logits_and_cache", use_cache=True)
    return cache is not None and int(cache.get_seq_length()) == 1
