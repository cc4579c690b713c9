"""Figures of a direct logit attribution: layer x head heat map, per-layer MLP bars, top neurons, and the prompt's
tokens coloured by their contribution through a head (circuitsvis), as an offline page, a notebook view and a rich
table. Signed values use a diverging scale: red pushes the direction down, blue pushes it up."""

from __future__ import annotations

import html

import circuitsvis as cv
import torch
from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import css, diverging
from mi_lenses.viz.html import circuitsvis_block, esc, heat_grid


def _head_label(label: str) -> tuple[int, int]:
    l, h = label[1:].split("H")
    return int(l), int(h)


def head_grid(res, batch: int = 0) -> str:
    """Layers (rows, last layer on top) x heads: each head's direct effect, hover for the exact value."""
    vals = res.heads[batch]
    vmax = float(vals.abs().max()) or 1.0
    layers = list(range(res.n_layers - 1, -1, -1))
    heads = range(res.n_heads)
    return heat_grid(
        [f"L{l}" for l in layers], [f"H{h}" for h in heads],
        [[f"{float(vals[l, h]):+.2f}" for h in heads] for l in layers],
        [[float(vals[l, h]) / vmax for h in heads] for l in layers],
        [[f"L{l}H{h}: {float(vals[l, h]):+.4f}" for h in heads] for l in layers],
        caption=f"Direct effect of every head on {html.escape(res.metric)} (blue: up, red: down; scale "
                f"±{vmax:.3g}).",
        signed=True,
    )


def layer_bars(res, batch: int = 0, width: int = 720, bar_h: int = 14) -> str:
    """Per-layer bars (SVG): each MLP's direct effect, and the layer's attention (heads + b_O) beside it."""
    L = res.n_layers
    mlp = res.mlps[batch].tolist() if res.mlps is not None else [0.0] * L
    attn = res.heads[batch].sum(-1) + (res.attn_bias[batch] if res.attn_bias is not None else 0.0)
    for l in range(L):  # what the layer wrote under a hook on its attention output
        edit = res.interventions.get(f"blocks.{l}.hook_attn_out")
        attn[l] += 0.0 if edit is None else float(edit[batch])
    attn = attn.tolist()
    vmax = max([abs(v) for v in mlp + attn] + [1e-9])
    left, mid = 70, (width + 70) / 2
    half = (width - left) / 2 - 50  # room for the value label beside the longest bar
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


def neuron_table(res, batch: int, top_k: int) -> str:
    """The ``top_k`` neurons with the largest |direct effect| as an HTML table."""
    top = res.top_neurons_with_components(top_k, batch=batch)
    vmax = max([abs(v) for _, v in top] + [1e-9])
    rows = "".join(
        f'<tr><td style="padding:2px 8px">{c.label}</td><td style="padding:2px 8px">{c.layer}</td>'
        f'<td style="padding:2px 8px">{c.neuron}</td><td style="padding:2px 8px;text-align:right;'
        f'background:{css(diverging(v / vmax))}">{v:+.4f}</td></tr>'
        for c, v in top
    )
    return ('<table style="border-collapse:collapse;font-family:monospace;font-size:12px">'
            f'<caption style="text-align:left;padding:4px 0;font-family:sans-serif">top neurons by |direct effect| '
            f"(activation x W_out[n] · direction)</caption><tr><th>neuron</th><th>layer</th><th>index</th>"
            f"<th>value</th></tr>{rows}</table>")


def source_views(res, batch: int = 0, head: tuple[int, int] | None = None, n_heads: int = 8) -> list:
    """circuitsvis views: the prompt coloured by each token's contribution through ``head`` (default: the head with
    the largest |value|), and a multi-view over the ``n_heads`` largest heads."""
    tops = [_head_label(label) for label, _ in res.top(n_heads, kinds="head", batch=batch)]
    if head is None:
        head = tops[0]
    tokens = res.str_tokens[batch]
    n = len(tokens)
    l, h = head
    src = torch.nan_to_num(res.sources[batch], nan=0.0)  # a head whose sources are unavailable shows none
    views = [cv.tokens.colored_tokens(tokens, src[l, h, :n].tolist())]
    heads = [head] + [t for t in tops if t != head]
    values = torch.stack([src[a, b, :n] for a, b in heads], -1).contiguous()  # [pos, heads]
    labels = [f"L{a}H{b} ({float(res.heads[batch, a, b]):+.3f})" for a, b in heads]
    views.append(cv.tokens.colored_tokens_multi(tokens, values, labels))
    return views


def dla_fragment(res, batch: int, top_k: int, head: tuple[int, int] | None = None, level: int = 2) -> str:
    """Everything about one prompt as an offline HTML fragment (headings at ``level``): the ``top_k`` largest parts
    and neurons."""
    h = f"h{level}"
    ranked = [_head_label(label) for label, _ in res.top(res.n_layers * res.n_heads, kinds="head", batch=batch)]
    usable = [t for t in ranked if not torch.isnan(res.sources[batch, t[0], t[1]]).any()] or ranked
    head = head or usable[0]
    pos = res.positions[batch]
    consts = ", ".join(f"{k} {float(v[batch]):+.4f}" for k, v in res.constants.items()) or "none"
    prompt = "".join(res.str_tokens[batch])
    top_parts = "".join(f"<li><code>{esc(label)}</code> {v:+.4f}</li>" for label, v in res.top(top_k, batch=batch))
    parts = [
        f'<p class="note">Direct logit attribution of <b>{html.escape(res.metric)}</b> on '
        f"<b>{html.escape(res.model_name)}</b> at position {pos} (<code>{esc(res.str_tokens[batch][pos])}</code>). "
        f"Model's own value: {float(res.actual[batch]):+.4f} ({res.actual_source}); sum of all parts: "
        f"{float(res.total[batch]):+.4f}; constants: {consts}. Final-norm scale frozen from the run "
        f"({float(res.scale[batch]):.4g}). Prompt: <code>{html.escape(prompt)}</code></p>",
        _interventions_note(res, batch),
        f"<{h}>Largest parts</{h}><ol>{top_parts}</ol>",
        f"<{h}>Heads (layer x head)</{h}>",
        head_grid(res, batch),
        f"<{h}>MLPs and attention per layer</{h}>",
        layer_bars(res, batch),
        f"<{h}>Top neurons</{h}>",
        neuron_table(res, batch, top_k),
        f"<{h}>Source positions through L{head[0]}H{head[1]}</{h}>",
        '<p class="note">Each token coloured by its contribution through the head (attention weight x value x W_O on '
        "the direction); the values sum to the head's direct effect. The second view switches between the largest "
        "heads.</p>",
        circuitsvis_block(source_views(res, batch, head)),
    ]
    return "\n".join(parts)


