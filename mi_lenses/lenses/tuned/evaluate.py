"""Held-out evaluation of lenses, per layer: KL to the final distribution, cross-entropy to the next token and
entropy (bits), plus the model's own cross-entropy: the curves of the tuned-lens paper's figure.

Example::

    ev = evaluate_lens(lens, model, "../shared/data/wikitext-2/test.txt", max_tokens=8192)
    ev.to_dataframe(); ev.to_html("tuned_eval.html"); ev.show()
    ev.to_dict()   # the ``mi-lenses tuned-lens eval --json`` contract
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.logit_lens import LogitLens, run_lens
from mi_lenses.models.view import ModelView

LN2 = math.log(2.0)


@dataclass
class LensEvaluation:
    """Per-layer statistics of one or more lenses on held-out tokens (means over tokens, in bits).

    ``kl_bits[lens][i]`` is the mean KL(final || lens) at row ``layers[i]``; ``ce_bits`` the mean cross-entropy to the
    next token (positions with a next token inside the sequence); ``entropy_bits`` the mean entropy of the lens.
    """

    model_name: str
    layers: list[str]
    n_tokens: int
    kl_bits: dict[str, list[float]]
    ce_bits: dict[str, list[float]]
    entropy_bits: dict[str, list[float]]
    final_ce_bits: float
    final_entropy_bits: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: ``{"layers", "logit_lens": {"kl_bits", "ce_bits"}, "tuned_lens": {...},
        "final_ce_bits"}`` (plus entropies and the token count)."""
        out: dict[str, Any] = {"layers": list(self.layers)}
        for name in self.kl_bits:
            out[name.replace(" ", "_")] = {
                "kl_bits": _r(self.kl_bits[name]),
                "ce_bits": _r(self.ce_bits[name]),
                "entropy_bits": _r(self.entropy_bits[name]),
            }
        out["final_ce_bits"] = round(self.final_ce_bits, 6)
        out["final_entropy_bits"] = round(self.final_entropy_bits, 6)
        out["n_tokens"] = self.n_tokens
        out["model"] = self.model_name
        return out

    def to_dataframe(self):
        """Tidy frame: one row per (lens, layer, metric)."""
        import pandas as pd

        rows = []
        for name in self.kl_bits:
            for i, label in enumerate(self.layers):
                for metric, table in (("kl_bits", self.kl_bits), ("ce_bits", self.ce_bits),
                                      ("entropy_bits", self.entropy_bits)):
                    rows.append({"lens": name, "layer": label, "layer_index": i, "metric": metric,
                                 "value": table[name][i]})
        return pd.DataFrame(rows)

    def table(self) -> str:
        """A plain-text per-layer table (what the README shows)."""
        names = list(self.kl_bits)
        head = "| layer | " + " | ".join(f"KL {n} | CE {n}" for n in names) + " |"
        sep = "|---|" + "---|---|" * len(names)
        lines = [head, sep]
        for i, label in enumerate(self.layers):
            cells = " | ".join(f"{self.kl_bits[n][i]:.3f} | {self.ce_bits[n][i]:.3f}" for n in names)
            lines.append(f"| {label} | {cells} |")
        lines.append(f"\nmodel's own CE: {self.final_ce_bits:.3f} bits/token over {self.n_tokens} tokens")
        return "\n".join(lines)

    def figure(self) -> str:
        """Two SVG charts like the paper's figure: KL to the final output and next-token CE per layer."""
        from mi_lenses.viz.html import line_chart

        ce = dict(self.ce_bits)
        ce["model (final)"] = [self.final_ce_bits] * len(self.layers)
        return (
            "<h2>KL divergence to the model's output (bits)</h2>"
            + line_chart(self.layers, self.kl_bits, "KL (bits)")
            + "<h2>Cross-entropy to the next token (bits)</h2>"
            + line_chart(self.layers, ce, "CE (bits)")
        )

    def _body(self) -> str:
        import html

        rows = "".join(
            f"<tr><td>{html.escape(lab)}</td>"
            + "".join(f"<td>{self.kl_bits[n][i]:.3f}</td><td>{self.ce_bits[n][i]:.3f}</td>" for n in self.kl_bits)
            + "</tr>"
            for i, lab in enumerate(self.layers)
        )
        head = "".join(f"<th>KL {html.escape(n)}</th><th>CE {html.escape(n)}</th>" for n in self.kl_bits)
        note = (f'<p class="note">{self.model_name}: {self.n_tokens} held-out tokens; the model\'s own CE is '
                f"{self.final_ce_bits:.3f} bits.</p>")
        table = f'<table style="font-size:12px;border-collapse:collapse"><tr><th>layer</th>{head}</tr>{rows}</table>'
        return note + self.figure() + "<h2>Per layer</h2>" + table

    def show(self):
        """Render in a notebook (offline)."""
        from mi_lenses.viz.html import OfflineHTML

        body = self._body()
        return OfflineHTML(body, body)

    def to_html(self, path=None) -> str:
        """A standalone offline page; written atomically to ``path`` if given."""
        from mi_lenses.atomic import write_atomic
        from mi_lenses.viz.html import page

        text = page(f"Lens evaluation: {self.model_name}", self._body())
        if path is not None:
            write_atomic(path, text)
        return text


