"""Hooks that write into the residual stream: one writer, used wherever mi_lenses patches a state into a run
(Patchscopes, the learned-prompt Future Lens, SelfIE). Our hooks are added with ``model.hooks(fwd_hooks=...)``, which
removes them on exit (also on exceptions) and leaves a user's own hooks active and in their order.

Example:
    >>> tokens = model.to_tokens("The capital of France is")
    >>> hooks = write_hooks(["blocks.1.hook_resid_post"], torch.zeros(1, model.cfg.d_model), [2])
    >>> with model.hooks(fwd_hooks=hooks):
    ...     _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    >>> float(cache["blocks.1.hook_resid_post"][0, 2].abs().max()), bool(cache["blocks.1.hook_resid_post"][0, 1].any())
    (0.0, True)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def write_hooks(names: Sequence[str], vectors: Float[Tensor, "N d"], positions: Sequence[int]) -> list[tuple[str, Callable]]:
    """One hook per distinct hook name in ``names`` (one per row of a batch of ``N`` rows); each writes its rows'
    vectors at ``positions`` of that hook's residual stream."""
    hooks = []
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    n_rows = len(names)
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)

        def hook(resid: Tensor, hook: Any = None, rows: Tensor = rows) -> Tensor:
            if resid.shape[0] != n_rows or resid.shape[1] <= int(pos.max()):
                raise RuntimeError(
                    f"patch hook saw a residual of shape {tuple(resid.shape)}; expected {n_rows} rows and "
                    f"more than {int(pos.max())} positions."
                )
            r, p = rows.to(resid.device), pos.to(resid.device)
            resid[r[:, None], p[None, :]] = vectors[rows].to(resid.device, resid.dtype)[:, None, :]
            return resid

        hooks.append((name, hook))
    return hooks
