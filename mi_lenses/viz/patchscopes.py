"""Figures of Patchscope results: the per-layer table (layer | top-1 | generation), sweep heat maps (layers x layers
of precision@1, surprisal, target-token probability) and a per-layer precision chart. Offline HTML only."""

from __future__ import annotations

import html
import math

import torch
from rich.table import Table

from mi_lenses.viz.html import esc, heat_grid, line_chart


def _prompt_line(label: str, tokens: list[str], marked: set[int]) -> str:
    cells = []
    for j, t in enumerate(tokens):
        style = "background:#fdd49e;border-radius:3px" if j in marked else ""
        cells.append(f'<span title="position {j}" style="{style};font-family:monospace">{esc(t)}</span>')
    return f"<p><b>{html.escape(label)}</b> {''.join(cells)}</p>"


def result_fragment(res) -> str:
    """The prompts (patched positions highlighted) and one table row per (l, l*)."""
    parts = [
        _prompt_line(f"source ({res.model_name}), position {res.source_position}:", res.source_str_tokens,
                     {res.source_position}),
        _prompt_line(f"target '{res.target_name}' ({res.target_model_name}), patched at {res.target_positions}:",
                     res.target_str_tokens, set(res.target_positions)),
        f'<p class="note">The source model predicts {html.escape(repr(res.source_prediction))} after '
        f"{html.escape(repr(res.source_token))}. Layer l = output of block l (resid_post)"
        f"{'; states mapped by f' if res.mapped else ''}. Precision@1: the patched top-1 equals that prediction.</p>",
    ]
    gen = res.generated
    head = "<tr><th>layer l → l*</th><th>top-1</th><th>p</th><th>prec@1</th><th>surprisal (bits)</th>" + (
        "<th>generation</th>" if gen is not None else "") + "</tr>"
    rows = []
    for r, label in enumerate(res.row_labels):
        p = float(res.top_probs[r, 0])
        top = ", ".join(f"{t!r} {float(q):.2f}" for t, q in zip(res.top_tokens[r], res.top_probs[r].tolist()))
        s = float(res.surprisal_bits[r])
        cells = [
            f"<td>{html.escape(label)}</td>",
            f'<td title="{html.escape(top)}" style="font-family:monospace">{esc(res.top_tokens[r][0])}</td>',
            f"<td>{p:.3f}</td>",
            f"<td>{'✓' if bool(res.prec_at_1[r]) else '·'}</td>",
            f"<td>{s:.2f}</td>" if math.isfinite(s) else "<td>–</td>",
        ]
        if gen is not None:
            cells.append(f'<td style="font-family:monospace;white-space:pre-wrap">{html.escape(gen[r])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append('<table style="border-collapse:collapse;font-size:13px" border="1" cellpadding="4">' + head
                 + "".join(rows) + "</table>")
    return "\n".join(parts)


def result_table(res):
    """A rich table: layer | top-1 (prob) | prec@1 | surprisal | generation."""
    table = Table(title=f"Patchscope '{res.target_name}': source {res.source_token!r} "
                        f"(model predicts {res.source_prediction!r})")
    for col in ("layer", "top-1", "p", "prec@1", "surprisal (bits)"):
        table.add_column(col)
    gen = res.generated
    if gen is not None:
        table.add_column("generation")
    for r, label in enumerate(res.row_labels):
        row = [label, repr(res.top_tokens[r][0]), f"{float(res.top_probs[r, 0]):.3f}",
               "yes" if bool(res.prec_at_1[r]) else "no", f"{float(res.surprisal_bits[r]):.2f}"]
        if gen is not None:
            row.append(repr(gen[r]))
        table.add_row(*row)
    return table


def _grid(sw, values, caption: str, lo: float, hi: float, fmt: str, invert: bool = False) -> str:
    """Target layers as columns, source layers as rows (last layer on top)."""
    tl = sw.source_layers if sw.diagonal else sw.target_layers
    n_s = len(sw.source_layers)
    order = list(range(n_s - 1, -1, -1))
    text, shade = [], []
    for a in order:
        trow, srow = [], []
        for b in range(len(tl)):
            if sw.diagonal and b != a:
                trow.append("")
                srow.append(float("nan"))
                continue
            v = float(values[a, 0 if sw.diagonal else b])
            trow.append(format(v, fmt) if math.isfinite(v) else "–")
            t = (v - lo) / (hi - lo or 1.0)
            srow.append(1.0 - t if invert else t)
        text.append(trow)
        shade.append(srow)
    return heat_grid([f"l={sw.source_layers[a]}" for a in order], [f"l*={t}" for t in tl], text, shade,
                     caption=caption)


def sweep_fragment(sw) -> str:

    prec = sw.prec_at_1_mean
    surp = sw.surprisal_bits_mean
    prob = sw.answer_prob_mean
    finite = surp[torch.isfinite(surp)]
    s_hi = float(finite.max()) if finite.numel() else 1.0
    who = repr(sw.answer) if sw.answer else "the source model's own prediction"
    parts = [
        f'<p class="note">{len(sw.positions)} source positions; target preset "{html.escape(sw.target_name)}"; '
        f"rows: source layer l, columns: target layer l* (output of the block, resid_post). Computed in "
        f"{sw.seconds:.1f} s.</p>",
        _grid(sw, prec, "Precision@1 (patched top-1 == the source model's next-token prediction)", 0, 1, ".2f"),
        _grid(sw, surp, "Surprisal of the source model's prediction (bits, lower is better)", 0, s_hi, ".2f",
              invert=True),
        _grid(sw, prob, f"Probability of {html.escape(who)}", 0, 1, ".2f"),
    ]
    diag = sw.per_layer()
    parts.append("<h2>Precision@1 with l* = l</h2>")
    parts.append(line_chart([str(l) for l in sw.source_layers], {"patchscope": diag.tolist()}, "precision@1"))
    return "\n".join(parts)


def sweep_table(sw):
    """A rich table: precision@1 and mean surprisal (bits) per source layer at l* = l."""
    table = Table(title=f"Patchscope sweep '{sw.target_name}' · {sw.model_name} · {len(sw.positions)} source positions")
    for col in ("l = l*", "precision@1", "surprisal (bits)"):
        table.add_column(col, justify="right")
    per = sw.per_layer()
    surp = sw.surprisal_bits_mean
    for a, l in enumerate(sw.source_layers):
        j = 0 if sw.diagonal else (sw.target_layers.index(l) if l in sw.target_layers else None)
        if j is None:
            table.add_row(str(l), "–", "–")
        else:
            table.add_row(str(l), f"{float(per[a]):.3f}", f"{float(surp[a, j]):.2f}")
    return table
