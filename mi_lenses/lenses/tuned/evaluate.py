"""Held-out evaluation of lenses, per layer: KL to the final distribution, cross-entropy to the next token and
entropy (bits), plus the model's own cross-entropy: the curves of the tuned-lens paper's figure.

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (2, 16))
    >>> ev = evaluate_lens(TunedLens.from_model(model), model, tokens)   # zero init == the logit lens
    >>> ev.layers[:2], list(ev.kl_bits), ev.n_tokens
    (['embed', '1_pre'], ['logit lens', 'tuned lens'], 32)
    >>> ev.kl_bits["logit lens"] == ev.kl_bits["tuned lens"]
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.logit_lens import LogitLens, run_lens
from mi_lenses.models.view import ModelView
from mi_lenses.results import LN2, Result, jsonable


@dataclass
class LensEvaluation(Result):
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

    @property
    def title(self) -> str:
        return f"Lens evaluation: {self.model_name}"

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """The JSON contract: ``{"layers", "logit_lens": {"kl_bits", "ce_bits", "entropy_bits"}, "tuned_lens":
        {...}, "final_ce_bits", "final_entropy_bits", "n_tokens", "model"}``."""
        self.check_batch(batch)
        out: dict[str, Any] = {"layers": list(self.layers)}
        for name in self.kl_bits:
            out[name.replace(" ", "_")] = {"kl_bits": self.kl_bits[name], "ce_bits": self.ce_bits[name],
                                           "entropy_bits": self.entropy_bits[name]}
        out.update(final_ce_bits=self.final_ce_bits, final_entropy_bits=self.final_entropy_bits,
                   n_tokens=self.n_tokens, model=self.model_name)
        return jsonable(out)

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

    def table(self, *, batch: int = 0):
        """A rich table: KL and CE per layer for every lens, and the model's own CE in the caption."""
        from rich.table import Table

        self.check_batch(batch)
        names = list(self.kl_bits)
        table = Table(title=f"Lens evaluation · {self.model_name} · {self.n_tokens} tokens (bits)",
                      caption=f"model's own CE: {self.final_ce_bits:.3f} bits/token")
        table.add_column("layer", justify="right", style="bold")
        for n in names:
            table.add_column(f"KL {n}", justify="right")
            table.add_column(f"CE {n}", justify="right")
        for i, label in enumerate(self.layers):
            table.add_row(label, *[f"{d[n][i]:.3f}" for n in names for d in (self.kl_bits, self.ce_bits)])
        return table

    def to_markdown(self) -> str:
        """The per-layer table as Markdown (what the README shows)."""
        names = list(self.kl_bits)
        lines = ["| layer | " + " | ".join(f"KL {n} | CE {n}" for n in names) + " |",
                 "|---|" + "---:|---:|" * len(names)]
        for i, label in enumerate(self.layers):
            cells = " | ".join(f"{self.kl_bits[n][i]:.3f} | {self.ce_bits[n][i]:.3f}" for n in names)
            lines.append(f"| {label} | {cells} |")
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

    def fragment(self, *, batch: int = 0) -> str:
        """The curves and the per-layer table."""
        import html

        self.check_batch(batch)
        rows = "".join(
            f"<tr><td>{html.escape(lab)}</td>"
            + "".join(f"<td>{self.kl_bits[n][i]:.3f}</td><td>{self.ce_bits[n][i]:.3f}</td>" for n in self.kl_bits)
            + "</tr>"
            for i, lab in enumerate(self.layers)
        )
        head = "".join(f"<th>KL {html.escape(n)}</th><th>CE {html.escape(n)}</th>" for n in self.kl_bits)
        note = (f'<p class="note">{html.escape(self.model_name)}: {self.n_tokens} held-out tokens; the model\'s own '
                f"CE is {self.final_ce_bits:.3f} bits.</p>")
        table = f'<table style="font-size:12px;border-collapse:collapse"><tr><th>layer</th>{head}</tr>{rows}</table>'
        return note + self.figure() + "<h2>Per layer</h2>" + table


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
        logits, cache = view.run_with_cache(view.batch(tb), names)
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
