"""Figures of circuit analysis: patching grids (layer x position labelled with the tokens, layer x head, per-head
position maps), the largest cells, edge tables and the circuit as a graph (inline SVG, offline), in the notebook, the
page and the terminal. Signed values use the diverging scale (blue: towards the clean run, red: away from it)."""

from __future__ import annotations

import html
import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import rich_style
from mi_lenses.viz.html import esc, heat_grid, line_chart
from mi_lenses.viz.terminal import Fitted, fit_count
from mi_lenses.viz.tokens import distinct, stride, visible

_METHOD = {"exact": "exact activation patching (one forward pass per cell)",
           "attribution": "attribution patching: (a_source - a_base) · ∂metric/∂a at the base run",
           "eap_ig": "EAP-IG: (a_source - a_base) · the gradient integrated along the input path",
           "path": "path patching (Wang et al. 2022)"}


def _vmax(values) -> float:
    finite = values[~values.isnan()] if values.numel() else values
    return float(finite.abs().max()) if finite.numel() and float(finite.abs().max()) > 0 else 1.0


def _fmt(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.2f}"


def _grid2d(res, values, col_labels: list[str], caption: str, name) -> str:
    """Layers (last on top) x columns of a ``[L, C]`` tensor."""
    vmax = _vmax(values)
    order = list(range(len(res.layers) - 1, -1, -1))
    return heat_grid(
        [f"L{res.layers[i]}" for i in order], col_labels,
        [[_fmt(float(values[i, j])) for j in range(len(col_labels))] for i in order],
        [[float(values[i, j]) / vmax for j in range(len(col_labels))] for i in order],
        [[f"{name(res.layers[i], j)}: {float(values[i, j]):+.4f}" for j in range(len(col_labels))] for i in order],
        caption=caption + f" (scale ±{vmax:.3g}).", signed=True)


def position_labels(res) -> list[str]:
    return distinct([visible(t) for t in res.pos_labels])


def grids(res) -> list[str]:
    """The heat maps of a result: one ``[L, P]`` or ``[L, H]`` map; for ``[L, P, H]`` the heads' maximum over
    positions and the position maps of the four heads with the largest cells; for a layer-only grid a chart; for
    neurons and features the largest cell per layer."""
    axes = res.grid_axes
    v = res.values.float()
    what = html.escape(res.what)
    if axes == ["layer", "pos"]:
        return [_grid2d(res, v, position_labels(res), f"Patching {what} per layer and position",
                        lambda l, j: f"L{l} {res.pos_labels[j]!r}")]
    if axes == ["layer", "head"]:
        return [_grid2d(res, v, [f"H{h}" for h in range(v.shape[1])], f"Patching {what} per head (every position)",
                        lambda l, h: f"L{l}H{h}")]
    if axes == ["layer", "pos", "head"]:
        peak = v.abs().nan_to_num(0.0).amax(1)
        heads = peak.amax(0).topk(min(4, v.shape[2])).indices.tolist()
        out = [_grid2d(res, peak, [f"H{h}" for h in range(v.shape[2])],
                       f"Largest |value| of each head over positions ({what})", lambda l, h: f"L{l}H{h}")]
        out += [_grid2d(res, v[:, :, h], position_labels(res), f"Head {h} per layer and position",
                        lambda l, j, h=h: f"L{l}H{h} {res.pos_labels[j]!r}") for h in heads]
        return out
    if axes == ["layer"]:
        return [line_chart([f"L{l}" for l in res.layers], {res.what: v.tolist()}, "patched metric")]
    # neurons, features: the largest per layer
    flat = v.reshape(v.shape[0], -1)
    best = flat.abs().nan_to_num(0.0).argmax(-1)
    rows = "".join(f"<tr><td>L{l}</td><td>{esc(res.label(res.cell(i * flat.shape[1] + int(best[i]))))}</td>"
                   f"<td>{float(flat[i, best[i]]):+.4f}</td></tr>" for i, l in enumerate(res.layers))
    return [f'<table class="data"><tr><th>layer</th><th>cell</th><th>largest value</th></tr>{rows}</table>']


def top_cells(res, top_k: int) -> str:
    items = "".join(f"<li><code>{esc(label)}</code> {v:+.4f}</li>" for label, v in res.top(top_k))
    return f"<ol>{items}</ol>"


