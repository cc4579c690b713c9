"""Labels and strides every view shares: repeated tokens stay distinct, and a strided axis keeps its last item.

Example:
    >>> distinct([" the", " cat", " the", " end"])
    [' the·0', ' cat', ' the·2', ' end']
    >>> distinct([" the", " cat", " the"], positions=[7, 8, 9])
    [' the·7', ' cat', ' the·9']
    >>> stride(31, 8)
    [0, 5, 10, 15, 20, 25, 30]
    >>> stride(5, 8)
    [0, 1, 2, 3, 4]
    >>> visible(" "), visible("\\n"), visible(" Paris")
    ('␣', '\\\\n', ' Paris')
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def distinct(tokens: Sequence[str], positions: Sequence[int] | None = None, sep: str = "·") -> list[str]:
    """``tokens`` with ``sep`` and the token's position appended wherever the same text occurs more than once, so
    that two columns of the same token can be told apart. ``positions``: the token positions (default 0, 1, ...)."""
    positions = list(range(len(tokens))) if positions is None else list(positions)
    counts = Counter(tokens)
    return [f"{t}{sep}{p}" if counts[t] > 1 else t for t, p in zip(tokens, positions)]


def stride(n: int, most: int) -> list[int]:
    """At most ``most`` evenly spaced indices into ``n`` items, from the first to the last (always kept)."""
    if n <= most:
        return list(range(n))
    if most <= 1:
        return [n - 1]
    step = math.ceil((n - 1) / (most - 1))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    if len(idx) > most:  # the appended last item replaces the one before it
        del idx[-2]
    return idx


def visible(token: str) -> str:
    """A token as terminal text: escapes (``\\n``, ``\\x1e``) written out, and a token of blanks shown as ``␣``
    so that it never looks like an empty cell."""
    if token and not token.strip(" "):
        return "␣" * len(token)
    return repr(token)[1:-1] if token else token
