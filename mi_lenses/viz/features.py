"""Views of feature results: the terminal tables and the page bodies of
:class:`~mi_lenses.features.reading.FeatureResult` (per position: token, L0, error norm, most active features) and
:class:`~mi_lenses.features.dla.FeatureDLA` (the largest features, their value and feature logit lens), and
:class:`~mi_lenses.features.contexts.FeatureContexts` (each feature's max-activating contexts, the tokens shaded by
its activation); circuitsvis coloured tokens of a feature over a prompt."""

from __future__ import annotations

from typing import Any

import circuitsvis as cv
import torch
from rich.table import Table
from rich.text import Text

from mi_lenses.viz.colors import css, rich_style, sequential, text_on
from mi_lenses.viz.html import circuitsvis_block, esc
from mi_lenses.viz.tokens import visible


def _features(row: dict[str, Any]) -> str:
    return ", ".join(f"{f['feature']} {f['activation']:.3g}" for f in row["top"])


def feature_table(title: str, rows: list[dict[str, Any]], top_k: int, feature: str | None = None) -> Table:
    """Per position (``rows``: ``position``, ``token``, ``l0``, ``error_norm``, ``top``; with ``feature`` (its
    label) also ``feature_activation``, shaded) a row of the table."""
    t = Table(title=title)
    for col in ("pos", "token", "L0", "|error|", *([feature] if feature else []), f"top {top_k} features"):
        t.add_column(col)
    peak = max((abs(r["feature_activation"]) for r in rows), default=0.0) if feature else 0.0
    for r in rows:
        own = [Text(f"{r['feature_activation']:.4g}", style=rich_style(r["feature_activation"] / peak if peak else 0.0))
               ] if feature else []
        t.add_row(str(r["position"]), repr(r["token"]), str(r["l0"]), f"{r['error_norm']:.4g}", *own, _features(r))
    return t


def feature_fragment(title: str, rows: list[dict[str, Any]], top_k: int, views: str = "",
                     feature: str | None = None) -> str:
    """The same table as an HTML page body (with ``feature``: a column of its activation), then ``views`` (the
    circuitsvis views of :func:`feature_tokens_view`)."""
    own = (lambda r: f"<td>{r['feature_activation']:.4g}</td>") if feature else (lambda r: "")
    body = "".join(f"<tr><td>{r['position']}</td><td><code>{esc(repr(r['token']))}</code></td><td>{r['l0']}</td>"
                   f"<td>{r['error_norm']:.4g}</td>{own(r)}<td>{esc(_features(r))}</td></tr>" for r in rows)
    head = f"<th>{esc(feature)}</th>" if feature else ""
    return (f"<h2>{esc(title)}</h2><table><tr><th>pos</th><th>token</th><th>L0</th><th>|error|</th>{head}"
            f"<th>top {top_k} features</th></tr>{body}</table>{views}")


def feature_dla_table(title: str, parts: str, rows: list[dict[str, Any]]) -> Table:
    """The largest features (``rows``: ``label``, ``value``, ``promoted``, ``suppressed``) and the other parts."""
    t = Table(title=f"{title} ({parts})")
    for col in ("feature", "value", "promotes", "suppresses"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["label"], f"{r['value']:+.4f}", " ".join(map(repr, r["promoted"])),
                  " ".join(map(repr, r["suppressed"])))
    return t


def feature_dla_fragment(title: str, parts: str, rows: list[dict[str, Any]]) -> str:
    """The same table as an HTML page body."""
    body = "".join(f"<tr><td>{esc(r['label'])}</td><td>{r['value']:+.4f}</td>"
                   f"<td>{esc(' '.join(map(repr, r['promoted'])))}</td>"
                   f"<td>{esc(' '.join(map(repr, r['suppressed'])))}</td></tr>" for r in rows)
    return (f"<h2>{esc(title)}</h2><p>{esc(parts)}</p><table><tr><th>feature</th><th>value</th>"
            f"<th>promotes</th><th>suppresses</th></tr>{body}</table>")


# the columns of a dictionary evaluation: header, row key, format
EVALUATION_COLUMNS = (("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.1f}"), ("dead", "dead_fraction", "{:.1%}"),
                      ("CE spliced", "spliced_ce_bits", "{:.4f}"), ("ΔCE", "delta_ce_bits", "{:+.4f}"),
                      ("CE zero-abl.", "zero_ce_bits", "{:.4f}"), ("CE mean-abl.", "mean_ce_bits", "{:.4f}"),
                      ("loss recovered", "loss_recovered", "{:.3f}"), ("(vs mean)", "loss_recovered_mean", "{:.3f}"))


def evaluation_table(title: str, rows: list[dict[str, Any]], caption: str) -> Table:
    """One row per dictionary (``rows``: ``dictionary`` and the metrics of :data:`EVALUATION_COLUMNS`)."""
    t = Table(title=title, caption=caption)
    t.add_column("dictionary")
    for head, _, _ in EVALUATION_COLUMNS:
        t.add_column(head, justify="right")
    for r in rows:
        t.add_row(r["dictionary"], *(fmt.format(r[key]) for _, key, fmt in EVALUATION_COLUMNS))
    return t