def _r(values: list[float]) -> list:
    return [round(v, 6) if math.isfinite(v) else None for v in values]


def evaluate_lens(
    lens: Any,
    model: Any,
    data: Any,
    *,
    max_tokens: int | None = 16384,
    seq_len: int = 128,
    batch_size: int = 4,
    baseline: bool = True,
) -> LensEvaluation:
    """Evaluate ``lens`` (and, with ``baseline``, the logit lens) on held-out ``data`` (a text source as in
    :func:`~mi_lenses.lenses.tuned.data.load_tokens`, or tokens ``[n_seq, seq_len]``). One forward pass per batch
    serves every lens; the final row is verified against the model's logits."""
    from mi_lenses.lenses.tuned.data import load_tokens

    view = ModelView(model)
    tokens = data if isinstance(data, torch.Tensor) else load_tokens(data, view, seq_len, max_tokens=max_tokens)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise LensInputError(f"evaluation tokens must be [n_seq, seq_len], got {tuple(tokens.shape)}.")
    lenses = {}
    if baseline:
        lenses["logit lens"] = LogitLens()
    bound = lens.bind(view) if hasattr(lens, "bind") else lens
    name = getattr(lens, "name", "lens")
    lenses[name if name not in lenses else f"{name} (evaluated)"] = bound
    rows = view.residual_rows("resid_pre")
    names = {r.hook_name for r in rows}
    R = len(rows)
    sums = {k: {"kl": torch.zeros(R, dtype=torch.float64), "ce": torch.zeros(R, dtype=torch.float64),
                "ent": torch.zeros(R, dtype=torch.float64)} for k in lenses}
    n_tok = n_ce = 0
    for b0 in range(0, tokens.shape[0], batch_size):
        tb = tokens[b0 : b0 + batch_size].to(view.device)
        with torch.no_grad():
            logits, cache = view.model.run_with_cache(tb, names_filter=lambda n: n in names)
        for key, ln in lenses.items():
            res = run_lens(ln, view, tb, cache=cache, logits=logits, top_k=1)
            ce = res.cross_entropy
            sums[key]["kl"] += res.kl.double().sum((1, 2))
            sums[key]["ent"] += res.entropy.double().sum((1, 2))
            sums[key]["ce"] += torch.nan_to_num(ce.double(), nan=0.0).sum((1, 2))
        n_tok += tb.numel()
        n_ce += int(torch.isfinite(ce[0]).sum())
    out = {k: {m: (v / (n_ce if m == "ce" else n_tok) / LN2).tolist() for m, v in s.items()} for k, s in sums.items()}
    first = next(iter(out.values()))
    return LensEvaluation(
        model_name=view.name,
        layers=[r.label for r in rows[:-1]],
        n_tokens=n_tok,
        kl_bits={k: v["kl"][:-1] for k, v in out.items()},
        ce_bits={k: v["ce"][:-1] for k, v in out.items()},
        entropy_bits={k: v["ent"][:-1] for k, v in out.items()},
        final_ce_bits=first["ce"][-1],
        final_entropy_bits=first["ent"][-1],
    )
