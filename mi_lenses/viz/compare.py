"""Pages of the lens bench and of lens evaluations: one chart per metric with every lens overlaid, then the numbers.

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    >>> cmp = mi_lenses.compare_lenses(model, tokens, ["logit"], progress=False)
    >>> html = comparison_fragment(cmp)
    >>> html.count("<svg") == len(cmp.stats["logit"]), "<td>final</td>" in html      # a chart per metric
    (True, True)
"""

from __future__ import annotations

import html
from typing import Any

from mi_lenses.viz.html import line_chart


def _table(layers: list[str], columns: list[tuple[str, list[float]]], size: int = 11) -> str:
    """A per-layer table: one column per ``(header, values)``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in columns)
    body = "".join(f"<tr><td>{html.escape(lab)}</td>" + "".join(f"<td>{vals[i]:.3f}</td>" for _, vals in columns)
                   + "</tr>" for i, lab in enumerate(layers))
    return f'<table style="font-size:{size}px;border-collapse:collapse"><tr><th>layer</th>{head}</tr>{body}</table>'


def comparison_fragment(cmp: Any) -> str:
    """The page body of a :class:`~mi_lenses.lenses.compare.LensComparison`."""
    metrics = list(next(iter(cmp.stats.values())))
    ahead = {n: a for n, a in cmp.ahead.items() if a}
    note = (f'<p class="note">{html.escape(cmp.model_name)}: {cmp.n_tokens} held-out tokens; the model\'s own '
            f"cross-entropy is {cmp.final_ce_bits:.3f} bits."
            + (" Lenses predicting ahead are compared with the model that many positions later: "
               + ", ".join(f"{html.escape(n)} +{a}" for n, a in ahead.items()) if ahead else "") + "</p>")
    charts = "".join(f"<h2>{html.escape(m)}</h2>" + line_chart(cmp.layers, {n: d[m] for n, d in cmp.stats.items()}, m)
                     for m in metrics)
    columns = [(f"{n} {m}", cmp.stats[n][m]) for m in metrics for n in cmp.stats]
    return note + charts + "<h2>Per layer</h2>" + _table(cmp.layers, columns)


def evaluation_fragment(ev: Any) -> str:
    """The page body of a :class:`~mi_lenses.lenses.tuned.evaluate.LensEvaluation`: the tuned-lens paper's two
    curves (KL to the model's output, next-token cross-entropy per layer) and the table."""
    ce = dict(ev.ce_bits)
    ce["model (final)"] = [ev.final_ce_bits] * len(ev.layers)
    note = (f'<p class="note">{html.escape(ev.model_name)}: {ev.n_tokens} held-out tokens; the model\'s own '
            f"CE is {ev.final_ce_bits:.3f} bits.</p>")
    figure = ("<h2>KL divergence to the model's output (bits)</h2>" + line_chart(ev.layers, ev.kl_bits, "KL (bits)")
              + "<h2>Cross-entropy to the next token (bits)</h2>" + line_chart(ev.layers, ce, "CE (bits)"))
    columns = [c for n in ev.kl_bits for c in ((f"KL {n}", ev.kl_bits[n]), (f"CE {n}", ev.ce_bits[n]))]
    return note + figure + "<h2>Per layer</h2>" + _table(ev.layers, columns, size=12)
