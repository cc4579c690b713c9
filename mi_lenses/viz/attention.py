"""Figures of an attention result: per-head diagnostics maps (attention sink share, entropy, previous-token and
induction scores, layers x heads), the head view (one layer, every head; circuitsvis), the model view (every layer x
head as a thumbnail), the neuron view (one head and query: the ``scale * q_d * k_d`` terms of every key, the scores
and the softmax) and terminal tables. Colours come from :mod:`mi_lenses.viz.colors`."""

from __future__ import annotations

import html
import math

import circuitsvis as cv
import torch
from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import css, diverging, rich_style, sequential, text_on
from mi_lenses.viz.html import circuitsvis_block, esc, heat_grid, png_data_uri
from mi_lenses.viz.tokens import distinct

_NAMES = {"sink": "attention-sink share (mass on the first token)", "entropy": "entropy of the attention rows (bits)",
          "previous_token": "previous-token score", "induction": "induction score"}


def _rounded(t: torch.Tensor, digits: int = 4) -> list:
    """A tensor as nested lists of short floats (small circuitsvis props)."""
    scale = 10.0 ** digits
    return (torch.nan_to_num(t.double(), nan=0.0) * scale).round().div(scale).tolist()


def head_titles(res, batch: int) -> list[list[str]]:
    """Hover text of every head (kept layer i, head h): all its diagnostics."""
    out = []
    for i, l in enumerate(res.layers):
        row = []
        for h in range(res.n_heads):
            parts = [f"L{l}H{h} (KV head {h // (res.n_heads // res.n_kv_heads)})",
                     f"sink {float(res.sink[batch, i, h]):.3f}",
                     f"entropy {float(res.entropy_bits[batch, i, h]):.2f} bits",
                     f"previous-token {float(res.previous_token[batch, i, h]):.3f}"]
            if res.induction is not None:
                parts.append(f"induction {float(res.induction[i, h]):.3f}")
            row.append(" · ".join(parts))
        out.append(row)
    return out


def metric_map(res, metric: str, batch: int = 0) -> str:
    """Layers (rows, last on top) x heads: one diagnostic per head, shaded on the sequential scale (entropy
    relative to the uniform row over the prompt's tokens)."""
    vals = res.metric(metric, batch)
    order = list(range(len(res.layers) - 1, -1, -1))
    top = math.log2(max(res.lengths[batch], 2)) if metric == "entropy" else 1.0
    titles = head_titles(res, batch)
    return heat_grid(
        [f"L{res.layers[i]}" for i in order], [f"H{h}" for h in range(res.n_heads)],
        [[f"{float(vals[i, h]):.2f}" for h in range(res.n_heads)] for i in order],
        [[float(vals[i, h]) / top for h in range(res.n_heads)] for i in order],
        [titles[i] for i in order],
        caption=f"{_NAMES[metric].capitalize()}{f' (shade: / log2 {res.lengths[batch]} tokens)' if top != 1 else ''}",
    )


def score_maps(res, batch: int = 0) -> str:
    """The four diagnostics maps side by side (the sink map first)."""
    metrics = ["sink", "entropy", "previous_token"] + (["induction"] if res.induction is not None else [])
    return '<div class="side">' + "".join(f"<div>{metric_map(res, m, batch)}</div>" for m in metrics) + "</div>"


def top_heads_list(res, batch: int, top_k: int) -> str:
    """The ``top_k`` top heads of each diagnostic (and the lowest-entropy heads) as a small HTML table."""
    rows = [("sink", res.top_heads("sink", top_k, batch=batch)),
            ("previous-token", res.top_heads("previous_token", top_k, batch=batch)),
            ("lowest entropy (bits)", res.top_heads("entropy", top_k, batch=batch, lowest=True))]
    if res.induction is not None:
        rows.append(("induction", res.top_heads("induction", top_k, batch=batch)))
    body = "".join(f'<tr><th style="text-align:left">{name}</th>'
                   + "".join(f"<td><code>{label}</code> {v:.2f}</td>" for label, v in heads) + "</tr>"
                   for name, heads in rows)
    return f'<table class="data">{body}</table>'


HEAD_VIEW_WINDOW = 64  # tokens the interactive (circuitsvis) head view shows; longer prompts get a window


