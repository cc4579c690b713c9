"""The one colour scale of every view: sequential white → blue for probabilities and shares, diverging red → white →
blue for signed values (blue: pushes the direction up, red: down). The same ramps serve HTML and the terminal.

Example:
    >>> css(sequential(0.0)), css(sequential(1.0)), css(diverging(-1.0))
    ('rgb(255,255,255)', 'rgb(8,81,156)', 'rgb(203,24,29)')
    >>> text_on(0.9), rich_style(0.2)
    ('#fff', 'black on rgb(205,220,235)')
"""

from __future__ import annotations

import math

BLUE = (8, 81, 156)
RED = (203, 24, 29)
DARK = 0.55  # shades above this get white text


def _clip(t: float, lo: float) -> float:
    return 0.0 if not math.isfinite(t) else max(lo, min(1.0, t))


def _mix(t: float, target: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(255 - t * (255 - c)) for c in target)  # type: ignore[return-value]


def sequential(t: float) -> tuple[int, int, int]:
    """White (0) → blue (1); NaN is white."""
    return _mix(_clip(t, 0.0), BLUE)


def diverging(t: float) -> tuple[int, int, int]:
    """Red (-1) → white (0) → blue (+1); NaN is white."""
    t = _clip(t, -1.0)
    return _mix(abs(t), BLUE if t > 0 else RED)


def css(rgb: tuple[int, int, int]) -> str:
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def text_on(t: float) -> str:
    """Text colour readable on a shade of strength ``|t|``."""
    return "#fff" if math.isfinite(t) and abs(t) > DARK else "#111"


def rich_style(t: float, signed: bool = False) -> str:
    """A rich style string: black/white text on the sequential (or diverging) shade of ``t``."""
    rgb = diverging(t) if signed else sequential(t)
    fg = "white" if math.isfinite(t) and abs(t) > DARK else "black"
    return f"{fg} on {css(rgb)}"
