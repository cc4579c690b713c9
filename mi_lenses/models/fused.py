"""Fused attention for the forward passes that read no attention hook.

TransformerLens 4.x boots every Hugging Face model with eager attention and re-implements the attention of most
architectures (``PositionEmbeddingsAttentionBridge``) so that ``hook_attn_scores`` and ``hook_pattern`` fire: each
layer builds its ``[batch, heads, pos, pos]`` scores and runs several element-wise passes over them (mask, softmax,
NaN scrub). Past a few thousand tokens that dominates the forward pass, quadratically: on 4,096 tokens of SmolLM2 (2
cores) a forward pass takes 75 s that way and 10.5 s with PyTorch's fused ``scaled_dot_product_attention``
(``benchmarks/bench_long_prompt.py``).

A forward pass that caches no hook inside the attention (a lens reads the residual stream only) gains nothing from
it: :func:`fused_attention` runs such a pass through the wrapped Hugging Face attention modules with SDPA, while
every hook outside the attention, and ``hook_q``/``hook_k``/``hook_v``/``hook_z`` inside it, still fires. It is used
only where it is known to give the model's own numbers: a bridge whose attention is the re-implemented kind, in
float32, without left padding, sliding windows or chunked attention, with no hook of anyone's (cached or the user's)
inside an attention module, and once per model a probe on a short sequence must agree with the eager pass
(log-probabilities within ``PROBE_ATOL``). Anywhere else it changes nothing.

Example:
    >>> view = ModelView(model)
    >>> batch = view.batch("The capital of France is")
    >>> with torch.no_grad():
    ...     eager = model(batch.tokens)
    ...     with fused_attention(view, batch, ["blocks.0.hook_resid_pre"]):
    ...         fused = model(batch.tokens)
    >>> bool(torch.allclose(eager, fused, atol=1e-4))
    True
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from mi_lenses.models.interventions import active_hooks
from mi_lenses.models.masks import attention_masks

if TYPE_CHECKING:
    from mi_lenses.models.batch import Batch
    from mi_lenses.models.view import ModelView

PROBE_TOKENS = 16
PROBE_ATOL = 1e-3  # |log-prob| gap (nats) between the fused and the eager pass; float32 measures ~1e-5 on SmolLM2
REIMPLEMENTED = "PositionEmbeddingsAttentionBridge"  # TransformerLens's own attention, the one that fires the pattern
FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in")  # hooks only the re-implementation fires

_PROBED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def fused_attention(view: "ModelView", batch: "Batch", names: Iterable[str]) -> contextlib.AbstractContextManager:
    """A context in which the forward passes of ``view``'s model run fused attention, when a pass over ``batch``
    caching ``names`` gives the same numbers that way (see the module docstring); else a context that does nothing."""
    if not _eligible(view, batch, names) or not _probe(view):
        return contextlib.nullcontext()
    return _native(view.model)


def _eligible(view: "ModelView", batch: "Batch", names: Iterable[str]) -> bool:
    model = view.model
    config = getattr(getattr(model, "original_model", None), "config", None)
    if not view.is_bridge or config is None or getattr(config, "_attn_implementation", None) != "eager":
        return False
    if view.dtype != torch.float32 or batch.left_padded or any(getattr(view.cfg, f, False) for f in FLAGS):
        return False
    if any(".attn." in name or name.endswith("hook_attn_in") for name in names):
        return False
    if any(not m.is_causal or m.sinks is not None or m.score_cap is not None for m in attention_masks(model)):
        # masks the 16-token probe cannot see (windows and chunks longer than it), and what SDPA does not compute
        # (learned attention sinks, Gemma 2's soft-capped scores): keep the eager pass
        return False
    attns = _attentions(model)
    return attns is not None and all(getattr(a.original_component, "config", None) is config and not _hooked(a)
                                     for a in attns)


def _hooked(module: Any) -> bool:
    """Whether a hook sits inside ``module`` (a TransformerLens hook point's, or a plain torch hook), besides the
    output-capturing hooks transformers installs on its own modules."""
    return any(not str(getattr(fn, "__module__", "")).startswith("transformers.")
               for m in module.modules() for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _attentions(model: Any) -> list[Any] | None:
    """Every block's attention bridge, or None when one is not TransformerLens's re-implemented attention."""
    attns = [getattr(block, "attn", None) for block in getattr(model, "blocks", [])]
    if not attns or any(type(a).__name__ != REIMPLEMENTED for a in attns):
        return None
    return attns


@contextlib.contextmanager
def _native(model: Any) -> Iterator[None]:
    """Each attention bridge delegates to its Hugging Face module (TransformerLens's ``AttentionBridge.forward``:
    ``hook_in``, the module, ``hook_out``), which runs SDPA; both restored on exit, also on exceptions."""
    config = model.original_model.config
    attns = _attentions(model)
    base = next(c for c in type(attns[0]).__mro__ if c.__name__ == "AttentionBridge").forward
    before = config._attn_implementation
    try:
        for a in attns:  # object.__setattr__: a bridge component forwards attribute writes to the wrapped module
            object.__setattr__(a, "forward", types.MethodType(base, a))
        config._attn_implementation = "sdpa"
        yield
    finally:
        config._attn_implementation = before
        for a in attns:
            a.__dict__.pop("forward", None)


def _probe(view: "ModelView") -> bool:
    """Once per model: the fused pass's log-probabilities on ``PROBE_TOKENS`` tokens against the eager pass's."""
    model = view.model
    if model not in _PROBED:
        if active_hooks(model):
            return False  # the probe would run the user's hooks: probe at a later call, when they are gone
        tokens = (torch.arange(1, PROBE_TOKENS + 1, device=view.device) * 997 % view.d_vocab)[None]
        with torch.no_grad():
            eager = model(tokens).float().log_softmax(-1)
            try:
                with _native(model):
                    fused = model(tokens).float().log_softmax(-1)
                ok = bool((fused - eager).abs().max() <= PROBE_ATOL)
            except (TypeError, AttributeError, RuntimeError, ValueError, IndexError, AssertionError):
                ok = False  # the wrapped module cannot run this way here: the eager pass stays
        _PROBED[model] = ok
    return _PROBED[model]