def settings_note(res) -> str:
    clean, corr = "".join(res.clean_tokens), "".join(res.corrupted_tokens)
    engine = {"replay": f"{res.cells_run} cells run in {res.passes} batched forward passes from the patched block "
                        f"on, {res.cells_skipped} with identical activations not run",
              "forward": f"{res.cells_run} cells run in {res.passes} batched whole forward passes, "
                         f"{res.cells_skipped} with identical activations not run"}.get(res.engine, "")
    extra = ""
    if res.completeness is not None:
        cut, diff = res.completeness
        extra = (f" Completeness: the embedding cut's attributions sum to {cut:+.4f}; the metric difference is "
                 f"{diff:+.4f} ({res.ig_steps} steps).")
    norm = ("normalised: 0 = the corrupted run, 1 = the clean run" if res.normalised else
            f"raw values; clean {res.clean_value:+.4f}, corrupted {res.corrupted_value:+.4f}")
    return (f'<p class="note">{_METHOD.get(res.method, res.method)}, {res.mode} '
            f"({'clean activations into the corrupted run' if res.mode == 'denoise' else 'corrupted into clean'})"
            f", metric {html.escape(res.metric)} ({norm}; clean {res.clean_value:+.4f}, corrupted "
            f"{res.corrupted_value:+.4f}), on <b>{html.escape(res.model_name)}</b>"
            f"{f' over {res.n_prompts} prompt pairs' if res.n_prompts > 1 else ''}. Clean: "
            f"<code>{html.escape(clean)}</code>; corrupted: <code>{html.escape(corr)}</code>. "
            f"{engine}{'.' if engine else ''} Computed in {res.seconds:.2f} s.{extra}</p>")


def patching_fragment(res, top_k: int, level: int = 2) -> str:
    h = f"h{level}"
    return "\n".join([settings_note(res), *grids(res), f"<{h}>Largest cells</{h}>", top_cells(res, top_k)])


def patching_table(res, top_k: int, max_layers: int):
    """The grid in the terminal (``[L, P]`` / ``[L, H]``, layers strided to ``max_layers`` rows; other grids as
    their largest cells) and the ``top_k`` largest cells."""
    items: list = []
    v = res.values.float()
    if res.grid_axes in (["layer", "pos"], ["layer", "head"]):
        cols = position_labels(res) if res.grid_axes[1] == "pos" else [f"H{h}" for h in range(v.shape[1])]
        cols = [c if len(c) <= 10 else c[:9] + "…" for c in cols]
        vmax = _vmax(v)
        rows = stride(len(res.layers), max_layers)

        def build(width: int) -> Table:  # as many columns as fit, the last ones (where the answer is read)
            widths = [max(len(c), 5) + 3 for c in cols]
            n = fit_count(widths, width - 8)
            shown = list(range(len(cols) - n, len(cols)))
            table = Table(title=f"{res.title} · {res.what} · {res.method} · {res.mode}", pad_edge=False)
            table.add_column("layer", justify="right", style="bold", no_wrap=True)
            for j in shown:
                table.add_column(cols[j], justify="right", no_wrap=True, min_width=min(len(cols[j]), 10))
            for i in reversed(rows):
                table.add_row(f"L{res.layers[i]}", *[Text(_fmt(float(v[i, j])),
                                                          style=rich_style(float(v[i, j]) / vmax, signed=True))
                                                     for j in shown])
            notes = [f"metric {res.metric}; clean {res.clean_value:+.3f}, corrupted {res.corrupted_value:+.3f}"]
            if len(rows) < len(res.layers):
                notes.append(f"{len(rows)} of {len(res.layers)} layers shown")
            if n < len(cols):
                notes.append(f"the last {n} of {len(cols)} columns shown (a wider console shows more)")
            table.caption = "; ".join(notes)
            return table

        items.append(Fitted(build))
    top = Table(title="largest cells", pad_edge=False)
    top.add_column("cell")
    top.add_column("value", justify="right")
    for label, val in res.top(top_k):
        top.add_row(label, Text(f"{val:+.4f}", style="blue" if val >= 0 else "red"))
    items.append(top)
    if res.completeness is not None:
        cut, diff = res.completeness
        items.append(Text(f"completeness: embedding cut {cut:+.4f} vs metric difference {diff:+.4f}", style="dim"))
    return Group(*items)


