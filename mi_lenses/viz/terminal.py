"""Terminal rendering with rich: the top-1 token per layer and position, and the KL column."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import rich_style as _style


def lens_table(res, batch: int = 0, value: str = "prob", max_positions: int = 12) -> Table:
    """Rows: layers (final on top); columns: the last ``max_positions`` positions; cells: top-1 token and its
    probability (``value="prob"``) or the rank of the final top-1 token (``value="rank"``); last column: KL bits at
    the last position."""
    cols = res.columns(batch)[-max_positions:]
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
