"""Layer and position indices: the one resolver every entry point uses.

Indices may be Python, numpy or torch integers, sequences, ranges or 1-D arrays of them; negative values count from
the end. Booleans and non-integers are refused with a message that names the valid range.

**Positions in a batch** are counted in each prompt's own real tokens, never in padding: position ``p >= 0`` is a
prompt's ``p``-th token and ``-1`` its last real token, whatever the padding side. A position that one prompt lacks
(it is shorter) is masked for that prompt; a position no prompt has is an error.

Example:
    >>> resolve_indices([0, -1], 31, "layer")
    [0, 30]
    >>> grid = resolve_positions([-1, 0], lengths=[3, 5], offsets=[0, 0])
    >>> grid.index.tolist(), grid.requested
    ([[2, 0], [4, 0]], [-1, 0])
    >>> resolve_positions(None, lengths=[2, 3], offsets=[1, 0]).index.tolist()   # left padding: aligned by token
    [[1, 2, -1], [0, 1, 2]]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mi_lenses.errors import LensInputError

IndexSpec = Union[int, Sequence[int], range, Tensor, None]


def int_list(values: Any) -> list[Any]:
    """Python ints from an int, a sequence, a range, a numpy array or a tensor of integers. Items that are not
    integers (or are booleans) are kept as they are, for the caller's error message."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple, range)):
        values = [values]
    out = []
    for v in values:
        try:
            out.append(v if isinstance(v, bool) else operator.index(v))
        except TypeError:
            out.append(v)
    return out


def resolve_index(value: Any, n: int, what: str, hint: str = "") -> int:
    """One index into ``n`` items (negative from the end), as ``0..n-1``."""
    items = int_list(value) if not isinstance(value, (list, tuple, range)) else [value]
    v = items[0] if len(items) == 1 else value
    if not isinstance(v, int) or isinstance(v, bool):
        raise LensInputError(f"{what} {value!r} must be an int.")
    if not -n <= v < n:
        where = f"{hint}; " if hint else ""
        raise LensInputError(f"{what} {v} is out of range: {where}use 0..{n - 1}, or -{n}..-1 from the end.")
    return v % n


def resolve_indices(values: IndexSpec, n: int, what: str, hint: str = "", *, ordered: bool = True) -> list[int]:
    """Indices into ``n`` items; ``None`` means all. ``ordered``: sorted, and an index given twice is an error."""
    if values is None:
        return list(range(n))
    items = int_list(values)
    if not items:
        raise LensInputError(f"no {what} selected ({what}s is empty): pass at least one {what}, or None for all.")
    out = [resolve_index(v, n, what, hint) for v in items]
    if ordered:
        if len(set(out)) != len(out):
            raise LensInputError(f"{what}s {int_list(values)} select the same {what} twice.")
        out.sort()
    return out


@dataclass(frozen=True)
class PositionGrid:
    """Resolved positions of a batch: column ``j`` of prompt ``b`` is token ``index[b, j]`` of the padded sequence
    (``-1`` and ``valid[b, j] == False`` where that prompt has no such token). ``requested`` holds the position of
    each column as asked, normalised to ``0..n-1`` when every prompt has the same length."""

    index: Int[Tensor, "B P"]
    valid: Bool[Tensor, "B P"]
    requested: list[int]

    def gather(self, t: Tensor) -> Tensor:
        """``t[b, index[b, j], ...]`` for every column (padding columns read position 0; mask them with ``valid``)."""
        idx = self.index.clamp(min=0).to(t.device)
        return t[torch.arange(t.shape[0], device=t.device)[:, None], idx]


def resolve_positions(
    positions: IndexSpec, lengths: Sequence[int], offsets: Sequence[int] | None = None, what: str = "position",
    *, every_prompt: bool = False,
) -> PositionGrid:
    """Per-prompt positions (see the module docstring). ``lengths[b]``: real tokens of prompt ``b``; ``offsets[b]``:
    where they start in the padded sequence (the left padding). ``every_prompt``: a position some prompt lacks is an
    error instead of a masked column (e.g. DLA, one position per prompt)."""
    lengths = [int(n) for n in lengths]
    offsets = [0] * len(lengths) if offsets is None else [int(o) for o in offsets]
    longest = max(lengths)
    if positions is None:
        requested = list(range(longest))
    else:
        requested = []
        if not int_list(positions):
            raise LensInputError(f"no {what} selected ({what}s is empty): pass at least one {what}, or None for all.")
        for p in int_list(positions):
            if not isinstance(p, int) or isinstance(p, bool):
                raise LensInputError(f"{what} {p!r} must be an int (or a list of ints).")
            have = [n for n in lengths if -n <= p < n]
            if every_prompt and len(have) < len(lengths):
                b = next(i for i, n in enumerate(lengths) if not -n <= p < n)
                raise LensInputError(
                    f"{what} {p} is out of range for prompt {b}, which has {lengths[b]} tokens: use "
                    f"0..{lengths[b] - 1}, or -{lengths[b]}..-1 from its last token."
                )
            if not have:
                shortest = min(lengths)
                span = f"0..{longest - 1}, or -{longest}..-1" if shortest == longest else \
                    f"0..{longest - 1} or -{longest}..-1 (prompts have {shortest}..{longest} tokens)"
                raise LensInputError(f"{what} {p} is out of range for a sequence of {longest} tokens ({span}).")
            requested.append(p)
    index = torch.full((len(lengths), len(requested)), -1, dtype=torch.long)
    for b, (n, o) in enumerate(zip(lengths, offsets)):
        for j, p in enumerate(requested):
            if -n <= p < n:
                index[b, j] = o + p % n
    if len(set(lengths)) == 1:
        requested = [p % lengths[0] for p in requested]
    return PositionGrid(index, index >= 0, requested)
