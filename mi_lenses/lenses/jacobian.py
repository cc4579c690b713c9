"""The Jacobian lens (Gurnee et al. 2026, TransformerLens 4.3's ``tools.analysis.jacobian_lens``): each row's state is
transported to the final residual stream by the corpus-averaged Jacobian ``J_l`` and decoded through the model's own
final norm and unembedding, ``lens(h_l) = decode(J_l h_l)``. ``J_l = I`` is the logit lens.

The estimator is the reference one (TransformerLens's ``JacobianLens.fit``, after anthropics/jacobian-lens):

    J_l = mean over prompts of  1/|V| sum_{t in V} sum_{t' in V, t' >= t}  d h_final[t'] / d h_l[t]

with ``V`` the positions after ``skip_first_positions`` and before the last one. It runs one forward pass per prompt
(replicated ``dim_batch`` times) and ``ceil(d_model / dim_batch)`` backward passes that plant a one-hot cotangent
for one output dimension at every position of ``V`` at once (causality sums over ``t' >= t``).

Two ways to fit one, both returning our :class:`JacobianLens` (a :class:`~mi_lenses.lenses.rowmap.RowMapLens`
returning the usual ``LensResult``):

* ``backend="native"`` (default): our implementation of the estimator on any TransformerLens model, both worlds,
  raw or compatibility mode, with the embedding row too;
* ``backend="transformer_lens"``: TransformerLens's own ``JacobianLens.fit`` (TL >= 4.3; it needs a raw
  ``TransformerBridge``), wrapped with :meth:`JacobianLens.from_transformer_lens`. TransformerLens 3.x has no
  Jacobian lens: there the native backend is the only one.

TransformerLens's layer ``l`` (output of block ``l``) is our row ``l + 1``; its lenses have no embedding row.

Example:
    >>> lens = mi_lenses.fit_jacobian_lens(model, ["The capital of France is Paris, a city"] * 2,
    ...                                    skip_first_positions=2, progress=False)
    >>> lens.rows                                   # embed, the input of every block, and the final row (identity)
    [0, 1, 2, 3]
    >>> res = lens(model, "The capital of France is")   # the usual LensResult
    >>> res.lens_name, float(res.kl[-1].abs().max())
    ('jacobian lens', 0.0)
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import RowMapLens
from mi_lenses.models.batch import check_context
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView
from mi_lenses.progress import track

Backend = Literal["native", "transformer_lens"]


class JacobianLens(RowMapLens):
    """Corpus-averaged Jacobians ``J_r`` per row, ``h -> J_r h`` (no bias), the final row the identity."""

    name = "jacobian lens"
    kind = "jacobian"
    final_identity = True

    @classmethod
    def identity(cls, model: Any) -> "JacobianLens":
        """Every ``J = I``: exactly the logit lens (a reference point and a test identity)."""
        view = ModelView(model)
        eye = torch.eye(view.d_model)
        return cls({r: eye for r in range(view.n_layers)}, n_layers=view.n_layers, d_model=view.d_model,
                   meta=model_identity(view))

    @classmethod
    def from_transformer_lens(cls, tl_lens: Any, model: Any) -> "JacobianLens":
        """Wrap a TransformerLens ``JacobianLens`` (fitted, or loaded from an artifact): its layer ``l`` (output of
        block ``l``) becomes our row ``l + 1``; it has no embedding row. Checked against ``model``."""
        view = ModelView(model)
        if int(tl_lens.d_model) != view.d_model:
            raise LensInputError(f"the TransformerLens Jacobian lens has d_model {tl_lens.d_model}, the model "
                                 f"{view.d_model}: it belongs to another model.")
        bad = [l for l in tl_lens.source_layers if not 0 <= l < view.n_layers - 1]
        if bad:
            raise LensInputError(f"the TransformerLens Jacobian lens has layers {bad} outside 0..{view.n_layers - 2} "
                                 "of this model: it belongs to another model.")
        meta = {**model_identity(view), "fitted_by": "transformer_lens", "n_prompts": int(tl_lens.n_prompts),
                "transformer_lens": {k: v for k, v in tl_lens.metadata.items() if isinstance(v, (str, int, float))}}
        return cls({l + 1: m for l, m in tl_lens.jacobians.items()}, n_layers=view.n_layers, d_model=view.d_model,
                   meta=meta)


def fit_jacobian_lens(
    model: Any,
    data: Any,
    *,
    backend: Backend = "native",
    rows: Sequence[int] | None = None,
    max_tokens: int | None = 4096,
    seq_len: int = 128,
    skip_first_positions: int = 16,
    dim_batch: int = 8,
    progress: bool = True,
) -> JacobianLens:
    """Fit a :class:`JacobianLens` on ``data`` with the reference estimator (see the module docstring).

    Args:
        model: a TransformerLens model or a ``ModelView`` (a raw ``TransformerBridge`` for the
            ``"transformer_lens"`` backend).
        data: prompts (a list of strings, each truncated to ``seq_len`` tokens), or a text source for
            :func:`~mi_lenses.data.load_tokens` / token ids ``[n_seq, seq_len]`` (native backend).
        backend: ``"native"`` or ``"transformer_lens"`` (TL >= 4.3's ``JacobianLens.fit``; raw bridges, prompts
            as strings).
        rows: lens rows to fit (0 = embeddings ... ``n_layers - 1``; default all; native backend).
        max_tokens: read at most this many tokens of a text source.
        skip_first_positions: leading positions left out of the source average (attention sinks), as the
            reference.
        dim_batch: output dimensions per backward pass (memory, not FLOPs).
        progress: show a progress bar over the prompts.
    """
    view = ModelView(model)
    if backend not in ("native", "transformer_lens"):
        raise LensInputError(f"backend must be 'native' or 'transformer_lens', got {backend!r}.")
    for name, v in (("seq_len", seq_len), ("dim_batch", dim_batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LensInputError(f"{name} must be a positive int, got {v!r}.")
    if not isinstance(skip_first_positions, int) or skip_first_positions < 0:
        raise LensInputError(f"skip_first_positions must be an int >= 0, got {skip_first_positions!r}.")
    if backend == "transformer_lens":
        return _fit_with_transformer_lens(view, data, seq_len=seq_len, skip=skip_first_positions,
                                          dim_batch=dim_batch, progress=progress)

    L = view.n_layers
    rows = list(range(L)) if rows is None else sorted({int(r) % (L + 1) for r in rows})
    if not rows or L in rows:
        raise LensInputError(f"rows must lie in 0..{L - 1} (the final row's transport is the identity).")
    sums = {r: torch.zeros(view.d_model, view.d_model, dtype=torch.float64) for r in rows}
    n_done = 0
    sequences = list(_sequences(view, data, seq_len, max_tokens))

    for tokens in track(sequences, "fitting Jacobian lens", unit="prompt", enabled=progress):
        S = tokens.shape[-1]
        valid = list(range(skip_first_positions, S - 1))
        if not valid:
            continue
        jac, _, _ = residual_jacobians(view, tokens, rows, sources=valid, targets=valid, dim_batch=dim_batch)
        for r in rows:
            sums[r] += jac[r]
        n_done += 1
    if n_done == 0:
        raise LensInputError(f"every prompt was too short: each needs more than skip_first_positions + 1 = "
                             f"{skip_first_positions + 1} tokens. Pass longer text or a smaller skip_first_positions.")
    meta = {**model_identity(view), "fitted_by": "mi_lenses", "n_prompts": n_done, "seq_len": seq_len,
            "skip_first_positions": skip_first_positions}
    return JacobianLens({r: (sums[r] / n_done).float() for r in rows}, n_layers=L, d_model=view.d_model, meta=meta)


def residual_jacobians(
    view: ModelView,
    tokens: Tensor,
    rows: Sequence[int],
    *,
    sources: Sequence[int],
    targets: Sequence[int],
    dim_batch: int = 8,
) -> tuple[dict[int, Float[Tensor, "d d"]], dict[int, Float[Tensor, "s d"]], Float[Tensor, "t d"]]:
    """Jacobians of the final residual stream with respect to the residual rows ``rows`` of one prompt ``[1, S]``:
    ``J_r[i, j] = mean_{t in sources} sum_{t' in targets, t' >= t} d h_final[t', i] / d h_r[t, j]`` (float64),
    with the rows' states at ``sources`` and the final states at ``targets`` of the same (unpatched) run.

    One forward pass of the prompt replicated ``dim_batch`` times, then ``ceil(d_model / dim_batch)`` backward
    passes, each with a one-hot cotangent for ``dim_batch`` output dimensions at every target position. The model's
    parameters are frozen meanwhile (so the graph starts at the earliest row) and restored on exit; the hooks are
    removed also on exceptions.
    """
    d = view.d_model
    all_rows = view.residual_rows("resid_pre")
    names = {r: all_rows[r].hook_name for r in rows}
    final = all_rows[-1].hook_name
    root = names[min(rows)]
    tokens = tokens.reshape(1, -1).to(view.device)
    captured: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(act: Tensor, hook: Any = None) -> Tensor:  # keyed by our name: a bridge reports its own alias
            if name == root and not act.requires_grad:
                act.requires_grad_(True)
            captured[name] = act
            return act
        return hook

    src = torch.tensor(list(sources), dtype=torch.long)
    tgt = torch.tensor(list(targets), dtype=torch.long)
    saved = [(p, p.requires_grad) for p in view.model.parameters()]
    out = {r: torch.zeros(d, d, dtype=torch.float64) for r in rows}
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        hooks = [(n, capture(n)) for n in dict.fromkeys([*names.values(), final])]
        with torch.enable_grad(), view.model.hooks(fwd_hooks=hooks):
            view.model(tokens.expand(dim_batch, -1), return_type=None)
            target = captured[final]
            inputs = [captured[names[r]] for r in rows]
            cot = torch.zeros_like(target)
            n_pass = -(-d // dim_batch)
            b = torch.arange(dim_batch, device=target.device)
            for k in range(n_pass):
                lo, n = k * dim_batch, min(dim_batch, d - k * dim_batch)
                cot.zero_()
                cot[b[:n, None], tgt[None, :].to(target.device), lo + b[:n, None]] = 1.0
                grads = torch.autograd.grad(target, inputs, cot, retain_graph=k < n_pass - 1)
                for r, g in zip(rows, grads):
                    out[r][lo : lo + n] = g[:n, src.to(g.device)].double().mean(1).cpu()
        states = {r: captured[names[r]][0, src].detach().float().cpu() for r in rows}
        final_states = target[0, tgt].detach().float().cpu()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        captured.clear()
    return out, states, final_states


def _sequences(view: ModelView, data: Any, seq_len: int, max_tokens: int | None):
    """``[1, S]`` token rows from prompts (strings), token ids or a text source."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, str) for p in data):
        for p in data:
            tokens = view.to_tokens(p)[:, :seq_len]
            check_context(view, tokens.shape[1], "a fitting prompt (cut to seq_len tokens)",
                          fix="Pass a smaller seq_len.")
            yield tokens
        return
    if isinstance(data, Tensor):
        tokens = data if data.ndim == 2 else data[None]
    else:
        tokens = load_tokens(data, view, seq_len, max_tokens=max_tokens)
    for row in tokens:
        yield row[None]


def _fit_with_transformer_lens(view: ModelView, data: Any, *, seq_len: int, skip: int, dim_batch: int,
                               progress: bool) -> JacobianLens:
    try:
        # deferred: TransformerLens >= 4.3 only (the native backend needs none of it)
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens
    except ImportError as err:
        raise LensInputError(
            "this TransformerLens has no Jacobian lens (it arrived in TransformerLens 4.3): use backend='native', "
            "which fits the same estimator on any TransformerLens model.") from err
    if not (isinstance(data, (list, tuple)) and data and all(isinstance(p, str) for p in data)):
        raise LensInputError("backend='transformer_lens' takes the prompts as a list of strings (TransformerLens "
                             "tokenises them itself).")
    try:
        tl = TLJacobianLens.fit(view.model, list(data), corpus="mi_lenses", dim_batch=dim_batch, max_seq_len=seq_len,
                                skip_first_positions=skip, show_progress=progress)
    except (TypeError, ValueError) as err:
        raise LensInputError(f"TransformerLens's Jacobian lens refused this model ({err}). It needs a raw "
                             "TransformerBridge: mi_lenses.load_model(..., compatibility_mode=False), or use "
                             "backend='native'.") from err
    return JacobianLens.from_transformer_lens(tl, view.model)