def head_view_component(res, batch: int, layer: int, window: int = HEAD_VIEW_WINDOW):
    """circuitsvis ``AttentionHeads`` of every head of one layer over the prompt's last ``window`` tokens (all of
    them when the prompt is no longer): the browser draws every query x key cell, which takes seconds per head
    beyond a few dozen tokens."""
    i = res.layer_index(layer)
    n = res.lengths[batch]
    lo = max(0, n - window)
    return cv.attention.attention_heads(
        attention=_rounded(res.block(batch, i, lo)),
        tokens=distinct(res.str_tokens[batch][:n])[lo:],
        attention_head_names=[f"L{res.layers[i]}H{h}" for h in range(res.n_heads)],
    )


def _thumb(p: torch.Tensor, size: int) -> torch.Tensor:
    """A pattern ``[n, n]`` as an image: max-pooled to ``size`` x ``size`` when larger (a one-token stripe stays
    visible), shade = sqrt(weight)."""
    p = torch.nan_to_num(p, nan=0.0)
    if p.shape[-1] > size:
        p = torch.nn.functional.adaptive_max_pool2d(p[None], (size, size))[0]
    return p.sqrt()


def head_images(res, batch: int, layer: int, size: int = 200) -> str:
    """Every head of ``layer`` as one image of its whole pattern (queries down, keys across), for prompts too long
    for the interactive view."""
    i = res.layer_index(layer)
    n = res.lengths[batch]
    titles = head_titles(res, batch)[i]
    px = min(max(n, 96), size)
    cells = "".join(
        f'<figure style="margin:0 8px 8px 0;display:inline-block;font-size:12px">'
        f'<img alt="L{res.layers[i]}H{h} pattern" title="{html.escape(titles[h])}" '
        f'src="{png_data_uri(_thumb(res.image(batch, i, h), size))}" width="{px}" height="{px}" '
        f'style="image-rendering:pixelated;border:1px solid #ddd;display:block">'
        f"<figcaption>L{res.layers[i]}H{h}</figcaption></figure>" for h in range(res.n_heads))
    return f"<div>{cells}</div>"


def head_view(res, batch: int, layer: int, window: int = HEAD_VIEW_WINDOW) -> str:
    """The head view: every head of ``layer`` (click one to enlarge it, hover a token to see where it looks),
    offline. A prompt longer than ``window`` tokens shows every head's whole pattern as an image first, then the
    interactive view of its last ``window`` tokens (at most the query rows the result kept)."""
    n = res.lengths[batch]
    window = min(window, res.rows(batch)[1])
    if n <= window:
        return circuitsvis_block([head_view_component(res, batch, layer, window)])
    return (f'<p class="note">{n} tokens: every head\'s whole pattern (queries down, keys across; shade = sqrt(weight)'
            f"{f', max-pooled to 200 x 200' if n > 200 else ''}; hover for its diagnostics):</p>"
            + head_images(res, batch, layer)
            + f'<p class="note">Interactive view of the last {window} tokens (queries and keys among them; the weight '
            f"on earlier keys, e.g. an attention sink on token 0, is in the images above):</p>"
            + circuitsvis_block([head_view_component(res, batch, layer, window)]))


def model_view(res, batch: int = 0, size: int = 48) -> str:
    """Every layer (rows, last on top) x head as a thumbnail of its pattern (queries down, keys across; shade =
    sqrt(weight)); prompts longer than ``size`` tokens are max-pooled to ``size`` x ``size``. Hover for the head's
    diagnostics."""
    n = res.lengths[batch]
    titles = head_titles(res, batch)
    px = max(56, min(n, size))
    rows = []
    for i in range(len(res.layers) - 1, -1, -1):
        cells = []
        for h in range(res.n_heads):
            cells.append(f'<td style="padding:1px"><img alt="L{res.layers[i]}H{h}" title="{html.escape(titles[i][h])}" '
                         f'src="{png_data_uri(_thumb(res.image(batch, i, h), size))}" width="{px}" '
                         f'height="{px}" style="image-rendering:pixelated;border:1px solid #ddd;display:block"></td>')
        rows.append(f'<tr><th style="text-align:right;padding:0 6px;font-size:12px">L{res.layers[i]}</th>'
                    f'{"".join(cells)}</tr>')
    head = "<tr><th></th>" + "".join(f'<th style="font-size:12px">H{h}</th>' for h in range(res.n_heads)) + "</tr>"
    pooled = f"; {n} tokens max-pooled to {size} x {size}" if n > size else ""
    return (f'<p class="note">Every head\'s pattern (queries down, keys across; shade = sqrt(attention weight)'
            f'{pooled}); hover a thumbnail for its diagnostics.</p><div class="scroll"><table '
            f'style="border-collapse:collapse">{head}{"".join(rows)}</table></div>')