# ------------------------------------------------------------------------------------------------ edges and circuits
def _node_of(label: str) -> str:
    """The graph node of a writer or reader label (``L3H1.q`` -> ``L3H1``, ``MLP2.in`` -> ``MLP2``)."""
    return label.split(".")[0]


def _layer_of(node: str, n_layers: int) -> int:
    if node == "embed":
        return -1
    if node == "logits":
        return n_layers
    if node.startswith("MLP"):
        return int(node[3:])
    return int(node[1:].replace("KV", "H").split("H")[0])


def circuit_svg(edges: list[tuple[str, str, float]], n_layers: int, n_heads: int, n_kv_heads: int,
                width: int = 760) -> str:
    """The edges as a layered graph (inline SVG): layers bottom (embeddings) to top (logits), heads left to right,
    the MLP on the right, key/value heads of grouped-query attention between their query heads; blue edges push the
    metric towards the clean run, red away, width by |score|; q edges solid, k dashed, v dotted."""
    nodes = {"embed", "logits"} | {_node_of(w) for w, _, _ in edges} | {_node_of(r) for _, r, _ in edges}
    layers = sorted({_layer_of(n, n_layers) for n in nodes})
    row = {l: i for i, l in enumerate(reversed(layers))}
    row_h, left, top = 34, 60, 20
    col = (width - left - 90) / max(n_heads, 1)
    height = top * 2 + row_h * (len(layers) - 1) + 10
    group = max(1, n_heads // max(n_kv_heads, 1))

    def xy(node: str) -> tuple[float, float]:
        l = _layer_of(node, n_layers)
        y = top + row[l] * row_h
        if node in ("embed", "logits"):
            return left + col * (n_heads - 1) / 2, y
        if node.startswith("MLP"):
            return left + col * n_heads + 30, y
        if "KV" in node:
            g = int(node.split("KV")[1])
            return left + col * (g * group + (group - 1) / 2), y + 9
        return left + col * int(node.split("H")[1]), y

    vmax = max([abs(s) for _, _, s in edges] + [1e-9])
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="9" '
             'font-family="monospace">']
    for l in layers:
        y = top + row[l] * row_h
        name = "embed" if l == -1 else "logits" if l == n_layers else f"L{l}"
        parts.append(f'<text x="4" y="{y + 3}" fill="#666">{name}</text>')
    dash = {"k": ' stroke-dasharray="5,3"', "v": ' stroke-dasharray="1,2"'}
    for w, r, s in sorted(edges, key=lambda e: abs(e[2])):
        (x1, y1), (x2, y2) = xy(_node_of(w)), xy(_node_of(r))
        channel = r.rsplit(".", 1)[-1] if "." in r else ""
        colour = "#2166ac" if s >= 0 else "#b2182b"
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                     f'stroke-opacity="0.75" stroke-width="{0.6 + 3.5 * abs(s) / vmax:.2f}"{dash.get(channel, "")}>'
                     f"<title>{html.escape(w)} → {html.escape(r)}: {s:+.4f}</title></line>")
    for n in sorted(nodes):
        x, y = xy(n)
        shape = (f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="#fdd49e" stroke="#666"/>'
                 if n.startswith("MLP") or n in ("embed", "logits") else
                 f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#deebf7" stroke="#666"/>')
        parts.append(f"<g>{shape}<title>{html.escape(n)}</title></g>")
        label_y = y + 12 if "KV" in n else y - 6  # key/value heads sit just below their query heads
        parts.append(f'<text x="{x + 8:.1f}" y="{label_y:.1f}" fill="{"#777" if "KV" in n else "#222"}">'
                     f"{html.escape(n)}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def _edge_rows(edges: list[tuple[str, str, float]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{html.escape(r)}</td><td>{s:+.4f}</td></tr>"
                   for w, r, s in edges)
    return f'<table class="data"><tr><th>writer</th><th>reader</th><th>score</th></tr>{rows}</table>'


def edges_fragment(res, top_k: int, level: int = 2) -> str:
    h = f"h{level}"
    top = res.top_edges(top_k)
    nodes = "".join(f"<li><code>{html.escape(n)}</code> {v:+.4f}</li>" for n, v in res.top_nodes(top_k))
    method = "EAP-IG" if res.method == "eap_ig" else "edge attribution patching"
    return "\n".join([
        f'<p class="note">{method} on <b>{html.escape(res.model_name)}</b>: {res.n_edges} edges between the '
        f"embeddings, {res.n_layers} x {res.n_heads} heads, the MLPs and the logits; metric {html.escape(res.metric)}"
        f" (clean {res.clean_value:+.4f}, corrupted {res.corrupted_value:+.4f}), {res.mode}"
        f"{f', {res.ig_steps} integration steps' if res.ig_steps else ''}. Computed in {res.seconds:.2f} s.</p>",
        f"<{h}>The {len(top)} largest edges</{h}>",
        '<div class="scroll">' + circuit_svg(top, res.n_layers, res.n_heads, res.n_kv_heads) + "</div>",
        _edge_rows(top),
        f"<{h}>Largest nodes (sum over their edges)</{h}><ol>{nodes}</ol>",
    ])


def edges_table(res, top_k: int):
    table = Table(title=f"{res.title} · largest edges", pad_edge=False)
    for c in ("writer", "reader", "score"):
        table.add_column(c, justify="right" if c == "score" else "left")
    for w, r, s in res.top_edges(top_k):
        table.add_row(w, r, Text(f"{s:+.4f}", style="blue" if s >= 0 else "red"))
    table.caption = f"{res.n_edges} edges; metric {res.metric}"
    return table


def _circuit_edges(c) -> list[tuple[str, str, float]]:
    if c.kind == "edges":
        return [(w, r, c.scores.get(f"{w}->{r}", 0.0)) for w, r in c.edges]
    # a node circuit drawn as its nodes feeding the logits
    return [(n, "logits", c.scores.get(n, 0.0)) for n in c.nodes]


DRAWN_EDGES, LISTED_EDGES = 300, 60  # the graph and the table of a large circuit show its strongest edges


def circuit_fragment(c, level: int = 2) -> str:
    h = f"h{level}"
    if c.faithfulness is None:
        faith = "Not measured yet: mi_lenses.faithfulness(model, circuit)."
    else:
        faith = (f"Faithfulness {c.faithfulness:+.4f} (the clean run with everything outside the circuit ablated by "
                 f"{c.ablation}: metric {c.ablated_value:+.4f}; clean {c.spec.clean_value:+.4f}, corrupted "
                 f"{c.spec.corrupted_value:+.4f}).")
    what = f"{c.size} of {c.n_total} {c.kind}"
    edges = sorted(_circuit_edges(c), key=lambda e: -abs(e[2]))
    drawn = (f" The graph shows the {DRAWN_EDGES} strongest edges, the table the {LISTED_EDGES} strongest."
             if len(edges) > DRAWN_EDGES else "")
    return "\n".join([
        f'<p class="note">Circuit of <b>{html.escape(c.model_name)}</b>: {what}. {faith}{drawn}</p>',
        f"<{h}>The circuit</{h}>",
        '<div class="scroll">' + circuit_svg(edges[:DRAWN_EDGES], c.n_layers, c.n_heads, c.n_kv_heads) + "</div>",
        _edge_rows(edges[:LISTED_EDGES]) if c.kind == "edges" else
        "<ol>" + "".join(f"<li><code>{html.escape(n)}</code> {c.scores.get(n, 0.0):+.4f}</li>" for n in c.nodes)
        + "</ol>",
    ])


def circuit_table(c, top_k: int):
    table = Table(title=f"{c.title} · {c.size} of {c.n_total} {c.kind}", pad_edge=False)
    cols = ("writer", "reader", "score") if c.kind == "edges" else ("node", "score")
    for col in cols:
        table.add_column(col, justify="right" if col == "score" else "left")
    for w, r, s in _circuit_edges(c)[:top_k]:
        cells = (w, r) if c.kind == "edges" else (w,)
        table.add_row(*cells, Text(f"{s:+.4f}", style="blue" if s >= 0 else "red"))
    if c.faithfulness is not None:
        table.caption = f"faithfulness {c.faithfulness:+.4f} ({c.ablation} ablation)"
    return table
