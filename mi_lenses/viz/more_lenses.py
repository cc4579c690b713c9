"""Pages of the lenses beyond the logit and tuned lens: the attribute lens's faithfulness, SelfIE's interpretations
and the Diffusion Lens's gallery.

Example:
    >>> "<table" in selfie_rows([["a", "b"]], [[0.5, -0.5]], ["1 @ 2"], ["x"])
    True
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

from mi_lenses.viz.colors import css, diverging, text_on
from mi_lenses.viz.html import line_chart


def relation_fragment(ev: Any) -> str:
    """The page body of a :class:`~mi_lenses.lenses.attribute.RelationEvaluation`: faithfulness (and accuracy) per
    layer, and every subject's LRE top-1 per layer (green where it equals the LM's own)."""
    series = {"faithfulness": ev.faithfulness}
    if ev.accuracy and ev.accuracy[0] is not None:
        series["accuracy (objects)"] = ev.accuracy
    head = "".join(f"<th>{html.escape(s)}</th>" for s in ev.subjects)
    body = "".join(f"<tr><td>{html.escape(lab)}</td>" + "".join(
        f"<td style='color:{'#1a7f37' if p == ev.lm_top1[i] else '#b3261e'}'>{html.escape(repr(p))}</td>"
        for i, p in enumerate(ev.lre_top1[r])) + "</tr>" for r, lab in enumerate(ev.layers))
    lm = "".join(f"<td>{html.escape(repr(p))}</td>" for p in ev.lm_top1)
    return (f'<p class="note">{html.escape(ev.template)} · beta {ev.beta:g}: LRE top-1 from the subject '
            f"state of each layer, on held-out subjects (green: equals the LM's own top-1).</p>"
            + line_chart(ev.layers, series, "fraction")
            + f"<table style='font-size:12px'><tr><th>layer</th>{head}</tr><tr><td><b>LM</b></td>{lm}</tr>"
            + body + "</table>")


def selfie_rows(tokens: Sequence[Sequence[str]], relevancy: Sequence[Sequence[float]], labels: Sequence[str],
                sources: Sequence[str]) -> str:
    """A table of SelfIE interpretations: per row its label, source token, and the generated tokens shaded by
    relevancy (blue: the token comes from the injected state)."""
    rows = []
    for r, lab in enumerate(labels):
        spans = "".join(
            f'<span title="relevancy {float(relevancy[r][j]):+.3f}" style="background:'
            f'{css(diverging(float(relevancy[r][j])))};color:{text_on(float(relevancy[r][j]))}">'
            f"{html.escape(tok)}</span>" for j, tok in enumerate(tokens[r]))
        rows.append(f"<tr><td><b>{html.escape(lab)}</b></td><td>{html.escape(repr(sources[r]))}</td>"
                    f"<td style='font-family:monospace'>{spans}</td></tr>")
    return ("<table style='font-size:13px'><tr><th>layer @ pos</th><th>token</th><th>interpretation</th></tr>"
            + "".join(rows) + "</table>")


def selfie_fragment(res: Any) -> str:
    """The page body of a :class:`~mi_lenses.patchscopes.selfie.SelfIEResult`."""
    sources = [res.source_str_tokens[p] for p in res.source_positions]
    relevancy = [[float(res.relevancy[r, j]) for j in range(len(res.generated_tokens[r]))]
                 for r in range(len(res.row_labels))]
    return (f'<p class="note">Source: {html.escape(res.source_prompt)}. Interpretation prompt '
            f"{html.escape(repr(res.interpretation_prompt))}, state injected at the output of block "
            f"{res.inject_layer} at positions {res.placeholder_positions}. Token shade: relevancy "
            "p(injected) - p(plain) (blue: from the state).</p>"
            + selfie_rows(res.generated_tokens, relevancy, res.row_labels, sources))


def png_uri(img: Any) -> str:
    """A PIL image as an inline PNG ``data:`` URI (offline)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def diffusion_fragment(res: Any) -> str:
    """The page body of a :class:`~mi_lenses.diffusion.DiffusionLensResult`: one row per layer, one column per
    seed, images inlined."""
    head = "".join(f"<th>seed {s}</th>" for s in res.seeds)
    rows = "".join(f"<tr><th>layer {l}/{res.n_layers}</th>" + "".join(
        f'<td><img src="{png_uri(im)}" style="width:192px;image-rendering:pixelated"/></td>'
        for im in res.images[i]) + "</tr>" for i, l in enumerate(res.layers))
    s = res.settings
    return (f'<p class="note">{html.escape(res.prompt)}: text-encoder layer l, through the encoder\'s final '
            f"layer norm, conditions the diffusion model; same seeds in every row. {s.get('steps')} steps, "
            f"guidance {s.get('guidance_scale')}.</p><table><tr><th></th>{head}</tr>{rows}</table>")
