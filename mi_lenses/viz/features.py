"""Views of feature results: the terminal tables and the page bodies of
:class:`~mi_lenses.features.reading.FeatureResult` (per position: token, L0, error norm, most active features) and
:class:`~mi_lenses.features.dla.FeatureDLA` (the largest features, their value and feature logit lens)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mi_lenses.viz.html import esc


def _features(row: dict[str, Any]) -> str:
    return ", ".join(f"{f['feature']} {f['activation']:.3g}" for f in row["top"])


def feature_table(title: str, rows: list[dict[str, Any]], top_k: int) -> Table:
    """Per position (``rows``: ``position``, ``token``, ``l0``, ``error_norm``, ``top``) a row of the table."""
    t = Table(title=title)
    for col in ("pos", "token", "L0", "|error|", f"top {top_k} features"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["position"]), repr(r["token"]), str(r["l0"]), f"{r['error_norm']:.4g}", _features(r))
    return t


def feature_fragment(title: str, rows: list[dict[str, Any]], top_k: int) -> str:
    """The same table as an HTML page body."""
    body = "".join(f"<tr><td>{r['position']}</td><td><code>{esc(repr(r['token']))}</code></td><td>{r['l0']}</td>"
                   f"<td>{r['error_norm']:.4g}</td><td>{esc(_features(r))}</td></tr>" for r in rows)
    return (f"<h2>{esc(title)}</h2><table><tr><th>pos</th><th>token</th><th>L0</th><th>|error|</th>"
            f"<th>top {top_k} features</th></tr>{body}</table>")


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
