"""The report page (a table of contents and one section per part) and its terminal summary."""

from __future__ import annotations

import html
import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mi_lenses.viz.attention import attention_fragment
from mi_lenses.viz.attribution import dla_fragment
from mi_lenses.viz.html import circuitsvis_block, line_chart
from mi_lenses.viz.lens import circuitsvis_views, rank_grid, top1_grid
from mi_lenses.viz.patching import patching_fragment
from mi_lenses.viz.terminal import Fitted
from mi_lenses.viz.tokens import stride, visible

TITLES = {"logit_lens": "Logit lens", "patchscope": "Identity Patchscope vs logit lens",
          "dla": "Direct logit attribution", "attention": "Attention", "patching": "Activation patching",
          "graph": "Attribution graph"}
ANCHORS = {"logit_lens": "logit-lens", "patchscope": "patchscope", "dla": "dla", "attention": "attention",
           "patching": "patching", "graph": "graph"}


def _side(*blocks: str) -> str:
    """Blocks side by side, wrapping below each other when the page is too narrow."""
    return '<div class="side">' + "".join(f"<div>{b}</div>" for b in blocks if b) + "</div>"


def _last(res) -> int:
    return res.columns(0)[-1]


def lens_section(rep) -> str:

    ll, tl = rep.logit_lens, rep.tuned_lens
    lenses = [ll] + ([tl] if tl is not None else [])
    last = _last(ll)
    where = f"at the last token <code>{html.escape(repr(rep.str_tokens[-1]))}</code>"
    parts = [
        f'<p class="note">Every residual state decoded through the final norm and unembedding ({ll.point}: row '
        f"<code>l_pre</code> is the input of block l){'; the tuned lens beside it' if tl is not None else ''}. "
        "Hover a cell for the top tokens."
        + (f" The prompt's last {len(ll.positions)} of its {len(rep.str_tokens)} positions "
           "(mi_lenses.logit_lens(model, prompt) decodes them all)." if len(ll.positions) < len(rep.str_tokens) else "")
        + "</p>",
        '<div id="lens-grids"><h3>Top-1 token per layer and position</h3>',
        _side(*(top1_grid(res) for res in lenses)),
        "</div>",
        f"<h3>Rank of the model's prediction {html.escape(repr(rep.prediction))}</h3>",
        _side(*(rank_grid(res, 0, rep.target_index("prediction")) for res in lenses)),
    ]
    if rep.answer != rep.prediction:
        parts += [f"<h3>Rank of the answer {html.escape(repr(rep.answer))}</h3>",
                  _side(*(rank_grid(res, 0, rep.target_index("answer")) for res in lenses))]
    if rep.wrong is not None and rep.wrong_id not in (rep.prediction_id, rep.answer_id):
        parts += [f"<h3>Rank of the wrong token {html.escape(repr(rep.wrong))}</h3>",
                  _side(*(rank_grid(res, 0, rep.target_index("wrong")) for res in lenses))]
    kl = {f"KL, {res.lens_name}": res.kl_bits[:, 0, last].tolist() for res in lenses}
    ent = {f"entropy, {res.lens_name}": res.entropy_bits[:, 0, last].tolist() for res in lenses}
    parts += [
        f'<div id="lens-curves"><h3>KL to the final distribution and entropy, {where}</h3>',
        _side(line_chart(ll.labels, kl, "KL(final ‖ layer) [bits]", width=500),
              line_chart(ll.labels, ent, "entropy [bits]", width=500)),
        f"<h3>Top tokens per layer, {where}</h3>",
        '<p class="note">The tokens with the highest probability at <i>any</i> layer (not only the last), and the '
        "answer; exact probabilities at every layer.</p>",
        _side(*(_trajectory_chart(t) for t in (rep.trajectory, rep.tuned_trajectory) if t is not None)),
        "</div>",
        "<h3>Per-layer statistics over the prompt (circuitsvis)</h3>",
        '<p class="note">Pick a layer in each view: tokens coloured by KL to the final distribution, the top-1 '
        "probability and the entropy at that layer.</p>",
        circuitsvis_block(circuitsvis_views(ll, 0)),
    ]
    return "\n".join(parts)


def _trajectory_chart(res) -> str:
    probs = res.target_probs[:, 0, 0]  # [rows, T]
    series = {f"{res.target_strs[t]!r}": probs[:, t].tolist() for t in range(probs.shape[1])}
    return line_chart(res.labels, series, f"probability ({res.lens_name})", width=500, y_min=0.0, y_max=1.0)


