"""Offline HTML building blocks: one page with the circuitsvis bundle inlined once, heat-map grids, line charts.

Every page works without a network: circuitsvis components come from ``RenderedHTML.local_src`` (never the CDN),
and everything else is plain HTML/SVG with inline styles. Colours come from :mod:`mi_lenses.viz.colors`.

Example:
    >>> grid = heat_grid(["L1", "L0"], ["a", " "], [["x", "y"], ["z", "w"]], [[1.0, 0.0], [0.5, -0.5]],
    ...                  signed=True)
    >>> grid.count("<td"), "␣" in grid       # a blank token stays visible
    (4, True)
"""

from __future__ import annotations

import html
import math
from typing import Sequence

from mi_lenses.viz.colors import css, diverging, sequential, text_on

_MARK = "CircuitsVis.render("


def _offline_html_class():
    from circuitsvis.utils.render import RenderedHTML

    class OfflineHTML(RenderedHTML):
        """circuitsvis ``RenderedHTML`` that always renders the inlined source (circuitsvis would probe the
        internet and then load its bundle from a CDN)."""

        def _repr_html_(self) -> str:
            return self.local_src

        def __str__(self) -> str:
            return self.local_src

    return OfflineHTML


def __getattr__(name: str):
    if name == "OfflineHTML":
        return _offline_html_class()
    raise AttributeError(name)


def offline_html(fragment: str):
    """An HTML fragment as a circuitsvis ``RenderedHTML`` that renders offline in a notebook."""
    return _offline_html_class()(fragment, fragment)


def esc(text: str) -> str:
    """HTML-escape a token, making whitespace visible (a blank token shows as ␣)."""
    if text and not text.strip(" "):
        return "␣" * len(text)
    return html.escape(text).replace("\n", "\\n").replace(" ", "&nbsp;") or "&nbsp;"


def circuitsvis_block(components: Sequence) -> str:
    """Several circuitsvis ``RenderedHTML`` objects as one offline block with the JS bundle inlined once."""
    divs, calls, bundle = [], [], None
    for comp in components:
        src = comp.local_src
        head, _, script = src.partition('<script crossorigin type="module">')
        at = script.find(_MARK)
        if at < 0:  # unknown layout: fall back to each component's own inlined source
            return "\n".join(c.local_src for c in components)
        divs.append(head.strip())
        bundle = bundle or script[:at]
        calls.append(script[at:].replace("</script>", "").strip())
    if not divs:
        return ""
    return "\n".join(divs) + '\n<script crossorigin type="module">\n' + (bundle or "") + "\n".join(calls) + "\n</script>"


def page(title: str, body: str) -> str:
    """A standalone HTML document."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
.note {{ color: #666; font-size: 13px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def heat_grid(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    text: Sequence[Sequence[str]],
    shade: Sequence[Sequence[float]],
    titles: Sequence[Sequence[str]] | None = None,
    caption: str = "",
    signed: bool = False,
) -> str:
    """An HTML table: one cell per (row, column) with text, a background shade and a hover title. Shades lie in
    [0, 1] (sequential scale) or, with ``signed``, in [-1, 1] (diverging scale); NaN is white."""
    out = ['<table style="border-collapse:collapse;font-family:monospace;font-size:12px">']
    if caption:
        out.append(f'<caption style="text-align:left;padding:4px 0;font-family:sans-serif">{caption}</caption>')
    out.append("<tr><th></th>" + "".join(f'<th style="padding:2px 4px">{esc(c)}</th>' for c in col_labels) + "</tr>")
    for i, label in enumerate(row_labels):
        cells = []
        for j in range(len(col_labels)):
            s = shade[i][j]
            bg = css(diverging(s) if signed else sequential(s))
            title = f' title="{html.escape(titles[i][j])}"' if titles else ""
            cells.append(
                f'<td{title} style="background:{bg};color:{text_on(s)};padding:2px 4px;border:1px solid #eee;'
                f'max-width:90px;overflow:hidden;white-space:nowrap">{esc(text[i][j])}</td>'
            )
        out.append(f'<tr><th style="text-align:right;padding:2px 6px">{esc(label)}</th>{"".join(cells)}</tr>')
    out.append("</table>")
    return "\n".join(out)


def line_chart(
    x_labels: Sequence[str], series: dict[str, Sequence[float]], y_label: str, width: int = 720, height: int = 260
) -> str:
    """A small inline SVG line chart (one polyline per series)."""
    colors = ["#08519c", "#e6550d", "#31a354", "#756bb1", "#636363", "#d62728", "#17becf", "#8c564b"]
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    lo, hi = (min(values + [0.0]), max(values + [1e-9])) if values else (0.0, 1.0)
    left, right, top, bottom = 56, 12, 12, 48
    n = max(len(x_labels) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / n
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo or 1))
        return x, y

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10">']
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>')
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        _, y = xy(0, v)
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{v:.3g}</text>')
    step = max(1, len(x_labels) // 16)
    for i in range(0, len(x_labels), step):
        x, _ = xy(i, lo)
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 12}" text-anchor="end" '
            f'transform="rotate(-40 {x:.1f} {height - bottom + 12})">{html.escape(x_labels[i])}</text>'
        )
    parts.append(
        f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 {(top + height - bottom) / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )
    for k, (name, vals) in enumerate(series.items()):
        pts = " ".join(f"{xy(i, v)[0]:.1f},{xy(i, v)[1]:.1f}" for i, v in enumerate(vals) if v is not None and math.isfinite(v))
        c = colors[k % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"><title>{html.escape(name)}</title></polyline>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 12 * k}" text-anchor="end" fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
