"""Hook points that exist only behind a model flag: each attention head's own copy of the residual stream for its
query, key and value inputs (``blocks.l.hook_q_input`` ``[B, S, H, d]``, ``hook_k_input``/``hook_v_input`` with one
copy per key/value head), and the MLP's input (``blocks.l.hook_mlp_in``). Edge attribution and circuit ablation read
and write them. Both TransformerLens worlds have the flags (``set_use_split_qkv_input``, ``set_use_hook_mlp_in``);
:func:`split_inputs` turns them on for the duration of a ``with`` block and restores the user's settings on exit, also
on exceptions (``use_attn_in``, exclusive with the split inputs, is turned off meanwhile).

Example:
    >>> with split_inputs(model):
    ...     _, cache = model.run_with_cache(model.to_tokens("The capital"), names_filter="blocks.1.hook_k_input")
    >>> tuple(cache["blocks.1.hook_k_input"].shape[2:]) == (model.cfg.n_key_value_heads, model.cfg.d_model)
    True
    >>> bool(model.cfg.use_split_qkv_input)
    False
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def split_inputs(model: Any, *, mlp_in: bool = True) -> Iterator[None]:
    """Per-head Q/K/V input copies (and the MLP input hook, with ``mlp_in``) while the block runs."""
    model = getattr(model, "model", model) if not hasattr(model, "cfg") or not hasattr(model, "blocks") else model
    cfg = model.cfg
    names = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
    saved = {name: bool(getattr(cfg, name, False)) for name in names}
    try:
        if saved["use_attn_in"]:
            model.set_use_attn_in(False)
        if not saved["use_split_qkv_input"]:
            model.set_use_split_qkv_input(True)
        if mlp_in and not saved["use_hook_mlp_in"]:
            model.set_use_hook_mlp_in(True)
        yield
    finally:
        if bool(getattr(cfg, "use_split_qkv_input", False)) != saved["use_split_qkv_input"]:
            model.set_use_split_qkv_input(saved["use_split_qkv_input"])
        if bool(getattr(cfg, "use_hook_mlp_in", False)) != saved["use_hook_mlp_in"]:
            model.set_use_hook_mlp_in(saved["use_hook_mlp_in"])
        if saved["use_attn_in"]:
            model.set_use_attn_in(True)
