"""The user's own interventions: which TransformerLens hooks are active on a model when an analysis starts.

Every analysis runs on the model as the user has hooked it (``model.add_hook(...)``, ``with model.hooks(...)``): our
forward passes add their hooks *after* the user's (TransformerLens's ``hooks()`` context and ``run_with_cache`` remove
only the hooks of their own context level), so a user's hook fires first and every cached activation is the one the
hooked model computed. :func:`active_hooks` names those hooks so that results can record them (``res.active_hooks``,
the page and the JSON), and so that an engine can tell an identity broken by a user's hook from a bug of ours.

Example:
    >>> def ablate(z, hook):
    ...     z[:, :, 0] = 0.0
    ...     return z
    >>> with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
    ...     active_hooks(model)
    ['blocks.1.attn.hook_z']
    >>> active_hooks(model)
    []
"""

from __future__ import annotations

from typing import Any

import torch


def hook_point_names(model: Any) -> dict[int, str]:
    """One name per distinct hook point of ``model`` (keyed by ``id``): a ``TransformerBridge`` lists each point under
    its own name and its TransformerLens aliases (``blocks.1.attn.o.hook_in`` is ``blocks.1.attn.hook_z``,
    ``blocks.1.hook_in`` is ``blocks.1.hook_resid_pre``); the alias with the fewest dots, then not a bridge's generic
    ``hook_in`` / ``hook_out``, then the shortest, is the name users write."""
    names: dict[int, str] = {}
    for name, point in getattr(model, "hook_dict", {}).items():
        key = id(point)
        best = names.get(key)
        if best is None or _preference(name) < _preference(best):
            names[key] = name
    return names


def _preference(name: str) -> tuple[int, bool, int]:
    return name.count("."), name.rsplit(".", 1)[-1] in ("hook_in", "hook_out"), len(name)


def active_hooks(model: Any) -> list[str]:
    """The hook points that hold a hook right now, in the model's order: ``"name"`` for forward hooks, with
    ``" ×n"`` when ``n`` hooks sit on one point and ``" (backward)"`` for backward hooks. Call it before adding
    hooks of your own: it cannot tell whose a hook is."""
    model = model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)  # a ModelView's model
    seen: set[int] = set()
    counts: list[tuple[int, str, int]] = []  # (point id, suffix, number of hooks)
    # a bridge's hook_dict copies its registry and adds every alias on each access (4 ms on SmolLM2): scan the
    # registry (the same points) and name them only when a hook is found
    registry = getattr(model, "_hook_registry", None)
    points = registry if isinstance(registry, dict) else getattr(model, "hook_dict", {})
    for point in points.values():
        key = id(point)
        if key in seen:
            continue
        seen.add(key)
        for kind, suffix in (("fwd_hooks", ""), ("bwd_hooks", " (backward)")):
            handles = getattr(point, kind, None)
            n = sum(not _bridge_wiring(h) for h in handles) if handles else 0
            if n:
                counts.append((key, suffix, n))
    if not counts:  # the usual case: no need to name the 1,700 points of a bridge
        return []
    names = hook_point_names(model)
    return [f"{names[key]}{f' ×{n}' if n > 1 else ''}{suffix}" for key, suffix, n in counts]


def _bridge_wiring(handle: Any) -> bool:
    """Whether a hook is the bridge's own wiring, not a user's: TransformerLens 4.x adds permanent hooks of its own at
    boot (``component_setup._wire_symbolic_hooks`` mirrors OPT's fc-split MLP ``in``/``out`` hooks onto
    ``mlp.hook_in``/``hook_mlp_out``)."""
    fn = getattr(handle, "user_hook", None)
    return str(getattr(fn, "__module__", "") or "").startswith("transformer_lens.model_bridge")


def module_hooked(module: Any) -> bool:
    """Whether a plain torch hook (``register_forward_hook`` / ``register_forward_pre_hook``) sits on ``module`` or
    inside it: :func:`active_hooks` lists only TransformerLens hook points."""
    if not isinstance(module, torch.nn.Module):
        return False
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def hooked_names(model: Any) -> set[str]:
    """The bare names of the hook points :func:`active_hooks` lists (forward or backward)."""
    return {entry.split(" ")[0] for entry in active_hooks(model)}


def recorded(result: Any, hooks: list[str] | tuple[str, ...]) -> Any:
    """``result`` with ``active_hooks`` set to ``hooks`` (what :func:`active_hooks` listed when the entry point
    started), returned for a one-line ``return recorded(Result(...), hooks)``."""
    result.active_hooks = tuple(hooks)
    return result
