"""Lenses side by side on the same held-out tokens with the same metrics: :func:`compare_lenses` and its result.

Every lens runs through :func:`~mi_lenses.lenses.logit_lens.run_lens` on the cache of one forward pass per batch of
sequences, so the numbers of different lenses are comparable by construction. Per row (``point="resid_post"`` by
default: ``embed``, the output of every block, ``final``; a Patchscope at layer ``l`` is row ``l_post``) and lens,
averaged over the tokens that have a reference:

* ``kl_bits``: KL(model's output distribution || lens), bits;
* ``ce_bits``: cross-entropy to the actual next token, bits;
* ``prec_at_k``: the model's own top-1 token is among the lens's top-k (``prec_at_1``: the Patchscopes paper's
  precision@1);
* ``surprisal_bits``: ``-log2 p_lens(model's own top-1 token)``;
* ``mean_rank``: the rank of the model's own top-1 token under the lens (0 = top).

A lens with ``ahead = N`` (the Future Lens) is compared with the model at position ``t + N``. The data are streamed:
one batch of sequences at a time through the model and every lens, statistics accumulated as per-row sums, so the
memory for activations, logits and statistics does not grow with the number of tokens (only the token ids, 8 bytes
each and bounded by ``max_tokens``, are read up front).

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    >>> cmp = mi_lenses.compare_lenses(model, tokens, ["logit", "patchscope-q"], progress=False)
    >>> cmp.layers[0], cmp.layers[-1], list(cmp.stats), cmp.n_tokens
    ('embed', 'final', ['logit', 'patchscope-q'], 24)
    >>> cmp.stats["logit"]["prec_at_1"][-1], cmp.stats["patchscope-q"]["kl_bits"][-1] < 1e-4   # both = model
    (1.0, True)
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.logit_lens import Lens, LogitLens, Point, run_lens
from mi_lenses.models.view import ModelView
from mi_lenses.results import LN2, Result, jsonable

BUILT_IN = ("logit", "patchscope", "patchscope-q")  # need nothing fitted
LENS_NAMES = ("logit", "tuned", "patchscope", "patchscope-q", "jacobian", "future")  # the command line's names


@dataclass
class LensComparison(Result):
    """Per-row statistics of several lenses on the same tokens (means over tokens; see the module docstring).

    ``stats[lens][metric][i]`` is the value at row ``layers[i]`` (NaN where a lens has no map for that row, and
    ``null`` in JSON); metrics are ``kl_bits``, ``ce_bits``,
    ``prec_at_{k}`` for each requested ``k``, ``surprisal_bits`` and ``mean_rank``. ``ahead[lens]`` is how many
    positions ahead a lens predicts (the Future Lens), ``seconds[lens]`` its wall time.
    """

    model_name: str
    layers: list[str]
    n_tokens: int
    stats: dict[str, dict[str, list[float]]]
    final_ce_bits: float
    ahead: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"Lens comparison: {self.model_name}"

    @property
    def lenses(self) -> list[str]:
        return list(self.stats)

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """``{"layers": [...], "lenses": {NAME: {"kl_bits", "ce_bits", "prec_at_1", "surprisal_bits",
        "mean_rank", ...}}, "tokens": N, "model", "final_ce_bits", "ahead", "seconds", "meta"}`` (the
        ``mi-lenses compare --json`` contract)."""
        self.check_batch(batch)
        return jsonable({"layers": self.layers, "lenses": self.stats, "tokens": self.n_tokens,
                         "model": self.model_name, "final_ce_bits": self.final_ce_bits, "ahead": self.ahead,
                         "seconds": self.seconds, "meta": self.meta})

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"lens": name, "layer": lab, "layer_index": i, "metric": metric, "value": vals[i]}
                             for name, d in self.stats.items() for metric, vals in d.items()
                             for i, lab in enumerate(self.layers)])

    def table(self, *, batch: int = 0, metric: Literal["prec_at_1", "kl_bits", "ce_bits", "surprisal_bits",
                                                        "mean_rank"] = "prec_at_1"):
        """A rich table of one metric: rows x lenses."""
        from rich.table import Table

        self.check_batch(batch)
        t = Table(title=f"{metric} · {self.model_name} · {self.n_tokens} tokens",
                  caption=f"model's own CE: {self.final_ce_bits:.3f} bits/token")
        t.add_column("layer", justify="right", style="bold")
        for name in self.stats:
            t.add_column(name + (f" (+{self.ahead[name]})" if self.ahead.get(name) else ""), justify="right")
        for i, lab in enumerate(self.layers):
            t.add_row(lab, *[f"{self.stats[n][metric][i]:.3f}" for n in self.stats])
        return t

    def to_markdown(self, metrics: Sequence[str] = ("prec_at_1", "kl_bits"), rows: Sequence[int] | None = None) -> str:
        """A Markdown table: one column per (metric, lens), the rows ``rows`` (indices; default all)."""
        rows = range(len(self.layers)) if rows is None else rows
        cols = [(m, n) for m in metrics for n in self.stats]
        lines = ["| layer | " + " | ".join(f"{n} {m}" for m, n in cols) + " |", "|---|" + "---:|" * len(cols)]
        for i in rows:
            lines.append(f"| {self.layers[i]} | " + " | ".join(f"{self.stats[n][m][i]:.3f}" for m, n in cols) + " |")
        return "\n".join(lines)

    def fragment(self, *, batch: int = 0) -> str:
        """One chart per metric with every lens overlaid, then the numbers."""
        from mi_lenses.viz.html import line_chart

        self.check_batch(batch)
        metrics = list(next(iter(self.stats.values())))
        ahead = {n: a for n, a in self.ahead.items() if a}
        note = (f'<p class="note">{html.escape(self.model_name)}: {self.n_tokens} held-out tokens; the model\'s own '
                f"cross-entropy is {self.final_ce_bits:.3f} bits."
                + (" Lenses predicting ahead are compared with the model that many positions later: "
                   + ", ".join(f"{html.escape(n)} +{a}" for n, a in ahead.items()) if ahead else "") + "</p>")
        charts = "".join(f"<h2>{html.escape(m)}</h2>" + line_chart(self.layers, {n: d[m] for n, d in
                                                                                   self.stats.items()}, m)
                         for m in metrics)
        head = "".join(f"<th>{html.escape(n)} {html.escape(m)}</th>" for m in metrics for n in self.stats)
        body = "".join(f"<tr><td>{html.escape(lab)}</td>" + "".join(
            f"<td>{self.stats[n][m][i]:.3f}</td>" for m in metrics for n in self.stats) + "</tr>"
            for i, lab in enumerate(self.layers))
        return (note + charts + "<h2>Per layer</h2>"
                + f'<table style="font-size:11px;border-collapse:collapse"><tr><th>layer</th>{head}</tr>{body}</table>')


def built_in_lens(name: str) -> Lens:
    """The lenses that need nothing fitted: ``"logit"``, ``"patchscope"`` (token identity, few-shot) and
    ``"patchscope-q"`` (token identity with the plain ``"?"`` target)."""
    from mi_lenses.patchscopes.lens import PatchscopeLens
    from mi_lenses.patchscopes.presets import identity, identity_q

    if name == "logit":
        return LogitLens()
    if name == "patchscope":
        return PatchscopeLens(identity())
    if name == "patchscope-q":
        return PatchscopeLens(identity_q())
    raise LensInputError(f"{name!r} is not a built-in lens ({', '.join(BUILT_IN)}): pass the fitted lens itself, "
                         f"e.g. {{'{name}': lens}}.")


def compare_lenses(
    model: Any,
    data: Any,
    lenses: Mapping[str, Lens | str] | Sequence[str] = ("logit", "patchscope", "patchscope-q"),
    *,
    max_tokens: int | None = 2048,
    seq_len: int = 128,
    batch_size: int = 4,
    point: Point = "resid_post",
    top_k: Sequence[int] = (1,),
    progress: bool = True,
) -> LensComparison:
    """Run every lens on the same held-out tokens and average the statistics per row (see the module docstring).

    Args:
        data: a text source for :func:`~mi_lenses.lenses.tuned.data.load_tokens` or token ids ``[n_seq, seq_len]``.
        lenses: names of built-in lenses (``"logit"``, ``"patchscope"``, ``"patchscope-q"``), or a mapping
            ``{name: lens}`` with fitted lenses (a ``TunedLens``, ``JacobianLens``, ``FutureLens``, any ``Lens``)
            or built-in names as values.
        max_tokens, seq_len: read at most ``max_tokens`` tokens, packed into sequences of ``seq_len``.
        batch_size: sequences per forward pass (one cache serves every lens).
        point: the rows, ``"resid_post"`` (default: ``embed``, the output of every block, ``final``) or
            ``"resid_pre"``.
        top_k: the ``k`` of ``prec_at_k`` (1 always included).
    """
    from mi_lenses.lenses.tuned.data import load_tokens

    view = ModelView(model)
    named = dict(lenses) if isinstance(lenses, Mapping) else {n: n for n in lenses}
    if not named:
        raise LensInputError("pass at least one lens.")
    built = {n: built_in_lens(l) if isinstance(l, str) else l for n, l in named.items()}
    for n, l in built.items():
        if not isinstance(l, Lens):
            raise LensInputError(f"lens {n!r} is a {type(l).__name__}, not a mi_lenses Lens.")
    ks = sorted({1, *[int(k) for k in top_k]})
    if ks[0] < 1 or ks[-1] > view.d_vocab:
        raise LensInputError(f"top_k values must lie in 1..{view.d_vocab}, got {list(top_k)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LensInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    tokens = data if isinstance(data, torch.Tensor) else load_tokens(data, view, seq_len, max_tokens=max_tokens)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise LensInputError(f"tokens must be [n_seq, seq_len], got {tuple(tokens.shape)}.")
    bound = {n: l.bind(view.model) for n, l in built.items()}
    rows = view.residual_rows(point)
    # lenses that read only some rows (``lens.rows``, lens indices = row indices here) are NaN elsewhere
    readable = {n: list(getattr(l, "rows", None) or range(len(rows))) for n, l in bound.items()}
    names = list(dict.fromkeys(r.hook_name for r in rows))
    R = len(rows)
    metrics = ["kl_bits", "ce_bits", *[f"prec_at_{k}" for k in ks], "surprisal_bits", "mean_rank"]
    sums = {n: {m: torch.zeros(R, dtype=torch.float64) for m in metrics} for n in bound}
    counts = {n: {"ref": torch.zeros(R, dtype=torch.float64), "ce": torch.zeros(R, dtype=torch.float64)}
              for n in bound}
    seconds = {n: 0.0 for n in bound}
    own_ce = torch.zeros((), dtype=torch.float64)
    own_n = 0
    from tqdm.auto import tqdm

    batches = range(0, tokens.shape[0], batch_size)
    bar = tqdm(total=len(batches) * len(bound), desc="comparing lenses", unit="lens-batch", disable=not progress)
    with torch.no_grad():
        for b0 in batches:
            tb = tokens[b0 : b0 + batch_size].to(view.device)
            logits, cache = view.run_with_cache(view.batch(tb), names)
            lp = logits.float().log_softmax(-1)
            own_ce -= lp[:, :-1].gather(-1, tb[:, 1:, None]).double().sum().cpu()
            own_n += tb[:, 1:].numel()
            for n, lens in bound.items():
                t0 = time.perf_counter()
                sel = readable[n]
                res = run_lens(lens, view, tb, cache=cache, logits=logits, point=point, layers=sel, top_k=ks[-1],
                               check=False)
                seconds[n] += time.perf_counter() - t0
                ok = torch.isfinite(res.kl)
                ce_ok = torch.isfinite(res.cross_entropy)
                s = sums[n]
                s["kl_bits"][sel] += torch.where(ok, res.kl_bits, 0).double().sum((1, 2))
                s["ce_bits"][sel] += torch.where(ce_ok, res.cross_entropy_bits, 0).double().sum((1, 2))
                for k in ks:
                    s[f"prec_at_{k}"][sel] += ((res.final_top1_rank < k) & ok).double().sum((1, 2))
                s["surprisal_bits"][sel] += torch.where(ok, res.surprisal_bits, 0).double().sum((1, 2))
                s["mean_rank"][sel] += torch.where(ok, res.final_top1_rank, 0).double().sum((1, 2))
                counts[n]["ref"][sel] += ok.double().sum((1, 2))
                counts[n]["ce"][sel] += ce_ok.double().sum((1, 2))
                bar.update(1)
    bar.close()
    stats = {n: {m: torch.where(counts[n][c] > 0, v / counts[n][c].clamp(min=1), torch.nan).tolist()
                 for m, v in s.items() for c in ["ce" if m == "ce_bits" else "ref"]} for n, s in sums.items()}
    return LensComparison(
        model_name=view.name,
        layers=[r.label for r in rows],
        n_tokens=int(tokens.numel()),
        stats=stats,
        final_ce_bits=float(own_ce / max(own_n, 1) / LN2),
        ahead={n: int(getattr(l, "ahead", 0)) for n, l in bound.items()},
        seconds={n: round(v, 3) for n, v in seconds.items()},
        meta={"point": point, "seq_len": int(tokens.shape[1]), "sequences": int(tokens.shape[0])},
    )
