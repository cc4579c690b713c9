"""A Patchscope read as a lens: every row's state is patched into a target prompt at the same row of the same model
(``l* = l``, ``f`` = identity), and the lens's hidden state is the target's final residual stream at its last
position, decoded by the model's own final norm and unembedding. Running it returns the usual ``LensResult``, so the
Patchscope gets every statistic of the other lenses (KL to the model's output, cross-entropy, ranks, surprisal,
precision@1) on the same rows: ``mi_lenses.compare_lenses`` puts them side by side.

Rows follow the lens convention: row ``l`` (``l_pre``, or ``l-1_post``) is patched where the target run has that
same residual state; the embedding row is patched at the input of block 0. A target with a fixed ``layer`` (SelfIE)
is patched at that layer's output for every row.

Example:
    >>> res = mi_lenses.PatchscopeLens()(model, "The capital of France is")   # the token-identity target
    >>> logit = mi_lenses.logit_lens(model, "The capital of France is")
    >>> bool(torch.allclose(res.top_logits[-1], logit.top_logits[-1], atol=1e-4))   # identity at the last row
    True
    >>> mi_lenses.PatchscopeLens(mi_lenses.presets.identity_q()).name
    'patchscope (identity_q)'
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.lens import Lens, register_lens
from mi_lenses.models.view import ModelView, ResidualRow
from mi_lenses.patchscopes.presets import identity, identity_q
from mi_lenses.patchscopes.run import patched_runs
from mi_lenses.patchscopes.spec import POINT, ResolvedTarget, Target, resolve_layer, resolve_target


class PatchscopeLens(Lens):
    """Patch each row's state into ``target`` (default: the token-identity preset) and read the target's last
    position. ``chunk`` patched rows run per forward pass; the unpatched target prefix is shared (KV cache)."""

    maps_final = True

    def __init__(self, target: Target | None = None, *, chunk: int = 256, use_kv_cache: bool = True):

        self.target = target if target is not None else identity()
        if not isinstance(self.target, Target):
            raise LensInputError(f"expected a Target (e.g. mi_lenses.presets.identity()), got {self.target!r}.")
        if self.target.model is not None or self.target.map is not None:
            raise LensInputError("a PatchscopeLens patches into the model it reads (M* = M, f = identity); use "
                                 "mi_lenses.patchscope()/sweep() for another target model or a map.")
        if not isinstance(chunk, int) or chunk < 1:
            raise LensInputError(f"chunk must be a positive int, got {chunk!r}.")
        self.name = f"patchscope ({self.target.name})"
        self.chunk, self.use_kv_cache = chunk, use_kv_cache
        self._bound: tuple[Any, ResolvedTarget, str | None] | None = None

    def bind(self, model: Any) -> "PatchscopeLens":
        view = ModelView(model)
        rt = resolve_target(self.target, view)
        fixed = None if self.target.layer is None else \
            view.hook_name(POINT, resolve_layer(view, self.target.layer, "target layer"))
        out = PatchscopeLens(self.target, chunk=self.chunk, use_kv_cache=self.use_kv_cache)
        out._bound = (view.model, rt, fixed)
        return out

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        if self._bound is None:
            raise LensInputError("bind the PatchscopeLens to a model first (running it through run_lens does).")
        model, rt, fixed = self._bound
        view = rt.view
        final = view.final_resid_hook
        name = fixed or row.hook_name
        out = torch.empty(hidden.shape[0], view.d_model)
        vectors = hidden.to(view.device, view.W_U.dtype)
        for a, b, _, state in patched_runs(rt, [name] * len(vectors), vectors, chunk=self.chunk,
                                           use_kv_cache=self.use_kv_cache, capture=final):
            out[a:b] = state.float().cpu()
        return out


register_lens("patchscope", lambda: PatchscopeLens(identity()))  # names of the comparison bench
register_lens("patchscope-q", lambda: PatchscopeLens(identity_q()))
