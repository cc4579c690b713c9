"""The Future Lens (Pal et al. 2023, "Future Lens: Anticipating Subsequent Tokens from a Single Hidden State"),
linear model approximation: from the state ``h_l[t]`` of one row at position ``t``, predict the final residual
stream ``h_final[t + N]`` with an affine map fitted by least squares on a corpus, and decode it through the model's
own final norm and unembedding. It then predicts token ``t + N + 1``: ``N = 0`` is the next token (a map fitted
with ``N = 0`` is a least-squares tuned lens; the identity map with ``N = 0`` is the logit lens).

The fit is the paper's closed form (centred least squares, ``linear_methods/linear_hs.py``), accumulated as normal
equations in float64 over the corpus, so memory does not grow with its length; a small ridge keeps the solve stable.
Running the lens returns the usual ``LensResult`` whose KL, cross-entropy, ranks and surprisal are taken against the
model at position ``t + N`` (``Lens.ahead``); precision@k per layer and ``N`` comes from
:func:`mi_lenses.compare_lenses` with ``top_k=(1, 5, 10)``.

Not implemented: the paper's learned-prompt causal method (a soft prompt trained per layer through the whole
model); its fixed-prompt variant is the ``presets.future_lens`` Patchscope.

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    >>> lens = mi_lenses.fit_future_lens(model, tokens, ahead=1, progress=False)
    >>> res = lens(model, "The capital of France is")
    >>> res.ahead, bool(res.kl[:, 0, -1].isnan().all())      # the last token has no position t + 1 to compare with
    (1, True)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import RowMapLens
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView
from mi_lenses.progress import track


class FutureLens(RowMapLens):
    """Affine maps per row from ``h_r[t]`` to the final residual stream at ``t + ahead`` (every row, the final one
    included, is mapped)."""

    name = "future lens"
    kind = "future"
    maps_final = True

    @classmethod
    def identity(cls, model: Any, ahead: int = 0) -> "FutureLens":
        """``W = I, b = 0`` on every row: the logit lens, read as a prediction ``ahead`` tokens further."""
        view = ModelView(model)
        eye = torch.eye(view.d_model)
        return cls({r: eye for r in range(view.n_layers + 1)}, n_layers=view.n_layers, d_model=view.d_model,
                   ahead=ahead, meta=model_identity(view))


class NormalEquations:
    """Streaming least squares with an intercept, ``Y ~ X W^T + b``: accumulates ``[X 1]^T [X 1]`` and ``[X 1]^T Y``
    in float64; :meth:`solve` adds ``ridge * mean(diag(X^T X))`` to the diagonal of the ``X`` block (not the
    intercept).

    >>> ne = NormalEquations(3, 2)
    >>> X = torch.randn(50, 3, dtype=torch.float64); A = torch.randn(2, 3, dtype=torch.float64)
    >>> ne.add(X[:20], X[:20] @ A.T + 1.0); ne.add(X[20:], X[20:] @ A.T + 1.0)
    >>> W, b = ne.solve(ridge=0.0)
    >>> bool(torch.allclose(W, A.float(), atol=1e-5)), bool(torch.allclose(b, torch.ones(2), atol=1e-5))
    (True, True)
    """

    def __init__(self, d_in: int, d_out: int):
        self.xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.n = 0

    def add(self, X: Tensor, Y: Tensor) -> None:
        X = torch.cat([X.double().cpu(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
        self.xtx += X.T @ X
        self.xty += X.T @ Y.double().cpu()
        self.n += len(X)

    def solve(self, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
        """``(W [d_out, d_in], b [d_out])`` in float32."""
        if self.n == 0:
            raise LensInputError("no training pairs: pass more text (each sequence needs more than `ahead` tokens).")
        d = self.xtx.shape[0] - 1
        reg = torch.zeros_like(self.xtx)
        reg[:d, :d] = torch.eye(d, dtype=torch.float64) * ridge * torch.diagonal(self.xtx)[:d].mean()
        sol = torch.linalg.lstsq(self.xtx + reg, self.xty).solution if ridge == 0 else \
            torch.linalg.solve(self.xtx + reg, self.xty)
        return sol[:d].T.float().contiguous(), sol[d].float().contiguous()


def fit_future_lens(
    model: Any,
    data: Any,
    *,
    ahead: int = 1,
    rows: Sequence[int] | None = None,
    max_tokens: int | None = 16384,
    seq_len: int = 128,
    batch_size: int = 4,
    ridge: float = 1e-6,
    progress: bool = True,
) -> FutureLens:
    """Fit a linear :class:`FutureLens` predicting ``ahead`` tokens further than the next one (see the module
    docstring): for every row ``r`` (0 = embeddings ... ``n_layers`` = final; default all), least squares from
    ``h_r[t]`` to ``h_final[t + ahead]`` over every ``t`` of ``data`` (a text source for
    :func:`~mi_lenses.lenses.tuned.data.load_tokens`, or token ids ``[n_seq, seq_len]``).

    Args:
        model: a TransformerLens model or a ``ModelView``.
        data: the corpus fitted on: a text source or token ids ``[n_seq, seq_len]``.
        ahead: how many tokens beyond the next one the lens predicts (0: the next token, as the logit lens).
        rows: the residual rows fitted (0 = embeddings .. ``n_layers`` = final, negative from the end); default all.
        max_tokens, seq_len: read at most ``max_tokens`` tokens of a text source (default 16384; ``None``: all of
            it), packed into sequences of ``seq_len`` (which must exceed ``ahead``).
        batch_size: sequences per forward pass.
        ridge: the ridge penalty, relative to the mean diagonal of ``X^T X`` (0: plain least squares).
        progress: show a progress bar over the batches.

    Returns:
        :class:`FutureLens`, one ``W, b`` per fitted row.
    """
    view = ModelView(model)
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
        raise LensInputError(f"ahead must be an int >= 0 (0 = the next token), got {ahead!r}.")
    L = view.n_layers
    rows = list(range(L + 1)) if rows is None else sorted({int(r) % (L + 1) for r in rows})
    tokens = data if isinstance(data, Tensor) else load_tokens(data, view, seq_len, max_tokens=max_tokens)
    if tokens.ndim != 2 or tokens.shape[1] <= ahead:
        raise LensInputError(f"the fit needs sequences longer than ahead={ahead}, got tokens {tuple(tokens.shape)}.")
    all_rows = view.residual_rows("resid_pre")
    names = {r: all_rows[r].hook_name for r in rows}
    final = all_rows[-1].hook_name
    eqs = {r: NormalEquations(view.d_model, view.d_model) for r in rows}
    S = tokens.shape[1]
    for b0 in track(range(0, len(tokens), batch_size), "fitting Future Lens", unit="batch", enabled=progress):
        tb = tokens[b0 : b0 + batch_size].to(view.device)
        _, cache = view.run_with_cache(view.batch(tb), {*names.values(), final})
        Y = cache[final][:, ahead:].reshape(-1, view.d_model)
        for r in rows:
            eqs[r].add(cache[names[r]][:, : S - ahead].reshape(-1, view.d_model), Y)
    W, b = {}, {}
    for r in rows:
        W[r], b[r] = eqs[r].solve(ridge)
    meta = {**model_identity(view), "fitted_by": "mi_lenses", "method": "linear (least squares)",
            "n_pairs": eqs[rows[0]].n, "ridge": ridge}
    return FutureLens(W, b, n_layers=L, d_model=view.d_model, ahead=ahead, meta=meta)
