"""Terminal rendering with rich: the top-1 token per layer and position, the KL column and the targets' ranks."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import rich_style as _style
from mi_lenses.viz.tokens import distinct, stride, visible


def lens_table(res, batch: int = 0, value: str = "prob", max_positions: int = 12,
               max_layers: int | None = None) -> Table:
    """Rows: layers (final on top; strided to ``max_layers``, always keeping the final row); columns: the last
    ``max_positions`` positions (repeated tokens get their position as a suffix); cells: top-1 token and its
    probability (``value="prob"``) or the rank of the final top-1 token (``value="rank"``); then, at the last
    position, KL to the final row in bits and the rank of every target. Cells never wrap: long tokens end in "…"."""
    cols = res.columns(batch)
    shown = cols[-max_positions:]
    tokens = res.position_tokens[batch]
    labels = distinct([visible(tokens[j]) for j in cols], [int(res.token_index[batch, j]) for j in cols])
    label_of = dict(zip(cols, labels))
    table = Table(title=f"{res.lens_name} · {res.model_name}", show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right", style="bold", no_wrap=True)
    for j in shown:
        table.add_column(label_of[j], overflow="ellipsis", max_width=14, no_wrap=True)
    table.add_column("KL bits", justify="right", no_wrap=True, min_width=7)
    targets = res.target_strs
    for name in targets:
        head = f"rank {name!r}"
        table.add_column(head, justify="right", no_wrap=True, overflow="ellipsis", min_width=min(len(head), 16),
                         max_width=16)
    toks = res.top_tokens
    probs = res.top_probs[..., 0]
    rows = stride(len(res.labels), max_layers) if max_layers else list(range(len(res.labels)))
    last = shown[-1] if shown else None
    for r in reversed(rows):
        cells = []
        for j in shown:
            p = float(probs[r, batch, j])
            tok = visible(toks[r][batch][j][0])
            if value == "rank":
                cells.append(Text(f"{int(res.final_top1_rank[r, batch, j])}", style=_style(p)))
            else:
                cells.append(Text(f"{tok} {p:.2f}", style=_style(p)))
        kl = f"{float(res.kl_bits[r, batch, last]):.2f}" if last is not None else ""
        ranks = [str(int(res.target_ranks[r, batch, last, t])) if last is not None else "" for t in range(len(targets))]
        table.add_row(res.labels[r], *cells, kl, *ranks)
    notes = []
    if len(shown) < len(cols):
        first = int(res.token_index[batch, shown[0]])
        notes.append(f"positions {first}..{int(res.token_index[batch, last])} of {len(cols)} shown (the last ones)")
    if len(rows) < len(res.labels):
        notes.append(f"{len(rows)} of {len(res.labels)} layers shown (strided; the final row always)")
    if last is not None:
        where = f"at {label_of[last]!r}"
        notes.append(f"KL{' and ranks' if targets else ''} {where} (0 = top-1)" if targets else f"KL {where}")
    table.caption = "; ".join(notes)
    return table
