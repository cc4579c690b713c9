"""The batch prelude every entry point shares: input → tokens, padding, lengths → one forward pass with a cache.

Input is a prompt, a list of prompts (tokenised one by one and right-padded, whatever the tokenizer's padding side), or
token ids ``[batch, pos]``. Token ids may carry padding on either side: pass their ``attention_mask`` (1 = real token)
and every statistic is computed on the real tokens only, with positions counted in each prompt's own tokens (see
:mod:`mi_lenses.indexing`). Left-padded batches are run with the mask, so positions and attention skip the padding.

Example:
    >>> batch = make_batch(ModelView(model), ["A city", "The quick brown fox"])
    >>> batch.lengths, batch.offsets, batch.padded
    ([3, 5], [0, 0], True)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mi_lenses.errors import LensInputError, MissingHookError
from mi_lenses.models.fused import fused_attention
from mi_lenses.progress import bar

if TYPE_CHECKING:
    from mi_lenses.models.view import ModelView

PromptInput = str | Sequence[str] | Tensor


@dataclass
class Batch:
    """Tokens ``[B, S]`` with the real tokens of row ``b`` at ``offsets[b] : offsets[b] + lengths[b]``."""

    tokens: Int[Tensor, "B S"]
    lengths: list[int]
    offsets: list[int]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])

    @property
    def padded(self) -> bool:
        return any(n != self.tokens.shape[1] for n in self.lengths)

    @property
    def left_padded(self) -> bool:
        return any(o > 0 for o in self.offsets)

    @property
    def attention_mask(self) -> Int[Tensor, "B S"]:
        """1 on real tokens, 0 on padding."""
        pos = torch.arange(self.tokens.shape[1])
        off, n = torch.tensor(self.offsets)[:, None], torch.tensor(self.lengths)[:, None]
        return ((pos >= off) & (pos < off + n)).long()

    def real_tokens(self) -> list[list[int]]:
        """Each prompt's real token ids, without padding."""
        rows = self.tokens.cpu().tolist()
        return [row[o : o + n] for row, o, n in zip(rows, self.offsets, self.lengths)]

    def own_positions(self, t: Tensor, dims: tuple[int, ...], fill: float = float("nan")) -> Tensor:
        """``t`` (batch first) with its position axes ``dims`` re-indexed by each prompt's own tokens: prompt ``b``'s
        real tokens move to ``0 .. lengths[b] - 1`` (left padding removed), everything else is ``fill``. Returns
        ``t`` itself when nothing is padded."""
        if not self.padded:
            return t
        axes = {d % t.ndim for d in dims}
        out = torch.full_like(t, fill)
        for b, (o, n) in enumerate(zip(self.offsets, self.lengths)):
            src = (b, *(slice(o, o + n) if d in axes else slice(None) for d in range(1, t.ndim)))
            dst = (b, *(slice(0, n) if d in axes else slice(None) for d in range(1, t.ndim)))
            out[dst] = t[src]
        return out

    def next_ids(self, index: Int[Tensor, "B P"]) -> Int[Tensor, "B P"]:
        """The token after each selected position ``index`` (padded-sequence indices, -1 = none); -1 at a prompt's
        last real token and at masked columns."""
        tokens = self.tokens.cpu()
        end = torch.tensor([o + n for o, n in zip(self.offsets, self.lengths)])[:, None]
        nxt = index + 1
        ok = (index >= 0) & (nxt < end)
        got = tokens.gather(1, nxt.clamp(0, tokens.shape[1] - 1))
        return torch.where(ok, got, -1)


def make_batch(
    view: "ModelView", prompt: PromptInput, *, prepend_bos: bool | None = None, attention_mask: Tensor | None = None,
    beyond_context: bool = False,
) -> Batch:
    """Tokens, lengths and offsets of ``prompt`` (see the module docstring). A prompt longer than the model's context
    (``cfg.n_ctx``) is refused unless ``beyond_context``."""
    if isinstance(prompt, Tensor):
        tokens = view.to_tokens(prompt)
        if attention_mask is None:
            batch = Batch(tokens, [tokens.shape[1]] * tokens.shape[0], [0] * tokens.shape[0])
        else:
            batch = batch_from_mask(tokens, attention_mask)
    elif attention_mask is not None:
        raise LensInputError("attention_mask= goes with token ids; prompts given as text are padded by mi_lenses.")
    else:
        tokens = view.to_tokens(prompt, prepend_bos)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        lengths = [tokens.shape[1]] if len(prompts) == 1 else \
            [int(view.to_tokens(p, prepend_bos).shape[-1]) for p in prompts]
        batch = Batch(tokens, lengths, [0] * len(prompts))
    if not beyond_context:
        check_context(view, batch.shape[1])
    return batch


