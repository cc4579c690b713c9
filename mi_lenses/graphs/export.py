"""circuit-tracer's graph JSON (``circuit_tracer.frontend.graph_models.Model``, schema 1): what its local frontend
and Neuronpedia open. Node ids follow ``create_graph_files``: a feature ``{layer}_{feature}_{pos}``, an error
``0_{layer}_{pos}``, a token ``E_{token id}_{pos}``, a logit ``{n_layers + 1}_{token id}_{pos}``; links are the kept
edges ``{"source", "target", "weight"}``, and only nodes on a link (and every token and logit) are listed.
"""

from __future__ import annotations

from typing import Any

from mi_lenses.graphs.nodes import ERROR, FEATURE, LOGIT, TOKEN


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(g: Any, i: int, logit_rank: int) -> dict[str, Any]:
    t = g.nodes_table
    k, l, p, f = int(t.kind[i]), int(t.layer[i]), int(t.pos[i]), int(t.feature[i])
    influence = None if g.cumulative is None else float(g.cumulative[i])
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "influence": influence, "activation": None, "ctx_idx": p}
    if k == FEATURE:
        return {**base, "node_id": f"{l}_{f}_{p}", "feature": _cantor(l, f), "layer": str(l),
                "feature_type": "cross layer transcoder", "jsNodeId": f"{l}_{f}-0", "activation": float(t.value[i])}
    if k == ERROR:
        return {**base, "node_id": f"0_{l}_{p}", "feature": -1, "layer": str(l),
                "feature_type": "mlp reconstruction error", "jsNodeId": f"{l}_{p}-0"}
    if k == TOKEN:
        return {**base, "node_id": f"E_{f}_{p}", "feature": p, "layer": "E", "feature_type": "embedding",
                "jsNodeId": f"E_{f}-{p}"}
    layer = str(g.n_layers + 1)
    prob = float(t.value[i])
    return {**base, "node_id": f"{layer}_{f}_{p}", "feature": f, "layer": layer, "feature_type": "logit",
            "token_prob": prob, "is_target_logit": logit_rank == 0, "jsNodeId": f"L_{f}-{p}", "influence": None,
            "clerp": f'Output "{g.logit_token_strs[logit_rank]}" (p={prob:.3f})'}


def circuit_tracer_json(g: Any, node_threshold: float) -> dict[str, Any]:
    """The JSON document of a pruned :class:`~mi_lenses.graphs.result.AttributionGraph` ``g`` (module docstring)."""
    t, lay = g.nodes_table, g.layout
    logit_rank = (t.kind == LOGIT).long().cumsum(0) - 1
    nodes = [_node(g, i, int(logit_rank[i])) for i in range(len(t.kind))]
    rows, cols = lay.row_nodes(), g.weighted_edges
    r, c = (g.edge_mask if g.edge_mask is not None else cols != 0).nonzero(as_tuple=True)
    links = [{"source": nodes[int(cols_i)]["node_id"], "target": nodes[int(rows[r_i])]["node_id"],
              "weight": float(g.edges[r_i, cols_i])} for r_i, cols_i in zip(r.tolist(), c.tolist())]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for i, n in enumerate(nodes) if n["node_id"] in linked or int(t.kind[i]) in (TOKEN, LOGIT)]
    metadata = {"slug": "mi-lenses-graph", "scan": g.transcoders_name, "transcoder_list": [],
                "prompt_tokens": list(g.str_tokens), "prompt": "".join(g.str_tokens),
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}
