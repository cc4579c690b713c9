"""Lenses side by side on the same held-out tokens with the same metrics: :func:`compare_lenses` and its result.

Every lens runs through :func:`~mi_lenses.lenses.engine.run_lens` on the cache of one forward pass per batch of
sequences, so the numbers of different lenses are comparable by construction. This is the one evaluation loop of
mi_lenses: :func:`~mi_lenses.lenses.tuned.evaluate.evaluate_lens` is this bench with the logit lens and one lens.
Per row (``point="resid_pre"`` by default: ``embed``, the input of every block, ``final``; with
``point="resid_post"`` the same states are labelled as block outputs, and a Patchscope at layer ``l`` is row
``l_post``) and lens, averaged over the tokens that have a reference:

* ``kl_bits``: KL(model's output distribution || lens), bits;
* ``ce_bits``: cross-entropy to the actual next token, bits (tokens that have one);
* ``entropy_bits``: the entropy of the lens's distribution, bits (every token);
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

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
from rich.table import Table

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.engine import run_lens
from mi_lenses.lenses.lens import Lens, lens_by_name
from mi_lenses.lenses.options import Point
from mi_lenses.models.batch import check_context
from mi_lenses.models.view import ModelView
from mi_lenses.progress import bar
from mi_lenses.results import LN2, Result, dataframe, jsonable
from mi_lenses.viz.compare import comparison_fragment

LENS_NAMES = ("logit", "tuned", "patchscope", "patchscope-q", "jacobian", "future")  # the command line's names
DEFAULT_MAX_TOKENS = 2048  # the bench's and evaluate_lens's default: about 50 s per fitted lens for SmolLM2 on 2 cores


@dataclass
class LensComparison(Result):
    """Per-row statistics of several lenses on the same tokens (means over tokens; see the module docstring).

    ``stats[lens][metric][i]`` is the value at row ``layers[i]`` (NaN where a lens has no map for that row, and
    ``null`` in JSON); metrics are ``kl_bits``, ``ce_bits``, ``entropy_bits``,
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

    view_options: ClassVar[dict[str, Any]] = {"metric": "prec_at_1"}  # see mi_lenses.results

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
        return dataframe([{"lens": name, "layer": lab, "layer_index": i, "metric": metric, "value": vals[i]}
                          for name, d in self.stats.items() for metric, vals in d.items()
                          for i, lab in enumerate(self.layers)])

    def table(self, *, batch: int = 0, metric: Literal["prec_at_1", "kl_bits", "ce_bits", "surprisal_bits",
                                                        "mean_rank"] = "prec_at_1"):
        """A rich table of one metric: rows x lenses."""
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
        self.check_batch(batch)
        return comparison_fragment(self)

    def _summary(self) -> str:
        return (f"on {self.model_name!r}: lenses {self.lenses} x {len(self.layers)} rows, {self.n_tokens} tokens, "
                f"model's own CE {self.final_ce_bits:.3f} bits")


