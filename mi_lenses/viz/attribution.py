"""Figures of a direct logit attribution: layer x head heat map, per-layer MLP bars, top neurons, and the prompt's
tokens coloured by their contribution through a head (circuitsvis), as an offline page, a notebook view and a rich
table. Signed values use a diverging scale: red pushes the direction down, blue pushes it up."""

from __future__ import annotations

import html
import math

from mi_lenses.atomic import write_atomic

from mi_lenses.viz.html import circuitsvis_block, esc, page


def _diverging(t: float) -> str:
    """Red (-1) -> white (0) -> blue (+1)."""
    t = 0.0 if not math.isfinite(t) else max(-1.0, min(1.0, t))
    target = (8, 81, 156) if t > 0 else (203, 24, 29)
    a = abs(t)
    r, g, b = (int(255 - a * (255 - c)) for c in target)
    return f"rgb({r},{g},{b})"


def _head_label(label: str) -> tuple[int, int]:
    l, h = label[1:].split("H")
    return int(l), int(h)


def head_grid(res, row: int = 0) -> str:
    """Layers (rows, last layer on top) x heads: each head's direct effect, hover for the exact value."""
    vals = res.heads[row]
    vmax = float(vals.abs().max()) or 1.0
    out = ['<table style="border-collapse:collapse;font-family:monospace;font-size:12px">',
           f'<caption style="text-align:left;padding:4px 0;font-family:sans-serif">Direct effect of every head on '
           f"{html.escape(res.direction)} (blue: up, red: down; scale ±{vmax:.3g}).</caption>",
           "<tr><th></th>" + "".join(f'<th style="padding:2px 4px">H{h}</th>' for h in range(res.n_heads)) + "</tr>"]
    for l in range(res.n_layers - 1, -1, -1):
        cells = []
        for h in range(res.n_heads):
            v = float(vals[l, h])
            color = "#fff" if abs(v) / vmax > 0.55 else "#111"
            cells.append(f'<td title="L{l}H{h}: {v:+.4f}" style="background:{_diverging(v / vmax)};color:{color};'
                         f'padding:2px 4px;border:1px solid #eee;text-align:right">{v:+.2f}</td>')
        out.append(f'<tr><th style="text-align:right;padding:2px 6px">L{l}</th>{"".join(cells)}</tr>')
    out.append("</table>")
    return "\n".join(out)


