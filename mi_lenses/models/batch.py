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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mi_lenses.errors import LensInputError

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
    view: "ModelView", input: PromptInput, *, prepend_bos: bool | None = None, attention_mask: Tensor | None = None
) -> Batch:
    """Tokens, lengths and offsets of ``input`` (see the module docstring)."""
    if isinstance(input, Tensor):
        tokens = view.to_tokens(input)
        if attention_mask is None:
            return Batch(tokens, [tokens.shape[1]] * tokens.shape[0], [0] * tokens.shape[0])
        return batch_from_mask(tokens, attention_mask)
    if attention_mask is not None:
        raise LensInputError("attention_mask= goes with token ids; prompts given as text are padded by mi_lenses.")
    tokens = view.to_tokens(input, prepend_bos)
    prompts = [input] if isinstance(input, str) else list(input)
    if len(prompts) == 1:
        return Batch(tokens, [tokens.shape[1]], [0])
    lengths = [int(view.to_tokens(p, prepend_bos).shape[-1]) for p in prompts]
    return Batch(tokens, lengths, [0] * len(prompts))


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


def run_with_cache(view: "ModelView", batch: Batch, names: set[str] | Sequence[str]) -> tuple[Tensor, Any]:
    """One forward pass without gradients, caching the hooks in ``names``; left-padded rows run with their mask.
    TransformerLens removes its caching hooks also when the forward pass raises."""
    wanted = set(names)
    kwargs: dict[str, Any] = {}
    if batch.left_padded:
        kwargs["attention_mask"] = batch.attention_mask.to(batch.tokens.device)
    with torch.no_grad():
        return view.model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted, **kwargs)