def compare_lenses(
    model: Any,
    data: Any,
    lenses: Mapping[str, Lens | str] | Sequence[str] = ("logit", "patchscope", "patchscope-q"),
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    seq_len: int = 128,
    batch_size: int = 4,
    point: Point = "resid_pre",
    precision_at: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> LensComparison:
    """Run every lens on the same held-out tokens and average the statistics per row (see the module docstring).

    Args:
        model: a TransformerLens model or a ``ModelView``; every lens is bound to it.
        data: a text source for :func:`~mi_lenses.data.load_tokens` or token ids ``[n_seq, seq_len]``.
        lenses: names of built-in lenses (``"logit"``, ``"patchscope"``, ``"patchscope-q"``), or a mapping
            ``{name: lens}`` with fitted lenses (a ``TunedLens``, ``JacobianLens``, ``FutureLens``, any ``Lens``)
            or built-in names as values.
        max_tokens, seq_len: read at most ``max_tokens`` tokens, packed into sequences of ``seq_len``.
        batch_size: sequences per forward pass (one cache serves every lens).
        point: the rows, ``"resid_pre"`` (default: ``embed``, the input of every block, ``final``) or
            ``"resid_post"`` (the same states labelled as block outputs: Patchscope layer ``l`` is row ``l_post``).
        precision_at: the ``k`` of every ``prec_at_k`` reported (1 always included).
        progress: a bar over the batches.
    """
    view = ModelView(model)
    named = dict(lenses) if isinstance(lenses, Mapping) else {n: n for n in lenses}
    if not named:
        raise LensInputError("pass at least one lens.")
    built = {n: lens_by_name(l) if isinstance(l, str) else l for n, l in named.items()}
    for n, l in built.items():
        if not isinstance(l, Lens):
            raise LensInputError(f"lens {n!r} is a {type(l).__name__}, not a mi_lenses Lens.")
    ks = sorted({1, *[int(k) for k in precision_at]})
    if ks[0] < 1 or ks[-1] > view.d_vocab:
        raise LensInputError(f"precision_at values must lie in 1..{view.d_vocab}, got {list(precision_at)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LensInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    tokens = data if isinstance(data, torch.Tensor) else load_tokens(data, view, seq_len, max_tokens=max_tokens)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise LensInputError(f"tokens must be [n_seq, seq_len], got {tuple(tokens.shape)}.")
    check_context(view, int(tokens.shape[1]), "each sequence", fix="Pass a smaller seq_len (--seq-len).")
    bound = {n: l.bind(view.model) for n, l in built.items()}
    rows = view.residual_rows(point)
    # lenses that read only some rows (``lens.rows``, lens indices = row indices here) are NaN elsewhere
    readable = {n: list(l.rows if l.rows is not None else range(len(rows))) for n, l in bound.items()}
    names = list(dict.fromkeys(r.hook_name for r in rows))
    sums = {n: _Sums(len(rows), ks) for n in bound}
    seconds = {n: 0.0 for n in bound}
    own = _Sums(1, [1])
    batches = range(0, tokens.shape[0], batch_size)
    with torch.no_grad(), bar(len(batches) * len(bound), "comparing lenses", unit="lens-batch",
                              enabled=progress) as b:
        for b0 in batches:
            tb = tokens[b0 : b0 + batch_size].to(view.device)
            logits, cache = view.run_with_cache(view.batch(tb, beyond_context=True), names)  # length checked above
            own.add_model(logits, tb)
            for n, lens in bound.items():
                t0 = time.perf_counter()
                res = run_lens(lens, view, tb, cache=cache, logits=logits, point=point, layers=readable[n],
                               top_k=ks[-1], progress=False)  # final row verified
                seconds[n] += time.perf_counter() - t0
                sums[n].add(res, readable[n])
                b.update(1)
    return LensComparison(
        model_name=view.name,
        layers=[r.label for r in rows],
        n_tokens=int(tokens.numel()),
        stats={n: s.means() for n, s in sums.items()},
        final_ce_bits=own.means()["ce_bits"][0],
        ahead={n: l.ahead for n, l in bound.items()},
        seconds={n: round(v, 3) for n, v in seconds.items()},
        meta={"point": point, "seq_len": int(tokens.shape[1]), "sequences": int(tokens.shape[0])},
    )


class _Sums:
    """Per-row sums of every metric and the counts they are divided by: tokens with a reference position (KL,
    precision, surprisal, rank) and tokens with a next token (CE). NaN cells (no reference, no next token, padding)
    count in neither: the one NaN rule of the bench and of ``evaluate_lens``."""

    def __init__(self, n_rows: int, ks: Sequence[int]):
        self.ks = list(ks)
        self.metrics = ["kl_bits", "ce_bits", "entropy_bits", *[f"prec_at_{k}" for k in ks], "surprisal_bits",
                        "mean_rank"]
        self.sums = {m: torch.zeros(n_rows, dtype=torch.float64) for m in self.metrics}
        self.count = {c: torch.zeros(n_rows, dtype=torch.float64) for c in ("ref", "ce", "all")}

    def add(self, res: Any, sel: list[int]) -> None:
        ok, ce_ok, valid = torch.isfinite(res.kl), torch.isfinite(res.cross_entropy), res.valid[None].expand_as(res.kl)
        s = self.sums

        def total(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, 0).double().sum((1, 2))

        s["kl_bits"][sel] += total(res.kl_bits, ok)
        s["ce_bits"][sel] += total(res.cross_entropy_bits, ce_ok)
        s["entropy_bits"][sel] += total(res.entropy_bits, valid)
        for k in self.ks:
            s[f"prec_at_{k}"][sel] += ((res.final_top1_rank < k) & ok).double().sum((1, 2))
        s["surprisal_bits"][sel] += total(res.surprisal_bits, ok)
        s["mean_rank"][sel] += total(res.final_top1_rank, ok)
        self.count["ref"][sel] += ok.double().sum((1, 2))
        self.count["ce"][sel] += ce_ok.double().sum((1, 2))
        self.count["all"][sel] += valid.double().sum((1, 2))

    def add_model(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """The model's own next-token cross-entropy (row 0)."""
        lp = logits.float().log_softmax(-1)
        self.sums["ce_bits"][0] -= lp[:, :-1].gather(-1, tokens[:, 1:, None]).double().sum().cpu() / LN2
        self.count["ce"][0] += tokens[:, 1:].numel()

    def means(self) -> dict[str, list[float]]:
        def by(m: str) -> str:
            return "ce" if m == "ce_bits" else "all" if m == "entropy_bits" else "ref"

        return {m: torch.where(self.count[by(m)] > 0, v / self.count[by(m)].clamp(min=1), torch.nan).tolist()
                for m, v in self.sums.items()}
