"""KV caches of both TransformerLens worlds behind one small interface: a forward pass on top of a cache of earlier
positions, and a cache repeated over a batch (a shared prefix).

* ``TransformerBridge`` (TL 4.x, and 3.x's beta bridge) forwards ``past_key_values`` (a transformers ``DynamicCache``)
  to the wrapped HF model and returns the updated cache with ``return_type="logits_and_cache"``. transformers 5.24
  renamed the attention modules' cache argument to ``cache``; TL 4.3's attention bridges still read
  ``past_key_values`` and would silently skip the update, so while our cached forward runs a pre-hook on each
  attention bridge hands it the cache under the old name too.
* ``HookedTransformer`` (TL 3.x) keeps a ``TransformerLensKeyValueCache`` (``HookedTransformerKeyValueCache`` in
  older releases) that its forward pass extends in place; we always pass an explicit attention mask, so pad-token
  heuristics never mask a real token.

:func:`kv_cache` probes a model once (the cache must grow by the tokens fed) and returns ``None`` when it does not
work (with a warning saying why), so callers recompute the whole sequence instead: the same numbers, slower.

Example:
    >>> kv = kv_cache(model)
    >>> tokens = model.to_tokens("The capital of France is")
    >>> _, prefix = kv.forward(tokens[:, :3])
    >>> tail, _ = kv.forward(tokens[:, 3:], kv.repeat(prefix, 1))
    >>> bool(torch.allclose(tail, model(tokens)[:, 3:], atol=1e-4)), kv.length(prefix)
    (True, 3)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

from mi_lenses.models.masks import has_local_attention

_PROBED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def is_bridge(model: Any) -> bool:
    """True for a ``TransformerBridge`` (it wraps an HF model); False for a ``HookedTransformer``."""
    return hasattr(model, "original_model") or type(model).__name__ == "TransformerBridge"


class BridgeKV:
    """The HF ``DynamicCache`` of a ``TransformerBridge``."""

    def __init__(self, model: Any):
        self.model = model
        self._in_session = False
        self.keep_all_positions = has_local_attention(model)

    @contextlib.contextmanager
    def session(self) -> Iterator["BridgeKV"]:
        """Keep the argument-name shim installed across many cached forward passes (a generation loop), instead of
        installing and removing it on every step; removed on exit, also on exceptions."""
        if self._in_session:
            yield self
            return
        with _cache_alias(self.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
            self._in_session = True
            try:
                yield self
            finally:
                self._in_session = False

    def forward(self, tokens: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
        """Logits of ``tokens`` (continuing ``cache``) and the cache extended by them."""
        if cache is None and self.keep_all_positions:
            # a cache that keeps every position: transformers' default for sliding-window and chunked models
            # (Gemma 2, Mistral, Llama 4) drops keys outside the window or chunk, which TransformerLens's attention
            # bridges do not expect; the window is still applied, by the attention mask. Other models keep
            # transformers' own cache layout.
            from transformers import DynamicCache  # deferred: transformers is imported once a bridge exists

            cache = DynamicCache()
        kwargs: dict[str, Any] = {"use_cache": True}
        if cache is not None:
            kwargs["past_key_values"] = cache
        with self.session():
            return self.model(tokens, return_type="logits_and_cache", **kwargs)

    def repeat(self, cache: Any, n: int) -> Any:
        """A new cache holding the (batch 1) ``cache`` ``n`` times; ``cache`` itself is left unchanged. Every layer
        is repeated, of any kind: keys and values (attention), conv and recurrent states (state-space, linear
        attention layers of hybrid models)."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise RuntimeError(f"unsupported KV cache type {type(cache).__name__}.")
        new = copy.copy(cache)
        with torch.no_grad():
            new.layers = [_repeat_layer(layer, n) for layer in layers]
        return new

    @staticmethod
    def length(cache: Any) -> int:
        """Positions held: the most any layer holds (a hybrid's first layer may be a state-space one)."""
        if cache is None:
            return 0
        layers = [layer for layer in getattr(cache, "layers", None) or () if hasattr(layer, "get_seq_length")]
        return max([int(cache.get_seq_length()), *(int(layer.get_seq_length()) for layer in layers)])


# a cache layer's per-sequence states, batch first: keys and values, a sparse-attention indexer's keys (GLM-MoE-DSA),
# the conv / recurrent states of state-space and linear-attention layers (dicts of tensors per state)
_BATCHED = ("keys", "values", "indexer_keys", "conv_states", "recurrent_states")