def patchscope_section(rep) -> str:
    sw = rep.patchscope
    layers = [str(l) for l in sw.source_layers]
    series = {"identity Patchscope": sw.per_layer().tolist(), "logit lens": rep.lens_precision.tolist()}
    if rep.tuned_precision is not None:
        series["tuned lens"] = rep.tuned_precision.tolist()
    toks = ", ".join(f"<code>{html.escape(repr(t))}</code>" for t in sw.source_tokens)
    surp = sw.surprisal_bits_mean[:, 0]
    head = "<tr><th>layer l</th>" + "".join(f"<th>{html.escape(k)} prec@1</th>" for k in series) \
        + "<th>Patchscope surprisal (bits)</th></tr>"
    rows = "".join(
        f"<tr><td>{l}</td>" + "".join(f"<td>{v[a]:.3f}</td>" for v in series.values())
        + f"<td>{float(surp[a]):.2f}</td></tr>" for a, l in enumerate(layers))
    return "\n".join([
        f'<p class="note">The state after block l (resid_post) at each of the last {len(sw.positions)} positions '
        f"({toks}) is patched into the identity prompt <code>{html.escape(repr(sw.target_name))}</code> at layer l "
        "and read as its next token (Ghandeharioun et al. 2024). A hit: the readout's top-1 equals the model's own "
        "next-token prediction at that position; the logit lens"
        f"{' and the tuned lens' if rep.tuned_precision is not None else ''} decode the same states. Computed in "
        f"{sw.seconds:.1f} s.</p>",
        line_chart(layers, series, "precision@1", y_min=0.0, y_max=1.0),
        f'<div class="scroll"><table class="data">{head}{rows}</table></div>',
    ])


def dla_section(rep) -> str:

    return dla_fragment(rep.dla, batch=0, top_k=rep.dla.view_options["top_k"], level=3)


def attention_section(rep) -> str:

    top = rep.top_head
    note = ""
    if top is not None:
        note = (f'<p class="note">The head and neuron views open on L{top[0]}H{top[1]}, the head with the largest '
                f"direct effect on {html.escape(rep.dla.metric)}, at the last token.</p>")
    layer, head = top if top is not None else (None, None)
    return note + attention_fragment(rep.attention, batch=0, top_k=rep.attention.view_options["top_k"], layer=layer,
                                     head=head, query=-1, level=3)


def patching_section(rep) -> str:
    note = (f'<p class="note">The corrupted prompt <code>{html.escape(rep.corrupted or "")}</code> against the prompt: '
            "which activations carry the difference. First the residual stream entering each block, patched from the "
            "prompt into the corrupted run one (layer, position) at a time; then every head's attribution.</p>")
    top_k = rep.patching.view_options["top_k"]
    return note + patching_fragment(rep.patching, top_k, level=3) + "<h3>Heads (attribution patching)</h3>" + \
        patching_fragment(rep.patching_heads, top_k, level=4)


def graph_section(rep) -> str:
    g = rep.graph
    note = (f'<p class="note">The prompt traced through {html.escape(g.transcoders_name)}: the features that carry '
            "the computation into the most probable next tokens, their edges (direct effects in the local replacement "
            "model), pruned to the nodes and edges that hold most of the influence.</p>")
    return note + g.fragment()


RENDER = {"logit_lens": lens_section, "patchscope": patchscope_section, "dla": dla_section,
          "attention": attention_section, "patching": patching_section, "graph": graph_section}


def report_fragment(rep) -> str:
    """The whole page body."""
    shown = [s for s in rep.sections if s in RENDER]
    pred = (f"The model predicts <code>{html.escape(repr(rep.prediction))}</code> (p = {rep.prediction_prob:.3f})"
            f"{'' if rep.answer == rep.prediction else f'; the answer studied is <code>{html.escape(repr(rep.answer))}</code>'}"
            f"{'' if rep.wrong is None else f', against <code>{html.escape(repr(rep.wrong))}</code>'}.")
    title = {**TITLES, "logit_lens": "Logit lens and tuned lens" if rep.tuned_lens is not None else "Logit lens"}
    toc = "".join(f'<li><a href="#{ANCHORS[s]}">{title[s]}</a></li>' for s in shown)
    body = [
        f'<p class="note">Prompt ({len(rep.str_tokens)} tokens): <code>{html.escape(rep.prompt)}</code>. {pred} '
        f"Model: <b>{html.escape(rep.model_name)}</b>.</p>",
        f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>',
    ]
    for i, s in enumerate(shown, 1):
        body.append(f'<section id="{ANCHORS[s]}"><h2>{i}. {title[s]}</h2>\n{RENDER[s](rep)}\n</section>')
    timing = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in rep.seconds.items())
    body.append(f'<p class="note">Timings: {timing}.</p>')
    return "\n".join(body)


