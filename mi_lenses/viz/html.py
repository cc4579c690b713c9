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

import base64
import functools
import html
import json
import math
import struct
import zlib
from typing import Sequence

import torch
from circuitsvis.utils.render import RenderedHTML

from mi_lenses.viz.colors import css, diverging, sequential, text_on
from mi_lenses.viz.notebook import BUNDLE_OPEN, dedupe_bundles, notebook_html
from mi_lenses.viz.tokens import stride

_MARK = "CircuitsVis.render("


def _offline_html_class():

    class OfflineHTML(RenderedHTML):
        """circuitsvis ``RenderedHTML`` that always renders the inlined source (circuitsvis would probe the
        internet and then load its bundle from a CDN); in a Jupyter kernel the bundle goes into the first view of
        the session only (:mod:`mi_lenses.viz.notebook`)."""

        def _repr_html_(self) -> str:
            return notebook_html(self.local_src)

        def __str__(self) -> str:
            return self.local_src

        def __repr__(self) -> str:
            return f"<mi_lenses view: {len(self.local_src):,} characters of HTML; display it in a notebook>"

    return OfflineHTML


def __getattr__(name: str):
    if name == "OfflineHTML":
        return _offline_html_class()
    raise AttributeError(name)


def offline_html(fragment: str):
    """An HTML fragment as a circuitsvis ``RenderedHTML`` that renders offline in a notebook."""
    fragment = dedupe_bundles(fragment)
    return _offline_html_class()(fragment, fragment)


def esc(text: str) -> str:
    """HTML-escape a token, making whitespace visible (a blank token shows as ␣)."""
    if text and not text.strip(" "):
        return "␣" * len(text)
    return html.escape(text).replace("\n", "\\n").replace(" ", "&nbsp;") or "&nbsp;"


def circuitsvis_block(components: Sequence) -> str:
    """Several circuitsvis ``RenderedHTML`` objects as one offline block: the JS bundle inlined once, as a classic
    script (it defines the global ``CircuitsVis``), then one module script that renders every component as soon as
    ``window.CircuitsVis`` exists. A page holding several blocks keeps only the first bundle
    (:func:`dedupe_bundles`); a notebook output may hold none and use the one an earlier output defined
    (:mod:`mi_lenses.viz.notebook`)."""
    divs, calls, ids, bundle = [], [], [], None
    for comp in components:
        src = comp.local_src
        head, _, script = src.partition('<script crossorigin type="module">')
        at = script.find(_MARK)
        if at < 0:  # unknown layout: fall back to each component's own inlined source
            return "\n".join(c.local_src for c in components)
        divs.append(_closed_div(head.strip()))
        ids.append(_div_id(head))
        bundle = bundle or _bundle_source(script[:at])
        calls.append(script[at:].replace("</script>", "").strip())
    if not divs:
        return ""
    return (f"{BUNDLE_OPEN}\n{bundle}\nwindow.CircuitsVis = CircuitsVis;\n</script>\n" + "\n".join(divs)
            + '\n<script type="module">\n' + _WAIT.replace("IDS", json.dumps(ids)).replace("CALLS", "\n".join(calls))
            + "\n</script>")


# Renders the calls once window.CircuitsVis exists (at once on a page that inlines the bundle; in a notebook, when
# the output that carries it has run). Without it after 10 s, the mount points say what to do, and keep waiting.
_WAIT = """(function mount(tries) {
  const ids = IDS;
  if (!window.CircuitsVis) {
    if (tries === 200) for (const id of ids) {
      const el = document.getElementById(id);
      if (el && !el.childElementCount) el.textContent = "This view waits for the circuitsvis bundle, which the "
        + "first mi_lenses view of the notebook carries: run the notebook again in a fresh kernel.";
    }
    setTimeout(() => mount(tries + 1), tries < 200 ? 50 : 500);
    return;
  }
  for (const id of ids) { const el = document.getElementById(id); if (el && !el.childElementCount) el.textContent = ""; }
CALLS
})(0);"""


def _div_id(head: str) -> str:
    """The id of circuitsvis's mount point ``<div id="circuits-vis-..." .../>``."""
    return head.split('id="', 1)[1].split('"', 1)[0] if 'id="' in head else ""


def _bundle_source(js: str) -> str:
    """The inlined circuitsvis bundle, without its source-map comment (the map is not shipped with the page)."""
    return "\n".join(line for line in js.strip().splitlines() if not line.startswith("//# sourceMappingURL="))


def _closed_div(head: str) -> str:
    """circuitsvis writes its mount point as ``<div id=... />``, which HTML does not close: the div would swallow
    everything after it, and React would then replace all of that. Close it."""
    if head.startswith("<div") and head.endswith("/>"):
        return head[:-2].rstrip() + "></div>"
    return head


def page(title: str, body: str) -> str:
    """A standalone HTML document."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 17px; margin-top: 28px; }} h3 {{ font-size: 14px; margin: 20px 0 6px; }}
.note {{ color: #666; font-size: 13px; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
.side {{ display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }}
.side > div {{ min-width: 0; max-width: 100%; }}
nav.toc {{ background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px 16px; display: inline-block; }}
nav.toc ol {{ margin: 4px 0; padding-left: 20px; }}
section {{ border-top: 1px solid #e1e4e8; margin-top: 24px; }}
table.data {{ border-collapse: collapse; font-size: 12px; }}
table.data td, table.data th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{dedupe_bundles(body)}
</body></html>
"""