def _interventions_note(res, batch: int) -> str:
    """What the user's hooks changed: the edits (each a part of its own) and the heads without source positions."""
    if not res.interventions and not res.sources_unavailable:
        return ""
    edits = "".join(f"<li><code>edit@{html.escape(hook)}</code> {float(v[batch]):+.4f}</li>"
                    for hook, v in res.interventions.items())
    heads = "".join(f"<li><code>{label}</code>: {html.escape(reason)}</li>"
                    for label, reason in res.sources_unavailable.items())
    return ('<p class="note">Your hooks changed what these components wrote; each edit is a part of its own, so the '
            "parts still sum to the hooked model's value.</p>"
            + (f"<ul>{edits}</ul>" if edits else "")
            + (f'<p class="note">Source positions unavailable:</p><ul>{heads}</ul>' if heads else ""))


def dla_table(res, top_k: int, batch: int | None = 0):
    """A rich table: the ``top_k`` largest parts, then the ``top_k`` largest neurons, each with a signed bar."""
    parts = res.top(top_k, batch=batch)
    neurons = res.top_neurons(top_k, batch=batch)
    vmax = max([abs(v) for _, v in parts + neurons] + [1e-9])
    if batch is None:
        where = "mean over prompts"
    else:
        where = f"position {res.positions[batch]} {res.str_tokens[batch][res.positions[batch]]!r}"
    actual = float(res.actual.mean() if batch is None else res.actual[batch])
    total = float(res.total.mean() if batch is None else res.total[batch])
    table = Table(title=f"DLA of {res.metric} · {res.model_name} · {where}",
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


# ------------------------------------------------------------------------------------------------ neuron attribution
def neuron_attribution_table(res, batch: int, top_k: int):
    """A rich table of the ``top_k`` neurons (at a position) with the largest |direct effect|, each with a bar."""
    top = res.top_with_coords(top_k, batch=batch)
    vmax = max([abs(v) for _, v in top] + [1e-9])
    table = Table(title=f"Neuron attribution of {res.metric} · {res.model_name}",
                  caption=f"{res.values.shape[0]} layers x {res.values.shape[2]} positions x "
                          f"{res.values.shape[3]} neurons (prompt {batch})")
    for col in ("neuron", "layer", "position", "value"):
        table.add_column(col, justify="left" if col == "neuron" else "right", style="bold" if col == "neuron" else "")
    table.add_column("", min_width=22)
    for c, v in top:
        bar = Text("█" * int(round(abs(v) / vmax * 20)), style="blue" if v >= 0 else "red")
        table.add_row(c["label"], str(c["layer"]), str(c["position"]), f"{v:+.4f}", bar)
    return table


def neuron_attribution_fragment(res, batch: int, top_k: int) -> str:
    """Layers (last on top) x positions: the largest |direct effect| of any neuron there (hover: which neuron), then
    the ``top_k`` largest neurons."""
    vals = res.values[:, batch].detach().float().cpu()  # [L, P, N]
    best = vals.abs().argmax(-1, keepdim=True)  # [L, P, 1]: the neuron with the largest |value| (a model has MLPs)
    peak = vals.gather(-1, best)[..., 0]
    vmax = float(peak.abs().max()) or 1.0
    order = list(range(len(res.layers) - 1, -1, -1))
    grid = heat_grid(
        [f"L{res.layers[i]}" for i in order], [str(p) for p in res.positions],
        [[f"{float(peak[i, j]):+.2f}" for j in range(len(res.positions))] for i in order],
        [[float(peak[i, j]) / vmax for j in range(len(res.positions))] for i in order],
        [[f"L{res.layers[i]}{res.neuron_label(int(best[i, j, 0]))} at position {res.positions[j]}: "
          f"{float(peak[i, j]):+.4f}" for j in range(len(res.positions))] for i in order],
        caption=f"the largest |direct effect| of a neuron per layer and position (scale ±{vmax:.3g})", signed=True)
    rows = "".join(
        f'<tr><td style="padding:2px 8px">{html.escape(c["label"])}</td><td style="padding:2px 8px;text-align:right;'
        f'background:{css(diverging(v / max(vmax, 1e-9)))}">{v:+.4f}</td></tr>'
        for c, v in res.top_with_coords(top_k, batch=batch))
    return "\n".join([
        f'<p class="note">Direct effect of every MLP neuron on <b>{html.escape(res.metric)}</b> '
        f"(<b>{html.escape(res.model_name)}</b>, prompt {batch}): activation x W_out[n] · direction, the final "
        "norm's scale frozen per position.</p>",
        grid,
        f'<table class="data"><caption>the {top_k} largest neurons</caption><tr><th>neuron</th><th>value</th></tr>'
        f"{rows}</table>",
    ])