def layer_bars(res, row: int = 0, width: int = 720, bar_h: int = 14) -> str:
    """Per-layer bars (SVG): each MLP's direct effect, and the layer's attention (heads + b_O) beside it."""
    L = res.n_layers
    mlp = res.mlps[row].tolist() if res.mlps is not None else [0.0] * L
    attn = (res.heads[row].sum(-1) + (res.attn_bias[row] if res.attn_bias is not None else 0.0)).tolist()
    vmax = max([abs(v) for v in mlp + attn] + [1e-9])
    left, mid = 70, (width + 70) / 2
    half = (width - left) / 2 - 10
    height = 24 + L * (2 * bar_h + 6)
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10" '
             f'font-family="monospace">',
             f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height}" stroke="#999"/>',
             f'<text x="{left}" y="12">■ MLP</text><text x="{left + 60}" y="12" fill="#6baed6">■ attention (heads + '
             f"b_O); blue: up, red: down</text>"]
    for l in range(L):
        y = 20 + l * (2 * bar_h + 6)
        parts.append(f'<text x="{left - 6}" y="{y + bar_h + 3}" text-anchor="end">L{l}</text>')
        bars = ((mlp[l], "#08519c" if mlp[l] >= 0 else "#cb181d"), (attn[l], "#9ecae1" if attn[l] >= 0 else "#fcbba1"))
        for k, (v, fill) in enumerate(bars):
            w = abs(v) / vmax * half
            x = mid if v >= 0 else mid - w
            name = f"MLP{l}" if k == 0 else f"L{l} attention"
            parts.append(f'<rect x="{x:.1f}" y="{y + k * bar_h}" width="{w:.1f}" height="{bar_h - 2}" fill="{fill}">'
                         f"<title>{name}: {v:+.4f}</title></rect>")
            if k == 0:
                tx = x + w + 3 if v >= 0 else x - 3
                anchor = "start" if v >= 0 else "end"
                parts.append(f'<text x="{tx:.1f}" y="{y + bar_h - 4}" text-anchor="{anchor}">{v:+.3f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def neuron_table(res, row: int = 0, k: int = 20) -> str:
    """The ``k`` neurons with the largest |direct effect| as an HTML table."""
    top = res.top_neurons_with_components(k, row)
    vmax = max([abs(v) for _, v in top] + [1e-9])
    rows = "".join(
        f'<tr><td style="padding:2px 8px">{c.label}</td><td style="padding:2px 8px">{c.layer}</td>'
        f'<td style="padding:2px 8px">{c.neuron}</td><td style="padding:2px 8px;text-align:right;'
        f'background:{_diverging(v / vmax)}">{v:+.4f}</td></tr>'
        for c, v in top
    )
    return ('<table style="border-collapse:collapse;font-family:monospace;font-size:12px">'
            f'<caption style="text-align:left;padding:4px 0;font-family:sans-serif">top neurons by |direct effect| '
            f"(activation x W_out[n] · direction)</caption><tr><th>neuron</th><th>layer</th><th>index</th>"
            f"<th>value</th></tr>{rows}</table>")


def source_views(res, row: int = 0, head: tuple[int, int] | None = None, n_heads: int = 8) -> list:
    """circuitsvis views: the prompt coloured by each token's contribution through ``head`` (default: the head with
    the largest |value|), and a multi-view over the ``n_heads`` largest heads."""
    import circuitsvis as cv
    import torch

    tops = [_head_label(label) for label, _ in res.top(n_heads, kinds="head", row=row)]
    if head is None:
        head = tops[0]
    tokens = res.str_tokens[row]
    n = len(tokens)
    l, h = head
    views = [cv.tokens.colored_tokens(tokens, res.sources[row, l, h, :n].tolist())]
    heads = [head] + [t for t in tops if t != head]
    values = torch.stack([res.sources[row, a, b, :n] for a, b in heads], -1).contiguous()  # [pos, heads]
    labels = [f"L{a}H{b} ({float(res.heads[row, a, b]):+.3f})" for a, b in heads]
    views.append(cv.tokens.colored_tokens_multi(tokens, values, labels))
    return views


def dla_fragment(res, row: int = 0, head: tuple[int, int] | None = None, top_k: int = 20) -> str:
    """Everything about one prompt as an offline HTML fragment."""
    tops = res.top(1, kinds="head", row=row)
    head = head or _head_label(tops[0][0])
    pos = res.positions[row]
    consts = ", ".join(f"{k} {float(v[row]):+.4f}" for k, v in res.constants.items()) or "none"
    prompt = "".join(res.str_tokens[row])
    top_parts = "".join(f"<li><code>{esc(label)}</code> {v:+.4f}</li>" for label, v in res.top(top_k // 2, row=row))
    parts = [
        f'<p class="note">Direct logit attribution of <b>{html.escape(res.direction)}</b> on '
        f"<b>{html.escape(res.model_name)}</b> at position {pos} (<code>{esc(res.str_tokens[row][pos])}</code>). "
        f"Model's own value: {float(res.actual[row]):+.4f} ({res.actual_source}); sum of all parts: "
        f"{float(res.total[row]):+.4f}; constants: {consts}. Final-norm scale frozen from the run "
        f"({float(res.scale[row]):.4g}). Prompt: <code>{html.escape(prompt)}</code></p>",
        f"<h2>Largest parts</h2><ol>{top_parts}</ol>",
        "<h2>Heads (layer x head)</h2>",
        head_grid(res, row),
        "<h2>MLPs and attention per layer</h2>",
        layer_bars(res, row),
        "<h2>Top neurons</h2>",
        neuron_table(res, row, top_k),
        f"<h2>Source positions through L{head[0]}H{head[1]}</h2>",
        '<p class="note">Each token coloured by its contribution through the head (attention weight x value x W_O on '
        "the direction); the values sum to the head's direct effect. The second view switches between the largest "
        "heads.</p>",
        circuitsvis_block(source_views(res, row, head)),
    ]
    return "\n".join(parts)


def dla_page(res, path=None, row: int = 0, head: tuple[int, int] | None = None, top_k: int = 20) -> str:
    text = page(f"Direct logit attribution: {res.model_name}", dla_fragment(res, row, head, top_k))
    if path is not None:
        write_atomic(path, text)
    return text


def dla_notebook(res, row: int = 0, head: tuple[int, int] | None = None, top_k: int = 20):
    from mi_lenses.viz.html import OfflineHTML

    fragment = dla_fragment(res, row, head, top_k)
    return OfflineHTML(fragment, fragment)


def dla_table(res, k: int = 15, row: int | None = 0):
    """A rich table: the ``k`` largest parts, then the ``k // 2`` largest neurons, each with a signed bar."""
    from rich.table import Table
    from rich.text import Text

    parts = res.top(k, row=row)
    neurons = res.top_neurons(max(1, k // 2), row=row)
    vmax = max([abs(v) for _, v in parts + neurons] + [1e-9])
    if row is None:
        where = "mean over prompts"
    else:
        where = f"position {res.positions[row]} {res.str_tokens[row][res.positions[row]]!r}"
    r = 0 if row is None else row
    actual = float(res.actual.mean() if row is None else res.actual[r])
    total = float(res.total.mean() if row is None else res.total[r])
    table = Table(title=f"DLA of {res.direction} · {res.model_name} · {where}",
                  caption=f"model's value {actual:+.4f}, sum of parts {total:+.4f}")
    table.add_column("part", style="bold")
    table.add_column("value", justify="right")
    table.add_column("", min_width=22)
    for label, v in parts + [("—", None)] + neurons:
        if v is None:
            table.add_row(Text("top neurons", style="dim"), "", "")
            continue
        n = int(round(abs(v) / vmax * 20))
        bar = Text("█" * n, style="blue" if v >= 0 else "red")
        table.add_row(label, f"{v:+.4f}", bar)
    return table