def neuron_view(terms, max_keys: int = 48) -> str:
    """The neuron view of one head and query: per key, the ``scale * q_d * k_d`` term of every dimension
    (diverging colours), their sum (the score) and the softmax (the attention weight), then the row over the prompt
    (circuitsvis)."""
    K, d = terms.products.shape
    keys = list(range(K))
    if K > max_keys:
        keys = sorted(terms.probs.argsort(descending=True)[:max_keys].tolist())
    vmax = float(terms.products[keys].abs().max()) or 1.0
    pmax = float(terms.probs.max()) or 1.0
    labels = distinct(terms.str_tokens)
    cell = "width:9px;height:15px;padding:0;border:1px solid #fff"
    head = ('<tr><th style="text-align:right;padding:0 6px">key</th>'
            + "".join(f'<th style="font-size:8px;font-weight:normal;color:#888">{j if j % 8 == 0 else ""}</th>'
                      for j in range(d))
            + '<th style="padding:0 6px">score</th><th style="padding:0 6px">weight</th></tr>')
    rows = []
    for key in keys:
        prods = terms.products[key].tolist()
        cells = "".join(f'<td title="d{j}: {v:+.4f}" style="{cell};background:{css(diverging(v / vmax))}"></td>'
                        for j, v in enumerate(prods))
        p = float(terms.probs[key])
        rows.append(f'<tr><th style="text-align:right;padding:0 6px;white-space:nowrap;font-family:monospace">'
                    f"{esc(labels[key])} <span style=\"color:#999\">{key}</span></th>{cells}"
                    f'<td style="padding:0 6px;text-align:right">{float(terms.scores[key]):+.3f}</td>'
                    f'<td style="padding:0 6px;text-align:right;background:{css(sequential(p / pmax))};'
                    f'color:{text_on(p / pmax)}">{p:.3f}</td></tr>')
    shown = f"the {len(keys)} most attended of {K} keys, in order" if len(keys) < K else f"all {K} keys"
    top = ", ".join(f"d{j} {v:+.3f}" for j, v in terms.top_dims())
    caption = (f"L{terms.layer}H{terms.head} (reads KV head {terms.kv_head}) at query {terms.query} "
               f"<code>{esc(terms.str_tokens[terms.query])}</code>: term = {terms.scale:.4g} · q<sub>d</sub> · "
               f"k<sub>d</sub> for each of the {d} dimensions (after rotary; blue raises the score, red lowers it, "
               f"scale ±{vmax:.3g}); score = their sum; weight = softmax of the scores; {shown}. Largest terms for the "
               f"most attended key <code>{esc(terms.str_tokens[int(terms.probs.argmax())])}</code>: {top}.")
    table = (f'<p class="note">{caption}</p><div class="scroll"><table style="border-collapse:collapse;'
             f'font-size:12px">{head}{"".join(rows)}</table></div>')
    tokens = cv.tokens.colored_tokens(distinct(terms.str_tokens), _rounded(terms.probs))
    return table + '<p class="note">The attention weights over the prompt (the softmax row):</p>' \
        + circuitsvis_block([tokens])


