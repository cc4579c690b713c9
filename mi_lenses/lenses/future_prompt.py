"""The Future Lens's learned-prompt causal intervention (Pal et al. 2023): a soft prompt (input embeddings, one per
row) is trained so that a hidden state ``h_r[t]`` written at the soft prompt's last position, at the same row, makes
the model predict what it predicts at ``t + ahead`` in the original context. The soft prompt starts from the embeddings
of the paper's fixed prompt (``'Hello! Could you please tell me more about "'``), so before training it *is* the
fixed-prompt causal intervention, and is trained with Adam on KL(model at ``t + ahead`` || lens) over hidden states of
a corpus.

The lens's hidden state for ``h`` is the final residual stream at the soft prompt's last position in that patched
run, decoded by the model's own final norm and unembedding: the usual ``LensResult``, compared with the model at
``t + ahead`` (``Lens.ahead``).

**One deviation from the paper, on purpose.** For ``N > 0`` the paper feeds the tokens ``t+1 .. t+N`` after the soft
prompt (teacher forcing) and reads the last of them; here the soft prompt's last position predicts position ``t + N``
from ``h`` alone, the same information as the linear Future Lens, so ``compare_lenses`` compares like with like. With
``ahead = 0`` the two are the same.

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    >>> lens = mi_lenses.fit_future_prompt(model, tokens, rows=[1, 2], steps=3, progress=False)
    >>> lens.prompt.shape[0], lens.rows, lens.meta["loss"][0] >= lens.meta["loss"][-1] - 1.0
    (2, [1, 2], True)
    >>> res = lens(model, "The capital of France is", layers=lens.rows)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.lens import Lens
from mi_lenses.models.hooks import write_hooks
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView, ResidualRow
from mi_lenses.progress import track

EMBED_HOOK = "hook_embed"

# The Future Lens paper's fixed prompt (Pal et al. 2023), the learned prompt's initialisation
FUTURE_LENS_PROMPT = 'Hello! Could you please tell me more about "'


class FuturePromptLens(Lens):
    """Soft prompts ``prompt[i]`` ``[m, d_model]`` for rows ``rows[i]``; ``ids`` are the token ids the prompt was
    initialised from (they set the positions; their embeddings are replaced by the soft prompt)."""

    name = "future lens (learned prompt)"
    maps_final = True

    def __init__(self, prompt: Tensor, rows: Sequence[int], ids: Tensor, *, ahead: int = 0,
                 meta: dict[str, Any] | None = None):
        self.prompt = prompt.detach().float().cpu()
        self.rows = [int(r) for r in rows]
        self.ids = ids.reshape(1, -1).long().cpu()
        if self.prompt.ndim != 3 or self.prompt.shape[:2] != (len(self.rows), self.ids.shape[1]):
            raise LensInputError(f"prompt must be [rows, {self.ids.shape[1]}, d_model], got {tuple(self.prompt.shape)}.")
        self.ahead = int(ahead)
        self.meta = dict(meta or {})
        self.chunk = 64

    def bind(self, model: Any) -> "FuturePromptLens":
        view = ModelView(model)
        if self.prompt.shape[-1] != view.d_model:
            raise LensInputError(f"this learned prompt has d_model {self.prompt.shape[-1]}, the model "
                                 f"{view.d_model}: train one for this model.")
        self._view = view
        return self

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        if row.lens_index not in self.rows:
            raise LensInputError(f"this learned-prompt Future Lens has prompts for rows {self.rows}; pass "
                                 f"layers={self.rows}.")
        view = getattr(self, "_view", None)
        if view is None:
            raise LensInputError("bind the lens to a model first (running it through run_lens does).")
        i = self.rows.index(row.lens_index)
        out = torch.empty(hidden.shape[0], view.d_model)
        with torch.no_grad():
            for a in range(0, hidden.shape[0], self.chunk):
                b = min(a + self.chunk, hidden.shape[0])
                prompts = self.prompt[i].expand(b - a, -1, -1)
                out[a:b] = soft_prompt_run(view, self.ids, prompts, [row.hook_name] * (b - a), hidden[a:b]).float().cpu()
        return out


def soft_prompt_run(view: ModelView, ids: Tensor, prompts: Tensor, names: Sequence[str], vectors: Tensor) -> Tensor:
    """The final residual stream at the last position of a run whose token embeddings are ``prompts``
    ``[n, m, d]`` (positions from ``ids``), with ``vectors[i]`` written at the last position of hook ``names[i]``.
    Differentiable in ``prompts``; hooks removed on exit."""
    n, m = prompts.shape[:2]
    got: dict[str, Tensor] = {}

    def embed(act: Tensor, hook: Any = None) -> Tensor:
        return prompts.to(act.device, act.dtype)

    def keep(act: Tensor, hook: Any = None) -> Tensor:
        got["final"] = act[:, -1]
        return act

    hooks = [(EMBED_HOOK, embed), *write_hooks(list(names), vectors, [m - 1]), (view.final_resid_hook, keep)]
    with view.model.hooks(fwd_hooks=hooks):
        view.model(ids.to(view.device).expand(n, -1), return_type=None)
    return got["final"]


def fit_future_prompt(
    model: Any,
    data: Any,
    *,
    ahead: int = 0,
    rows: Sequence[int] | None = None,
    init: str = FUTURE_LENS_PROMPT,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-2,
    max_tokens: int | None = 8192,
    seq_len: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> FuturePromptLens:
    """Train one soft prompt per row (0 = embeddings ... ``n_layers`` = final; default all) on hidden states of
    ``data`` (a text source or token ids ``[n_seq, seq_len]``): each Adam step samples ``batch_size`` positions
    ``t`` and minimises the mean KL(model at ``t + ahead`` || lens) over them, for every row at once (one forward and
    backward pass of ``rows x batch_size`` soft-prompt runs). ``meta["loss"]`` records the mean KL (nats) per step.

    Args:
        model: a TransformerLens model or a ``ModelView`` (its weights are frozen during training and restored).
        data: the corpus trained on: a text source or token ids ``[n_seq, seq_len]``.
        ahead: how many tokens beyond the next one the lens predicts (default 0: the next token).
        rows: the residual rows, one soft prompt each (0 = embeddings .. ``n_layers`` = final, negative from the
            end); default all.
        init: the text whose token embeddings start every soft prompt (default the paper's fixed prompt).
        steps: Adam steps (0: the untrained fixed-prompt intervention).
        batch_size: positions sampled per step.
        lr: Adam's learning rate.
        max_tokens, seq_len: read at most ``max_tokens`` tokens of a text source (default 8192; ``None``: all of
            it), packed into sequences of ``seq_len`` (which must exceed ``ahead``).
        seed: seeds the sampling of positions.
        progress: show a progress bar over the steps.

    Returns:
        :class:`FuturePromptLens`, with the training settings and per-step loss in its ``meta``.
    """
    view = ModelView(model)
    if not isinstance(ahead, int) or ahead < 0:
        raise LensInputError(f"ahead must be an int >= 0, got {ahead!r}.")
    if not isinstance(steps, int) or steps < 0 or not isinstance(batch_size, int) or batch_size < 1:
        raise LensInputError(f"need steps >= 0 (0: the untrained fixed prompt) and batch_size >= 1, got {steps!r}, "
                             f"{batch_size!r}.")
    L = view.n_layers
    rows = list(range(L + 1)) if rows is None else sorted({int(r) % (L + 1) for r in rows})
    all_rows = view.residual_rows("resid_pre")
    tokens = data if isinstance(data, Tensor) else load_tokens(data, view, seq_len, max_tokens=max_tokens)
    if tokens.ndim != 2 or tokens.shape[1] <= ahead:
        raise LensInputError(f"training needs sequences longer than ahead={ahead}, got {tuple(tokens.shape)}.")
    # the pool of (h_r[t], p_model[t + ahead]) pairs: hidden states of every row, final states at t + ahead
    names = [all_rows[r].hook_name for r in rows]
    H, F = [], []
    with torch.no_grad():
        for b0 in range(0, len(tokens), 4):
            tb = tokens[b0 : b0 + 4].to(view.device)
            _, cache = view.run_with_cache(view.batch(tb), {*names, all_rows[-1].hook_name})
            S = tb.shape[1]
            H.append(torch.stack([cache[n][:, : S - ahead].reshape(-1, view.d_model) for n in names]).cpu())
            F.append(cache[all_rows[-1].hook_name][:, ahead:].reshape(-1, view.d_model).cpu())
    H, F = torch.cat(H, 1), torch.cat(F)
    ids = view.to_tokens(init, prepend_bos=False)
    with torch.no_grad():
        start = view.model.embed(ids).detach().float().cpu()[0] if hasattr(view.model, "embed") else None
    if start is None or start.shape != (ids.shape[1], view.d_model):
        raise LensInputError("cannot read the token embeddings of the initial prompt from this model.")
    prompt = torch.nn.Parameter(start[None].repeat(len(rows), 1, 1))
    opt = torch.optim.Adam([prompt], lr=lr)
    g = torch.Generator().manual_seed(seed)
    dec = view.decoder
    losses: list[float] = []
    params = [(p, p.requires_grad) for p in view.model.parameters()]

    try:
        for p, _ in params:
            p.requires_grad_(False)
        for _ in track(range(steps), "training Future Lens prompts", enabled=progress):
            idx = torch.randint(0, F.shape[0], (batch_size,), generator=g)
            with torch.no_grad():
                target = dec.logits(F[idx]).log_softmax(-1)  # [B, V]
            vec = H[:, idx].reshape(-1, view.d_model)  # [R * B, d], row-major
            run_names = [n for n in names for _ in range(batch_size)]
            prompts = prompt.repeat_interleave(batch_size, 0)
            with torch.enable_grad():
                final = soft_prompt_run(view, ids, prompts, run_names, vec.to(view.device))
                logp = dec.logits(final.float()).log_softmax(-1).cpu().view(len(rows), batch_size, -1)
                kl = (target.exp() * (target - logp)).sum(-1)  # [R, B]
                loss = kl.mean(1).sum()
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(float(kl.detach().mean()))
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
    meta = {**model_identity(view), "init": init, "steps": steps, "batch_size": batch_size, "lr": lr,
            "loss": losses, "pairs": int(F.shape[0])}
    return FuturePromptLens(prompt.detach(), rows, ids, ahead=ahead, meta=meta)
