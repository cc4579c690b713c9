"""Views of an attribution graph: the terminal summary (the strongest paths into each logit) and the interactive page
(an inline SVG and a few lines of script, nothing loaded from the network): nodes by layer (rows, tokens at the
bottom, logits on top) × position (columns), edges drawn with width by ``|weight|`` (blue positive, red negative), a
node's label, activation, influence and feature logit lens on hover, and a slider that hides the nodes beyond a share
of the cumulative influence."""

from __future__ import annotations

import html
import json
from typing import Any

from rich.table import Table

from mi_lenses.viz.html import esc

_KIND_COLOR = {"feature": "#7aa6d8", "error": "#b0b0b0", "token": "#9ccc8c", "logit": "#f2b45c"}


def paths_into(g: Any, row: int, top_k: int, max_depth: int = 8) -> list[tuple[float, list[int], list[float]]]:
    """The ``top_k`` strongest paths ending at row ``row`` of ``g.weighted_edges`` (a beam search backwards): per path
    its strength (the product of each edge's share of its target's absolute input), its node indices (source first)
    and its edge weights."""
    E = g.weighted_edges
    lay = g.layout
    share = E.abs() / E.abs().sum(1, keepdim=True).clamp(min=1e-10)
    rows = lay.row_nodes().tolist()
    row_of = {n: r for r, n in enumerate(rows)}
    beam = [(1.0, [rows[row]], [])]
    done: list[tuple[float, list[int], list[float]]] = []
    for _ in range(max_depth):
        grown = []
        for strength, nodes, weights in beam:
            r = row_of.get(nodes[0])
            if r is None or not share[r].any():  # a token or error node, or a feature without inputs: a path start
                done.append((strength, nodes, weights))
                continue
            top = share[r].topk(min(top_k, int((share[r] > 0).sum()))).indices.tolist()
            grown += [(strength * float(share[r, c]), [c, *nodes], [float(E[r, c]), *weights]) for c in top]
        beam = sorted(grown, key=lambda b: -b[0])[:top_k]
        if not beam:
            break
    done += beam
    return sorted(done, key=lambda b: -b[0])[:top_k]


def graph_table(g: Any, top_k: int) -> Table:
    """Per logit node, the ``top_k`` strongest paths into it."""
    t = Table(title=f"{g.model_name}: attribution graph, strongest paths into each logit")
    for col in ("logit", "p", "share", "path (edge weights)"):
        t.add_column(col)
    lay = g.layout
    for k in range(lay.n_logits):
        row = lay.n_features + k
        for i, (strength, nodes, weights) in enumerate(paths_into(g, row, top_k)):
            steps = g._label(nodes[0]) + "".join(f" -({w:+.3g})-> {g._label(n)}" for n, w in zip(nodes[1:], weights))
            t.add_row(repr(g.logit_token_strs[k]) if i == 0 else "",
                      f"{float(g.logit_probabilities[k]):.3f}" if i == 0 else "", f"{strength:.3f}", steps)
    return t


def graph_data(g: Any, lens: dict[int, str]) -> dict[str, Any]:
    """Nodes (with their place, label, influence and hover text: ``lens`` per feature node) and edges for the page."""
    lay = g.layout
    cum = g.cumulative
    nodes = []
    for i, n in enumerate(g.nodes):
        row = -1 if n.kind == "token" else (g.n_layers if n.kind == "logit" else n.layer)
        info = [n.label]
        if n.activation is not None:
            info.append(f"activation {n.activation:.4g}")
        if n.probability is not None:
            info.append(f"p = {n.probability:.3f}")
        if cum is not None:
            info.append(f"cumulative influence {float(cum[i]):.3f}")
        if i in lens:
            info.append(lens[i])
        nodes.append({"x": n.position, "y": row, "kind": n.kind, "label": n.label, "info": "\n".join(info),
                      "influence": 0.0 if cum is None or n.kind in ("token", "logit") else float(cum[i])})
    E, rows = g.weighted_edges, lay.row_nodes()
    r, c = (E != 0).nonzero(as_tuple=True)
    edges = [[int(c_), int(rows[r_]), float(E[r_, c_])] for r_, c_ in zip(r.tolist(), c.tolist())]
    return {"nodes": nodes, "edges": edges, "tokens": list(g.str_tokens), "n_layers": g.n_layers}


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element: no ``</`` (a token ``</script>`` must not end the script)."""
    return json.dumps(data).replace("</", "<\\/")


def graph_fragment(p: Any, lens: dict[int, str], node_threshold: float, edge_threshold: float) -> str:
    """The page body of the pruned graph ``p`` (module docstring), pruned at the thresholds."""
    g = p
    data = graph_data(p, lens)
    replacement, completeness = p.scores()
    head = (f"<h3>Attribution graph of {html.escape(''.join(g.str_tokens))!s}</h3>"
            f"<p>{html.escape(p.model_name)}, {html.escape(p.transcoders_name)}: {p.layout.n_features} feature nodes, "
            f"{int((p.edge_mask if p.edge_mask is not None else p.edges != 0).sum())} edges of the {p.n_active} active "
            f"features' graph pruned at node threshold {node_threshold}, edge threshold {edge_threshold}; "
            f"replacement score {replacement:.3f}, completeness {completeness:.3f}. Hover a node for its feature "
            "logit lens; the slider hides nodes beyond a share of the cumulative influence.</p>")
    uid = f"mi-graph-{abs(hash(json.dumps(data['edges'][:50]))) % 10**8}"
    colors = json.dumps(_KIND_COLOR)
    tokens = "".join(f"<span style='margin-right:6px'>{i}:{esc(s)}</span>" for i, s in enumerate(g.str_tokens))
    return f"""{head}