def default_head(res, batch: int = 0) -> tuple[int, int]:
    """The head the views open on: the highest induction score, else the highest previous-token score."""
    label = res.top_heads("induction" if res.induction is not None else "previous_token", 1, batch=batch)[0][0]
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def attention_fragment(res, batch: int, top_k: int, layer: int | None = None, head: int | None = None,
                       query: int = -1, level: int = 2) -> str:
    """Everything about one prompt's attention as an offline HTML fragment (headings at ``level``; the ``top_k``
    top heads of each diagnostic)."""
    d_layer, d_head = default_head(res, batch)
    layer = d_layer if layer is None else res.layers[res.layer_index(layer)]
    if head is None:  # the layer's own top head by the same diagnostic
        metric = res.metric("induction" if res.induction is not None else "previous_token", batch)
        head = d_head if layer == d_layer else int(torch.nan_to_num(metric[res.layer_index(layer)], nan=-1).argmax())
    head = res.check_head(head)
    h = f"h{level}"
    n = res.lengths[batch]
    induction = (f"induction on {res.induction_tokens.shape[0]} sequences of {res.induction_length} random tokens "
                 f"repeated twice" if res.induction is not None else "induction skipped")
    parts = [
        f'<p class="note">Attention of <b>{html.escape(res.model_name)}</b>: {len(res.layers)} layers x '
        f"{res.n_heads} heads ({res.n_kv_heads} key/value heads), {n} tokens; {induction}. Sink share, entropy and "
        "previous-token score average the queries 1 .. n-1 (query 0 can only attend to itself).</p>",
        f'<div id="attention-diagnostics"><{h}>Per-head diagnostics</{h}>{score_maps(res, batch)}'
        f"{top_heads_list(res, batch, top_k)}</div>",
        f'<div id="head-view"><{h}>Head view: layer {layer}</{h}>'
        '<p class="note">Every head of the layer; click a head to enlarge it, hover a token to see where it '
        f"looks.</p>{head_view(res, batch, layer)}</div>",
        f'<div id="model-view"><{h}>Model view: every layer and head</{h}>{model_view(res, batch)}</div>',
    ]
    if res.q is not None and f"L{layer}H{head}" in res.qk_unavailable:
        parts.append(f'<p class="note">No neuron view for L{layer}H{head}: '
                     f'{html.escape(res.qk_unavailable[f"L{layer}H{head}"])}.</p>')
    elif res.q is not None:
        terms = res.qk_terms(layer, head, query, batch=batch)
        parts.append(f'<div id="neuron-view"><{h}>Neuron view: L{layer}H{head}</{h}>{neuron_view(terms)}</div>')
    else:
        parts.append(f'<p class="note">No neuron view: {html.escape(res.qk_note or "")}.</p>')
    return "\n".join(parts)


def attention_table(res, batch: int, value: str, top_k: int):
    """A rich table: layers (rows, last on top) x heads, each cell one diagnostic, shaded; the ``top_k`` top heads
    of each diagnostic in the caption."""
    vals = res.metric(value, batch)
    top = math.log2(max(res.lengths[batch], 2)) if value == "entropy" else 1.0
    table = Table(title=f"{_NAMES[value]} · {res.model_name}", pad_edge=False, min_width=72)
    table.add_column("layer", justify="right", style="bold", no_wrap=True)
    for h in range(res.n_heads):
        table.add_column(f"H{h}", justify="right", no_wrap=True)
    for i in range(len(res.layers) - 1, -1, -1):
        table.add_row(f"L{res.layers[i]}", *[Text(f"{float(vals[i, h]):.2f}", style=rich_style(float(vals[i, h]) / top))
                                           for h in range(res.n_heads)])
    lines = [f"{name}: " + ", ".join(f"{label} {v:.2f}" for label, v in res.top_heads(m, top_k, batch=batch))
             for name, m in (("sink", "sink"), ("previous-token", "previous_token"))]
    if res.induction is not None:
        lines.append("induction: " + ", ".join(f"{label} {v:.2f}" for label, v in res.top_heads("induction", top_k)))
    table.caption = "top heads · " + " · ".join(lines)
    return table


def qk_table(terms, top_k: int):
    """A rich table of the ``top_k`` most attended keys: position, token, score, weight and the largest terms."""
    table = Table(title=f"L{terms.layer}H{terms.head} at query {terms.query} {terms.str_tokens[terms.query]!r} · "
                        f"{terms.model_name}", caption="score = Σ_d scale · q_d · k_d; weight = softmax(score)")
    for col in ("key", "token", "score", "weight", "largest terms"):
        table.add_column(col, justify="right" if col in ("key", "score", "weight") else "left", no_wrap=True,
                         overflow="ellipsis", max_width=40 if col == "largest terms" else 16)
    for key in terms.probs.argsort(descending=True)[:top_k].tolist():
        dims = ", ".join(f"d{j} {v:+.2f}" for j, v in terms.top_dims(key, 3))
        table.add_row(str(key), repr(terms.str_tokens[key]), f"{float(terms.scores[key]):+.3f}",
                      f"{float(terms.probs[key]):.3f}", dims)
    return table
