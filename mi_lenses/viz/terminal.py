"""Terminal rendering with rich: the top-1 token per layer and position, and the KL column."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _style(p: float) -> str:
    """Background from white to blue by probability."""
    p = 0.0 if not math.isfinite(p) else min(max(p, 0.0), 1.0)
    r, g, b = (int(255 - p * (255 - c)) for c in (8, 81, 156))
    fg = "white" if p > 0.55 else "black"
    return f"{fg} on rgb({r},{g},{b})"


def lens_table(res, batch: int = 0, value: str = "prob", max_positions: int = 12) -> Table:
    """Rows: layers (final on top); columns: the last ``max_positions`` positions; cells: top-1 token and its
    probability (``value="prob"``) or the rank of the final top-1 token (``value="rank"``); last column: KL bits at
    the last position."""
    cols = [j for j in range(len(res.positions)) if bool(res.valid[batch, j])][-max_positions:]
    table = Table(title=f"{res.lens_name} · {res.model_name}", show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right", style="bold")
    for j in cols:
        table.add_column(repr(res.position_tokens[batch][j])[1:-1], overflow="ellipsis", max_width=14)
    table.add_column("KL bits", justify="right")
    toks = res.top_tokens
    probs = res.top_probs[..., 0]
    for r in range(len(res.labels) - 1, -1, -1):
        cells = []
        for j in cols:
            p = float(probs[r, batch, j])
            tok = repr(toks[r][batch][j][0])[1:-1]
            if value == "rank":
                cells.append(Text(f"{int(res.final_top1_rank[r, batch, j])}", style=_style(p)))
            else:
                cells.append(Text(f"{tok} {p:.2f}", style=_style(p)))
        kl = float(res.kl_bits[r, batch, cols[-1]]) if cols else float("nan")
        table.add_row(res.labels[r], *cells, f"{kl:.2f}")
    return table


def print_renderable(renderable, width: int | None = None) -> None:
    Console(width=width).print(renderable)