<div id="{uid}"><label>influence shown: <input type="range" min="0.05" max="1" step="0.01" value="1"> <span></span>
</label><div style="font-size:11px;color:#555">{tokens}</div><svg style="width:100%;border:1px solid #ddd"></svg>
<pre style="min-height:3em;font-size:12px"></pre></div>
<script>
(function() {{
  const data = {_script_json(data)}, colors = {colors};
  const root = document.getElementById("{uid}"), svg = root.querySelector("svg"), info = root.querySelector("pre");
  const slider = root.querySelector("input"), shown = root.querySelector("label span");
  const S = data.tokens.length, L = data.n_layers, W = Math.max(640, 60 * S), H = 40 * (L + 3);
  svg.setAttribute("viewBox", `0 0 ${{W}} ${{H}}`);
  const at = new Map(), ns = "http://www.w3.org/2000/svg";
  data.nodes.forEach((n, i) => {{ const k = (at.get(n.x + "," + n.y) || 0); at.set(n.x + "," + n.y, k + 1); n.k = k; }});
  const px = n => 30 + (W - 60) * (n.x + 0.5) / S + ((n.k % 5) - 2) * 7, py = n => H - 30 - 40 * (n.y + 1) - 6 * Math.floor(n.k / 5);
  const wmax = Math.max(1e-12, ...data.edges.map(e => Math.abs(e[2])));
  function draw() {{
    const cut = +slider.value; shown.textContent = cut.toFixed(2);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const on = data.nodes.map(n => n.influence <= cut);
    for (const [s, t, w] of data.edges) {{
      if (!on[s] || !on[t]) continue;
      const l = document.createElementNS(ns, "line"), a = data.nodes[s], b = data.nodes[t];
      l.setAttribute("x1", px(a)); l.setAttribute("y1", py(a)); l.setAttribute("x2", px(b)); l.setAttribute("y2", py(b));
      l.setAttribute("stroke", w > 0 ? "#3b6fd8" : "#d84b3b"); l.setAttribute("stroke-opacity", 0.55);
      l.setAttribute("stroke-width", 0.4 + 4 * Math.abs(w) / wmax); svg.appendChild(l);
    }}
    data.nodes.forEach((n, i) => {{
      if (!on[i]) return;
      const c = document.createElementNS(ns, "circle");
      c.setAttribute("cx", px(n)); c.setAttribute("cy", py(n)); c.setAttribute("r", n.kind === "feature" ? 5 : 6);
      c.setAttribute("fill", colors[n.kind]); c.setAttribute("stroke", "#333");
      const title = document.createElementNS(ns, "title"); title.textContent = n.info; c.appendChild(title);
      c.addEventListener("mouseenter", () => {{ info.textContent = n.info; }});
      svg.appendChild(c);
    }});
  }}
  slider.addEventListener("input", draw); draw();
}})();
</script>"""


def intervention_table(model_name: str, edits: dict[str, float], rows: list[dict[str, Any]]) -> Table:
    """A ``GraphIntervention``: per logit node its logit and its change in the replacement model and in the model."""
    t = Table(title=f"{model_name}: editing {', '.join(f'{k}={v:g}' for k, v in edits.items())}")
    for col in ("logit node", "logit", "Δ replacement model", "Δ model"):
        t.add_column(col)
    for r in rows:
        t.add_row(repr(r["token"]), f"{r['logit']:.4g}", f"{r['replacement_delta']:+.4g}",
                  "-" if r["model_delta"] is None else f"{r['model_delta']:+.4g}")
    return t


def intervention_fragment(rows: list[dict[str, Any]]) -> str:
    """The same as an HTML table."""
    body = "".join(f"<tr><td>{esc(r['token'])}</td><td>{r['logit']:.4g}</td><td>{r['replacement_delta']:+.4g}</td>"
                   f"<td>{'-' if r['model_delta'] is None else format(r['model_delta'], '+.4g')}</td></tr>"
                   for r in rows)
    return ("<table><tr><th>logit node</th><th>logit</th><th>Δ replacement model</th><th>Δ model</th></tr>"
            f"{body}</table>")
