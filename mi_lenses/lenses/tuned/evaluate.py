"""Held-out evaluation of a lens against the logit lens, per layer: KL to the final distribution, cross-entropy to the
next token and entropy (bits), plus the model's own cross-entropy: the curves of the tuned-lens paper's figure.

:func:`evaluate_lens` is :func:`~mi_lenses.lenses.compare.compare_lenses` of one lens and the logit lens (the same
loop, defaults and NaN rule), shown as a :class:`LensEvaluation` (the final row is reported as the model's own
cross-entropy and entropy).

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

from rich.table import Table

from mi_lenses.lenses.compare import DEFAULT_MAX_TOKENS, LensComparison, compare_lenses
from mi_lenses.lenses.lens import Lens, LogitLens
from mi_lenses.lenses.options import Point
from mi_lenses.results import Result, dataframe, jsonable
from mi_lenses.viz.compare import evaluation_fragment


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
        rows = []
        for name in self.kl_bits:
            for i, label in enumerate(self.layers):
                for metric, table in (("kl_bits", self.kl_bits), ("ce_bits", self.ce_bits),
                                      ("entropy_bits", self.entropy_bits)):
                    rows.append({"lens": name, "layer": label, "layer_index": i, "metric": metric,
                                 "value": table[name][i]})
        return dataframe(rows)

    def table(self, *, batch: int = 0):
        """A rich table: KL and CE per layer for every lens, and the model's own CE in the caption."""
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

    def fragment(self, *, batch: int = 0) -> str:
        """The curves and the per-layer table."""
        self.check_batch(batch)
        return evaluation_fragment(self)

    def _summary(self) -> str:
        finite = {n: [x for x in v if x == x and abs(x) != float("inf")] for n, v in self.kl_bits.items()}
        means = ", ".join(f"{n} {sum(v) / max(len(v), 1):.3f}" for n, v in finite.items())
        return (f"on {self.model_name!r}: {list(self.kl_bits)} x {len(self.layers)} rows, {self.n_tokens} tokens, "
                f"mean KL bits {means}, model's own CE {self.final_ce_bits:.3f} bits")

    @classmethod
    def from_comparison(cls, cmp: LensComparison) -> "LensEvaluation":
        """The evaluation view of a comparison: every row but the final one, whose CE and entropy are the model's."""
        first = next(iter(cmp.stats.values()))
        return cls(model_name=cmp.model_name, layers=cmp.layers[:-1], n_tokens=cmp.n_tokens,
                   kl_bits={n: d["kl_bits"][:-1] for n, d in cmp.stats.items()},
                   ce_bits={n: d["ce_bits"][:-1] for n, d in cmp.stats.items()},
                   entropy_bits={n: d["entropy_bits"][:-1] for n, d in cmp.stats.items()},
                   final_ce_bits=cmp.final_ce_bits, final_entropy_bits=first["entropy_bits"][-1],
                   meta={**cmp.meta, "seconds": cmp.seconds})


def evaluate_lens(
    lens: Lens,
    model: Any,
    data: Any,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    seq_len: int = 128,
    batch_size: int = 4,
    point: Point = "resid_pre",
    baseline: bool = True,
    progress: bool = True,
) -> LensEvaluation:
    """Evaluate ``lens`` (and, with ``baseline``, the logit lens) on held-out ``data`` (a text source as in
    :func:`~mi_lenses.data.load_tokens`, or tokens ``[n_seq, seq_len]``): :func:`~mi_lenses.lenses.compare.
    compare_lenses` of those lenses, with the same options.

    Args:
        lens: the :class:`~mi_lenses.lenses.lens.Lens` evaluated (a ``TunedLens``, any fitted or built-in lens).
        model: a TransformerLens model or a ``ModelView``; the lens is bound to it.
        data: held-out data: a text source for :func:`~mi_lenses.data.load_tokens` or token ids
            ``[n_seq, seq_len]``.
        max_tokens, seq_len: read at most ``max_tokens`` tokens of a text source (``None``: all of it), packed into
            sequences of ``seq_len`` (token ids are used as given).
        batch_size: sequences per forward pass (one cache serves every lens).
        point: the residual state the rows read (default ``"resid_pre"``), as in ``compare_lenses``.
        baseline: also evaluate the logit lens, beside ``lens``.
        progress: a bar over the batches.

    Returns:
        :class:`LensEvaluation`: per row, the mean KL to the model's output, cross-entropy and entropy, in bits;
        the final row is left out.
    """
    lenses: dict[str, Lens] = {"logit lens": LogitLens()} if baseline else {}
    lenses[lens.name if lens.name not in lenses else f"{lens.name} (evaluated)"] = lens
    cmp = compare_lenses(model, data, lenses, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                         point=point, progress=progress)
    return LensEvaluation.from_comparison(cmp)
