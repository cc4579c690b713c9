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
    neurons the largest neuron per layer."""
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
    # neurons: the largest per layer
    flat = v.reshape(v.shape[0], -1)
    best = flat.abs().nan_to_num(0.0).argmax(-1)
    rows = "".join(f"<tr><td>L{l}</td><td>{int(best[i])}</td><td>{float(flat[i, best[i]]):+.4f}</td></tr>"
                   for i, l in enumerate(res.layers))
    return [f'<table class="data"><tr><th>layer</th><th>cell</th><th>largest value</th></tr>{rows}</table>']


def top_cells(res, k: int = 12) -> str:
    items = "".join(f"<li><code>{esc(label)}</code> {v:+.4f}</li>" for label, v in res.top(k))
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
    return (f'<p class="note">{_METHOD.get(res.method, res.method)}, {res.direction} '
            f"({'clean activations into the corrupted run' if res.direction == 'denoise' else 'corrupted into clean'})"
            f", metric {html.escape(res.metric)} ({norm}; clean {res.clean_value:+.4f}, corrupted "
            f"{res.corrupted_value:+.4f}), on <b>{html.escape(res.model_name)}</b>"
            f"{f' over {res.n_prompts} prompt pairs' if res.n_prompts > 1 else ''}. Clean: "
            f"<code>{html.escape(clean)}</code>; corrupted: <code>{html.escape(corr)}</code>. "
            f"{engine}{'.' if engine else ''} Computed in {res.seconds:.2f} s.{extra}</p>")


def patching_fragment(res, level: int = 2) -> str:
    h = f"h{level}"
    return "\n".join([settings_note(res), *grids(res), f"<{h}>Largest cells</{h}>", top_cells(res)])


def patching_table(res, max_rows: int = 16):
    """The grid in the terminal (``[L, P]`` / ``[L, H]``; other grids as their largest cells) and the top cells."""
    items: list = []
    v = res.values.float()
    if res.grid_axes in (["layer", "pos"], ["layer", "head"]):
        cols = position_labels(res) if res.grid_axes[1] == "pos" else [f"H{h}" for h in range(v.shape[1])]
        vmax = _vmax(v)
        table = Table(title=f"{res.title} · {res.what} · {res.method} · {res.direction}", pad_edge=False)
        table.add_column("layer", justify="right", style="bold", no_wrap=True)
        for c in cols:
            table.add_column(c, justify="right", no_wrap=True, overflow="ellipsis", max_width=10)
        for i in reversed(stride(len(res.layers), max_rows)):
            table.add_row(f"L{res.layers[i]}", *[Text(_fmt(float(v[i, j])), style=rich_style(float(v[i, j]) / vmax,
                                                                                              signed=True))
                                                  for j in range(len(cols))])
        table.caption = (f"metric {res.metric}; clean {res.clean_value:+.3f}, corrupted {res.corrupted_value:+.3f}"
                         + (f"; {min(len(res.layers), max_rows)} of {len(res.layers)} layers shown"
                            if len(res.layers) > max_rows else ""))
        items.append(table)
    top = Table(title="largest cells", pad_edge=False)
    top.add_column("cell")
    top.add_column("value", justify="right")
    for label, val in res.top(10):
        top.add_row(label, Text(f"{val:+.4f}", style="blue" if val >= 0 else "red"))
    items.append(top)
    if res.completeness is not None:
        cut, diff = res.completeness
        items.append(Text(f"completeness: embedding cut {cut:+.4f} vs metric difference {diff:+.4f}", style="dim"))
    return Group(*items)