def report_table(rep, max_layers: int = 16):
    """The terminal summary (a rich ``Group``)."""

    prompt = repr(rep.prompt if len(rep.prompt) <= 100 else "…" + rep.prompt[-99:])  # a long prompt's end
    items: list = [Text.assemble(("prompt ", "bold"), prompt, f" ({len(rep.str_tokens)} tokens) · ",
                                 ("prediction ", "bold"), f"{rep.prediction!r} p={rep.prediction_prob:.3f}",
                                 *(((" · answer ", "bold"), repr(rep.answer)) if rep.answer != rep.prediction else ()),
                                 *(((" · wrong ", "bold"), repr(rep.wrong)) if rep.wrong is not None else ()))]
    if rep.logit_lens is not None:
        items.append(rep.logit_lens.table(max_positions=8, max_layers=max_layers))
        recs = rep.per_layer()
        cols = [("layer", "layer", None), ("top-1", "top1", None), ("p", "top1_prob", ".2f"),
                ("rank pred.", "rank_prediction", "d")]
        if rep.answer != rep.prediction:
            cols.append(("rank answer", "rank_answer", "d"))
        cols += [("KL bits", "kl_bits", ".2f"), ("entropy", "entropy_bits", ".2f")]
        if rep.tuned_lens is not None:
            cols += [("tuned top-1", "tuned_top1", None), ("tuned KL", "tuned_kl_bits", ".2f")]
        if rep.patchscope is not None:
            cols += [("Patchscope prec@1", "patchscope_prec_at_1", ".2f"), ("logit lens prec@1", "lens_prec_at_1",
                                                                           ".2f")]
            if rep.tuned_precision is not None:
                cols.append(("tuned prec@1", "tuned_prec_at_1", ".2f"))
        items.append(Fitted(lambda width: _per_layer_table(rep, recs, cols, width, max_layers)))
    if rep.dla is not None:
        d = rep.dla
        parts = ", ".join(f"{label} {v:+.2f}" for label, v in d.top(8, batch=0))
        items.append(Text.assemble(("DLA ", "bold"), f"of {d.metric}: {parts} (sum of parts "
                                   f"{float(d.total[0]):+.3f} = model {float(d.actual[0]):+.3f})"))
    if rep.attention is not None:
        a = rep.attention
        lines = [("sink", a.top_heads("sink", 3)), ("previous-token", a.top_heads("previous_token", 3))]
        if a.induction is not None:
            lines.append(("induction", a.top_heads("induction", 3)))
        items.append(Text.assemble(("attention ", "bold"), " · ".join(
            f"{name}: " + ", ".join(f"{label} {v:.2f}" for label, v in heads) for name, heads in lines)))
    if rep.patching is not None:
        cells = ", ".join(f"{label} {v:+.2f}" for label, v in rep.patching.top(4))
        heads = ", ".join(f"{label} {v:+.2f}" for label, v in rep.patching_heads.top(4))
        items.append(Text.assemble(("patching ", "bold"), f"resid_pre (exact): {cells} · heads (attribution): {heads}"))
    if rep.graph is not None:
        g = rep.graph
        replacement, completeness = g.scores()
        items.append(Text.assemble(("graph ", "bold"), f"{g.layout.n_features} of {g.n_active} active features, "
                                   f"replacement score {replacement:.2f}, completeness {completeness:.2f}; most "
                                   f"influential: {', '.join(g.top_features(4))}"))
    items.append(Text(f"computed in {rep.seconds.get('total', float('nan')):.1f} s (" + ", ".join(
        f"{k.replace('_', ' ')} {v:.1f} s" for k, v in rep.seconds.items() if k != "total") + ")", style="dim"))
    return Group(*items)


def _per_layer_table(rep, recs: list[dict], cols: list[tuple], width: int, max_layers: int):
    """The per-layer table with as many of ``cols`` (in order) as fit ``width``."""

    rows = stride(len(recs), max_layers)
    texts = {key: [_cell(recs[r][key], fmt) for r in rows] for _, key, fmt in cols}
    widths = [min(16, max([len(head)] + [len(t) for t in texts[key]])) + 3 for head, key, _ in cols]
    keep, used = [], 1
    for c, w in zip(cols, widths):
        if used + w > width and keep:
            break
        keep.append(c)
        used += w
    table = Table(title="per layer, at the last token", pad_edge=False)
    for head, _, fmt in keep:  # token columns are cut with an ellipsis, numbers never
        table.add_column(head, justify="left" if fmt is None else "right", no_wrap=True, overflow="ellipsis",
                         max_width=16 if fmt is None else None, min_width=None if fmt is None else len(head))
    for i in reversed(range(len(rows))):
        table.add_row(*[texts[key][i] for _, key, _ in keep])
    notes = []
    if len(keep) < len(cols):
        notes.append(f"{len(cols) - len(keep)} column(s) left out to fit the width")
    if rep.patchscope is not None:
        notes.append(f"precision@1 over the last {len(rep.patchscope.positions)} positions; row l_pre is the output "
                     "of block l - 1")
    table.caption = "; ".join(notes)
    return table


def _cell(value, fmt: str | None) -> str:
    if fmt is None:
        return visible(value) if isinstance(value, str) else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return format(value, fmt)
