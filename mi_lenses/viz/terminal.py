"""Terminal rendering with rich: the top-1 token per layer and position, the KL column and the targets' ranks.

Tables are built for the console they are printed on (:class:`Fitted`): a prompt of 200 tokens shows as many of its
last positions as fit the width, never a table cropped at the right edge.
"""

from __future__ import annotations

from typing import Callable

from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import rich_style as _style
from mi_lenses.viz.tokens import distinct, stride, visible

CELL_MAX = 14  # widest token cell, in characters (longer tokens end in "…")


class Fitted:
    """A rich renderable built for the width it is rendered at: ``build(width)`` returns the renderable."""

    def __init__(self, build: Callable[[int], object]):
        self.build = build

    def __rich_console__(self, console, options):
        yield self.build(options.max_width)


def fit_count(widths: list[int], room: int) -> int:
    """How many of ``widths`` (each a column's width with its borders, taken from the end) fit in ``room``; at
    least one."""
    used, n = 0, 0
    for w in reversed(widths):
        if used + w > room and n:
            break
        used += w
        n += 1
    return n


def lens_table(res, batch: int = 0, value: str = "prob", max_positions: int = 12,
               max_layers: int | None = None) -> Fitted:
    """Rows: layers (final on top; strided to ``max_layers``, always keeping the final row); columns: the last
    positions, as many as fit the console (at most ``max_positions``; repeated tokens get their position as a
    suffix); cells: top-1 token and its probability (``value="prob"``) or the rank of the final top-1 token
    (``value="rank"``); then, at the last position, KL to the final row in bits and the rank of every target.
    Cells never wrap: long tokens end in "…"."""
    cols = res.columns(batch)
    tokens = res.position_tokens[batch]
    labels = distinct([visible(tokens[j]) for j in cols], [int(res.token_index[batch, j]) for j in cols])
    label_of = dict(zip(cols, labels))
    rows = stride(len(res.labels), max_layers) if max_layers else list(range(len(res.labels)))
    toks = res.top_tokens
    probs = res.top_probs[..., 0]
    targets = res.target_strs

    def cell(r: int, j: int) -> Text:
        p = float(probs[r, batch, j])
        if value == "rank":
            return Text(f"{int(res.final_top1_rank[r, batch, j])}", style=_style(p))
        return Text(f"{visible(toks[r][batch][j][0])} {p:.2f}", style=_style(p))

    def width_of(j: int) -> int:
        longest = max([len(label_of[j])] + [len(cell(r, j).plain) for r in rows])
        return min(CELL_MAX, longest) + 3

    def build(width: int) -> Table:
        layer_w = max(len(label) for label in res.labels)
        rank_heads = [f"rank {name!r}" for name in targets]
        fixed = layer_w + 3 + 10 + sum(min(len(h), 16) + 3 for h in rank_heads) + 1
        candidates = cols[-max_positions:]
        shown = candidates[-fit_count([width_of(j) for j in candidates], width - fixed):] if candidates else []
        last = cols[-1] if cols else None
        table = Table(title=f"{res.lens_name} · {res.model_name}", show_lines=False, pad_edge=False)
        table.add_column("layer", justify="right", style="bold", no_wrap=True, min_width=layer_w)
        for j in shown:
            table.add_column(label_of[j], overflow="ellipsis", max_width=CELL_MAX, no_wrap=True)
        table.add_column("KL bits", justify="right", no_wrap=True, min_width=7)
        for head in rank_heads:
            table.add_column(head, justify="right", no_wrap=True, overflow="ellipsis", min_width=min(len(head), 16),
                             max_width=16)
        for r in reversed(rows):
            kl = f"{float(res.kl_bits[r, batch, last]):.2f}" if last is not None else ""
            ranks = [str(int(res.target_ranks[r, batch, last, t])) if last is not None else ""
                     for t in range(len(targets))]
            table.add_row(res.labels[r], *[cell(r, j) for j in shown], kl, *ranks)
        notes = []
        if len(shown) < len(cols):
            first = int(res.token_index[batch, shown[0]])
            notes.append(f"positions {first}..{int(res.token_index[batch, last])} of {len(cols)} shown (the last ones)")
        if len(rows) < len(res.labels):
            notes.append(f"{len(rows)} of {len(res.labels)} layers shown (strided; the final row always)")
        if last is not None:
            where = f"at {label_of[last]!r}"
            notes.append(f"KL and ranks {where} (0 = top-1)" if targets else f"KL {where}")
        table.caption = "; ".join(notes)
        return table

    return Fitted(build)