def evaluation_fragment(title: str, rows: list[dict[str, Any]], note: str) -> str:
    """The same table as an HTML page body."""
    head = "".join(f"<th>{esc(h)}</th>" for h in ("dictionary", *(h for h, _, _ in EVALUATION_COLUMNS)))
    body = "".join(f"<tr><td><code>{esc(r['dictionary'])}</code></td>"
                   + "".join(f"<td>{fmt.format(r[key])}</td>" for _, key, fmt in EVALUATION_COLUMNS) + "</tr>"
                   for r in rows)
    return f"<h2>{esc(title)}</h2><p>{esc(note)}</p><table><tr>{head}</tr>{body}</table>"


# ------------------------------------------------------------------------------------------------ max-activating contexts
def _lens_words(f: dict[str, Any]) -> str:
    up, down = " ".join(map(repr, f["promoted"])), " ".join(map(repr, f["suppressed"]))
    return f"promotes {up}; suppresses {down}" if up or down else ""


def context_text(c: dict[str, Any], peak: float) -> Text:
    """One context as rich text: each token shaded by the feature's activation (relative to ``peak``), the most
    active token in bold and underlined."""
    out = Text()
    for j, (tok, a) in enumerate(zip(c["tokens"], c["activations"])):
        style = rich_style(a / peak if peak else 0.0)
        out.append(visible(tok) or "∅", style=style + (" bold underline" if j == c["at"] else ""))
    return out


def context_table(title: str, features: list[dict[str, Any]], lens_name: str) -> Table:
    """Per feature (``features``: records of ``FeatureContexts._feature``) a block of rows: its top contexts."""
    t = Table(title=title, caption=f"the most active token in bold; feature logit lens: {lens_name}")
    for col in ("feature", "rank", "activation", "seq:pos", "context"):
        t.add_column(col)
    for f in features:
        head = f"{f['label']}\nmax {f['max_activation']:.3g}\nfreq {f['frequency']:.2%}"
        lens = _lens_words(f)
        for r, c in enumerate(f["contexts"]):
            t.add_row(head if r == 0 else "", str(r), f"{c['activation']:.4g}", f"{c['sequence']}:{c['position']}",
                      context_text(c, f["max_activation"]))
        if lens:
            t.add_row("", "", "", "", Text(lens, style="dim"))
        t.add_section()
    return t


def _html_context(c: dict[str, Any], peak: float) -> str:
    spans = []
    for j, (tok, a) in enumerate(zip(c["tokens"], c["activations"])):
        t = a / peak if peak else 0.0
        weight = "font-weight:bold;text-decoration:underline;" if j == c["at"] else ""
        spans.append(f'<span title="{a:.4g}" style="background:{css(sequential(t))};color:{text_on(t)};{weight}">'
                     f"{esc(tok)}</span>")
    return "".join(spans)


def context_fragment(title: str, features: list[dict[str, Any]], lens_name: str, note: str = "") -> str:
    """The page body: per feature its numbers, its feature logit lens, a table of its contexts (tokens shaded by
    the activation, the most active one bold) and the same contexts as circuitsvis coloured tokens."""
    parts = [f"<h2>{esc(title)}</h2>"]
    if note:
        parts.append(f'<p class="note">{esc(note)}</p>')
    for f in features:
        parts.append(f"<h3>{esc(f['label'])}: max {f['max_activation']:.4g}, active on {f['frequency']:.2%} of "
                     f"tokens</h3>")
        lens = _lens_words(f)
        if lens:
            parts.append(f'<p class="note">{esc(lens_name)}: {esc(lens)}</p>')
        rows = "".join(f"<tr><td>{r}</td><td>{c['activation']:.4g}</td><td>{c['sequence']}:{c['position']}</td>"
                       f"<td style='text-align:left'>{_html_context(c, f['max_activation'])}</td></tr>"
                       for r, c in enumerate(f["contexts"]))
        parts.append("<table class='data'><tr><th>rank</th><th>activation</th><th>seq:pos</th><th>context</th></tr>"
                     f"{rows}</table>")
        views = [cv.tokens.colored_tokens(c["tokens"], [round(a, 5) for a in c["activations"]])
                 for c in f["contexts"]]
        if views:
            parts.append(circuitsvis_block(views))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ a feature over a prompt
def feature_tokens_view(tokens: list[str], values: list[list[float]], labels: list[str]) -> str:
    """circuitsvis views of features over a prompt's tokens: coloured tokens for one feature, or a picker over
    several (``values`` ``[position][feature]``)."""
    if len(labels) == 1:
        view = cv.tokens.colored_tokens(tokens, [round(v[0], 5) for v in values])
    else:
        view = cv.tokens.colored_tokens_multi(tokens, torch.tensor(values, dtype=torch.float32).reshape(
            len(tokens), len(labels)), labels)
    return circuitsvis_block([view])