def _repeat_layer(layer: Any, n: int) -> Any:
    """A copy of one (batch 1) cache layer holding it ``n`` times; every other tensor (a length counter updated in
    place) and dict of the layer is copied, so the original cache is left unchanged."""

    def rep(name: str, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.expand(n, *t.shape[1:]).contiguous() if name in _BATCHED and t.ndim > 1 else t.detach().clone()

    new = copy.copy(layer)
    for name, value in vars(layer).items():
        setattr(new, name, {k: rep(name, t) for k, t in value.items()} if isinstance(value, dict) else
                rep(name, value))
    return new


class HookedKV:
    """The ``TransformerLensKeyValueCache`` of a ``HookedTransformer``."""

    def __init__(self, model: Any):
        self.model = model
        try:
            # deferred: which module holds the cache depends on the TransformerLens world, known at run time
            from transformer_lens import TransformerLensKeyValueCache as cls
        except ImportError:  # TransformerLens 2.x
            from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as cls  # 2.x/3.x
        self.cls = cls

    @contextlib.contextmanager
    def session(self) -> Iterator["HookedKV"]:
        """Nothing to install for a ``HookedTransformer`` (the same interface as :meth:`BridgeKV.session`)."""
        yield self

    def forward(self, tokens: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
        if cache is None:
            cache = self.cls.init_cache(self.model.cfg, tokens.device, tokens.shape[0])
        mask = torch.ones_like(tokens)
        return self.model(tokens, past_kv_cache=cache, attention_mask=mask), cache

    def repeat(self, cache: Any, n: int) -> Any:
        entry_cls = type(cache.entries[0])
        with torch.no_grad():
            entries = [entry_cls(e.past_keys.expand(n, *e.past_keys.shape[1:]).contiguous(),
                                 e.past_values.expand(n, *e.past_values.shape[1:]).contiguous())
                       for e in cache.entries]
            mask = cache.previous_attention_mask.expand(n, -1).contiguous()
        return self.cls(entries=entries, previous_attention_mask=mask)

    @staticmethod
    def length(cache: Any) -> int:
        return 0 if cache is None else int(cache.entries[0].past_keys.shape[1])


def kv_cache(model: Any) -> BridgeKV | HookedKV | None:
    """The model's KV-cache adapter, or ``None`` (and a warning saying why) when cached forward passes do not work on
    it: probed once per model, the cache must grow by the tokens fed and a cached step of two tokens (a Patchscope feeds
    several) must give the logits of a full forward pass (the state-space layers of some hybrid models continue a
    cache only one token at a time)."""
    kv = BridgeKV(model) if is_bridge(model) else HookedKV(model)
    if model not in _PROBED:
        probe = torch.tensor([[1, 2, 3]], dtype=torch.long, device=model.W_U.device) % model.cfg.d_vocab
        with torch.no_grad():
            full = model(probe)[0, 1:].float()  # a plain forward pass: its failures are not the cache's, they raise
            try:
                _, cache = kv.forward(probe[:, :1])
                step, cache = kv.forward(probe[:, 1:], cache)
                length = kv.length(cache)
            except (TypeError, AttributeError, KeyError, RuntimeError, ValueError, IndexError, AssertionError) as err:
                # what a cached forward pass raises where this model (or this TransformerLens / transformers pair)
                # does not support the cache: an argument it does not take (TypeError), a cache object without what
                # it reads (AttributeError, KeyError), shapes that do not line up (RuntimeError, IndexError,
                # ValueError), TransformerLens's own shape assertions. Anything else raises.
                why = f"a cached forward pass fails ({type(err).__name__}: {err})"
            else:
                gap = float((step[0].float() - full).abs().max())
                why = (f"the cache holds {length} positions after 3 tokens" if length != 3 else
                       f"a cached step differs from a full pass by {gap:.2g}"
                       if not gap <= 1e-3 * float(full.abs().max()) + 1e-4 else "")
        if why:
            warnings.warn(f"mi_lenses: the KV cache of this model is not used ({why[:300]}): generation recomputes "
                          "the whole sequence at every step (the same numbers, slower).", stacklevel=2)
        _PROBED[model] = not why
    return kv if _PROBED[model] else None


def native_cache_works(model: Any) -> bool:
    """Whether a bridge's KV cache works without the argument-name shim (i.e. TransformerLens's own cached
    ``generate``); always True for a ``HookedTransformer``."""
    if not is_bridge(model):
        return True
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.W_U.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        _, cache = model(probe, return_type="logits_and_cache", use_cache=True)
    return cache is not None and int(cache.get_seq_length()) == 1


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