def hooks_note(names: Sequence[str]) -> str:
    """The note a page opens with when the result was computed under the user's own hooks (empty otherwise)."""
    if not names:
        return ""
    listed = ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
    return (f'<p class="note hooks" style="background:#fff8e1;border:1px solid #f0d58c;padding:6px 10px">Computed on the '
            f"model as you hooked it: {len(names)} hook point(s) held your hooks during every forward pass of this "
            f"result ({listed}).</p>\n")


# What every cell of a heat grid shares, written once per grid instead of once per cell (a grid of 31 rows x 14
# positions is 434 cells; the colours stay on the cells). A class, so it holds in a notebook output as on a page.
_GRID_CSS = ("<style>.mil-grid td{padding:2px 4px;border:1px solid #eee;max-width:90px;overflow:hidden;"
             "white-space:nowrap;text-overflow:ellipsis}</style>")


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
    [0, 1] (sequential scale) or, with ``signed``, in [-1, 1] (diverging scale); NaN is white. Cells never wrap
    (long tokens are cut with an ellipsis; the hover title has them whole), the table scrolls sideways when it is
    wider than the page, and the row labels stay in view while it does."""
    sticky = "position:sticky;left:0;background:#fff;z-index:1"
    out = [_GRID_CSS, '<div class="scroll"><table class="mil-grid" style="border-collapse:collapse;'
                      'font-family:monospace;font-size:12px">']
    if caption:
        out.append(f'<caption style="text-align:left;padding:4px 0;font-family:sans-serif">{caption}</caption>')
    out.append(f'<tr><th style="{sticky}"></th>' + "".join(
        f'<th title="{html.escape(c)}" style="padding:2px 4px;white-space:nowrap;max-width:90px;overflow:hidden;'
        f'text-overflow:ellipsis">{esc(c)}</th>' for c in col_labels) + "</tr>")
    for i, label in enumerate(row_labels):
        cells = []
        for j in range(len(col_labels)):
            s = shade[i][j]
            bg = css(diverging(s) if signed else sequential(s))
            title = f' title="{html.escape(titles[i][j])}"' if titles else ""
            cells.append(f'<td{title} style="background:{bg};color:{text_on(s)}">{esc(text[i][j])}</td>')
        out.append(f'<tr><th style="text-align:right;padding:2px 6px;white-space:nowrap;{sticky}">{esc(label)}</th>'
                   f'{"".join(cells)}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


def line_chart(
    x_labels: Sequence[str], series: dict[str, Sequence[float]], y_label: str, width: int = 720, height: int = 260,
    y_min: float | None = None, y_max: float | None = None,
) -> str:
    """A small inline SVG line chart: one polyline per series, a dot per value with its exact value on hover.
    The y axis spans the data (and 0) unless ``y_min``/``y_max`` fix it; x labels are strided to at most 16 and
    always include the last one."""
    colors = ["#08519c", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#8c6d31", "#17becf"]
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    lo, hi = (min(values + [0.0]), max(values + [1e-9])) if values else (0.0, 1.0)
    lo, hi = (lo if y_min is None else y_min), (hi if y_max is None else y_max)
    legend = min(170, 12 + 6 * max([len(name) for name in series] + [0]))  # the legend sits right of the plot
    left, right, top, bottom = 56, legend, 12, 48
    n = max(len(x_labels) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / n
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo or 1))
        return x, y

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10">']
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
                 f'stroke="#999"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>')
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        _, y = xy(0, v)
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{v:.3g}</text>')
    for i in stride(len(x_labels), 16):
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
        c = colors[k % len(colors)]
        ok = [(i, float(v)) for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        pts = " ".join(f"{xy(i, v)[0]:.1f},{xy(i, v)[1]:.1f}" for i, v in ok)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"><title>'
                     f'{html.escape(name)}</title></polyline>')
        parts += [f'<circle cx="{xy(i, v)[0]:.1f}" cy="{xy(i, v)[1]:.1f}" r="2.5" fill="{c}"><title>'
                  f'{html.escape(name)} @ {html.escape(x_labels[i])}: {v:.4g}</title></circle>' for i, v in ok]
        parts.append(f'<text x="{width - right + 8}" y="{top + 12 + 14 * k}" fill="{c}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


@functools.lru_cache(maxsize=1)
def _palette() -> bytes:
    """The sequential scale as a 256-colour PNG palette."""
    return bytes(c for i in range(256) for c in sequential(i / 255))


def png_data_uri(values) -> str:
    """A ``[height, width]`` tensor of values in [0, 1] as an inline PNG (``data:`` URI) on the sequential colour
    scale (palette PNG, NaN white): small thumbnails that need no script and no network."""

    h, w = values.shape
    palette = _palette()
    idx = (torch.nan_to_num(values.float(), nan=0.0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in idx)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
           + chunk(b"PLTE", palette) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