def check_context(view: "ModelView", n_tokens: int, what: str = "the prompt", *, opt_in: bool = True,
                  fix: str | None = None) -> None:
    """Refuse ``n_tokens`` positions beyond the model's context window (``cfg.n_ctx``), naming the limit and the fix:
    ``fix``, or with ``opt_in`` the keyword that accepts them."""
    n_ctx = getattr(view.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and 0 < n_ctx < n_tokens:
        fix = " " + fix if fix else (
            " Shorten or split the prompt, or pass beyond_context=True (--beyond-context) if you know the model "
            "reads beyond its context." if opt_in else " Shorten the prompt or generate fewer tokens.")
        raise LensInputError(f"{what} has {n_tokens} tokens but {view.name}'s context window is {n_ctx} (cfg.n_ctx): "
                             f"positions past it are out of distribution.{fix}")


def batch_from_mask(tokens: Tensor, mask: Any) -> Batch:
    """The batch of token ids whose ``mask`` (1 = real token) marks padding on the left or the right."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(tokens.shape):
        raise LensInputError(f"attention_mask has shape {tuple(mask.shape)} but the tokens have "
                             f"{tuple(tokens.shape)}: pass the mask the tokenizer returned with these tokens.")
    m = mask.cpu().bool()
    lengths, offsets = [], []
    for b, row in enumerate(m):
        idx = row.nonzero()[:, 0]
        if len(idx) == 0:
            raise LensInputError(f"prompt {b} has no real token (its attention_mask is all zeros): mark its real "
                                 "tokens with 1, or leave the row out.")
        start, n = int(idx[0]), len(idx)
        if int(idx[-1]) - start + 1 != n:
            raise LensInputError(f"prompt {b}'s attention_mask has a gap: padding must sit on the left or the right "
                                 "of the real tokens, not between them.")
        lengths.append(n)
        offsets.append(start)
    return Batch(tokens, lengths, offsets)


def match_cache(batch: Batch | None, shape: tuple[int, int], attention_mask: Any = None) -> Batch:
    """The batch that goes with a cache of ``[B, S]`` residual states: ``batch`` checked against it, or, when no
    token ids were given, a batch of unknown ids (-1) whose padding ``attention_mask`` describes (default: none)."""
    B, S = int(shape[0]), int(shape[1])
    if batch is None:
        unknown = torch.full((B, S), -1, dtype=torch.long)
        return Batch(unknown, [S] * B, [0] * B) if attention_mask is None else batch_from_mask(unknown, attention_mask)
    if batch.shape != (B, S):
        raise LensInputError(f"tokens {batch.shape} do not match the cache's [batch, pos] = {(B, S)}: pass the "
                             "tokens the cache was made from.")
    return batch


Reduction = Callable[[Tensor], dict[str, Tensor]]  # an activation -> the small tensors kept of it


def derived(name: str, key: str) -> str:
    """The cache key of what a reduction kept of hook ``name`` under ``key`` (e.g.
    ``blocks.3.attn.hook_pattern:rows``)."""
    return f"{name}:{key}"


def run_with_cache(view: "ModelView", batch: Batch, names: set[str] | Sequence[str], *,
                   progress: bool = False, reduce: Sequence[tuple[str, Reduction]] = (),
                   fused: bool = False) -> tuple[Tensor, Any]:
    """One forward pass without gradients, caching the hooks in ``names``; left-padded rows run with their mask.

    ``reduce``: ``(hook name, fn)`` pairs; ``fn`` gets the activation as it passes and returns small tensors the cache
    keeps under :func:`derived` keys (the activation itself is cached only when ``names`` has it): an engine that reads
    a row of a ``[batch, heads, pos, pos]`` pattern never holds the others. ``fused``: run fused attention where that
    gives the same numbers (:func:`~mi_lenses.models.fused.fused_attention`). With ``progress``, a long pass
    (``PROGRESS_TOKENS`` tokens or more) shows a bar over the blocks. TransformerLens removes its caching hooks, and
    ``hooks()`` ours, also when the forward pass raises; hooks the user added before stay active and in their order."""
    wanted = set(names)
    kwargs: dict[str, Any] = {}
    if batch.left_padded:
        kwargs["attention_mask"] = batch.attention_mask.to(batch.tokens.device)
    kept: dict[str, Tensor] = {}

    def keeper(name: str, fn: Reduction) -> Callable:
        def hook(act: Tensor, hook: Any = None) -> None:
            kept.update({derived(name, key): t for key, t in fn(act.detach()).items()})
        return hook

    hooks = [(name, keeper(name, fn)) for name, fn in reduce]
    B, S = batch.shape
    with contextlib.ExitStack() as stack:
        if fused:
            stack.enter_context(fused_attention(view, batch, [*wanted, *(name for name, _ in reduce)]))
        if progress and B * S >= PROGRESS_TOKENS:
            b = stack.enter_context(bar(view.n_layers, f"forward pass ({B * S} tokens)", unit="block"))
            hooks += [(f"blocks.{l}.hook_resid_post", lambda act, hook=None: b.update(1))
                      for l in range(view.n_layers)]
        stack.enter_context(torch.no_grad())
        if hooks:
            stack.enter_context(view.model.hooks(fwd_hooks=hooks))
        logits, cache = view.model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted, **kwargs)
    if kept:
        (cache.cache_dict if hasattr(cache, "cache_dict") else cache).update(kept)
    return logits, cache


PROGRESS_TOKENS = 1024  # a forward pass over fewer tokens never takes long enough for a bar

# the batched rank of each kind of cached activation (``run_with_cache(remove_batch_dim=True)`` drops the batch)
_NDIM = {"pattern": 4, "attn_scores": 4, "q": 4, "k": 4, "v": 4, "z": 4, "rot_q": 4, "rot_k": 4, "result": 4,
         "cos": 3, "sin": 3}


@dataclass
class Cached:
    """The batch, the model's logits (from this run, or the caller's) and the cache of one forward pass, read with a
    batch dimension always; a missing hook is an error naming ``what`` reads it and how to cache it."""

    batch: Batch
    logits: Tensor | None
    cache: Any
    what: str
    hint: str = ""
    ran: bool = True  # False: the cache is the caller's

    def get(self, name: str) -> Tensor | None:
        """The cached activation, or None when the cache lacks it."""
        try:
            t = self.cache[name]
        except (KeyError, IndexError):
            return None
        if ":" in name:  # a reduction's output (batch first always)
            return t
        want = _NDIM.get(name.rsplit("hook_", 1)[-1], 3)
        return t[None] if t.ndim == want - 1 else t

    def __getitem__(self, name: str) -> Tensor:
        t = self.get(name)
        if t is None:
            raise MissingHookError(
                f"the cache lacks the hook {name!r}, which {self.what} reads: run model.run_with_cache(tokens) without a "
                f"names_filter{self.hint}, or pass the prompt instead.")
        return t

    def require(self, names: Sequence[str]) -> None:
        """Fail before any work when the cache lacks one of ``names`` (the first missing one is named)."""
        for name in names:
            self[name]


def cached_forward(
    view: "ModelView", prompt: PromptInput | Batch | None, *, names: Sequence[str], what: str, cache: Any = None,
    logits: Tensor | None = None, attention_mask: Tensor | None = None, prepend_bos: bool | None = None,
    required: Sequence[str] | None = None, shape_hook: str | None = None, hint: str = "",
    beyond_context: bool = False, progress: bool = False, reduce: Sequence[tuple[str, Reduction]] = (),
    fused: bool = False,
) -> Cached:
    """The one forward pass of every engine: tokens from ``prompt`` (if given; a :class:`Batch` is taken as it is),
    then either one pass caching ``names`` (and the ``reduce`` outputs, with ``fused`` attention where it applies: see
    :func:`run_with_cache`) or the caller's ``cache`` (checked for ``required``, default ``names``), the batch matched
    to the cache's ``[batch, pos]`` (read from ``shape_hook``, default the first required hook)."""
    if prompt is None and cache is None:
        raise LensInputError("pass a prompt, a list of prompts, tokens, or cache=ActivationCache.")
    batch = prompt if isinstance(prompt, Batch) or prompt is None else make_batch(
        view, prompt, prepend_bos=prepend_bos, attention_mask=attention_mask, beyond_context=beyond_context)
    ran = cache is None
    if ran:
        logits, cache = run_with_cache(view, batch, names, progress=progress, reduce=reduce, fused=fused)
    out = Cached(batch, logits, cache, what, hint, ran)  # type: ignore[arg-type]  (batch matched below)
    required = list(names if required is None else required)
    out.require(required)
    name = shape_hook or required[0]
    key = out[name]
    S = key.shape[-1] if name.endswith(("hook_pattern", "hook_attn_scores", ":rows")) else key.shape[1]  # [B, H, Q, K]
    out.batch = match_cache(batch, (key.shape[0], S), attention_mask)
    return out
