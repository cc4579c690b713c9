"""Evaluating dictionaries on held-out text: reconstruction (FVU, L0, dead features) and the model's cross-entropy with
each dictionary spliced in.

For every dictionary (each member of a set on its own), over the tokens of ``data``:

* ``fvu``: ``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``, ``y`` the activation it reconstructs, ``y_hat`` its
  output (the mean over all tokens; an SAE's ``y`` is its input, a transcoder's the MLP's output);
* ``l0``: active features per token (mean); ``dead_fraction``: features that never fire on these tokens;
* next-token cross-entropy (bits per token, every position with a next token): ``clean_ce_bits`` of the model as it
  is, ``spliced_ce_bits`` with the dictionary's output in place of the activation it reconstructs, and with that
  activation zero-ablated (``zero_ce_bits``) or replaced by its mean over the data (``mean_ce_bits``);
  ``delta_ce_bits = spliced - clean`` and ``loss_recovered = (zero - spliced) / (zero - clean)`` (SAELens's "CE loss
  score"; ``loss_recovered_mean`` against mean ablation).

Example (a dictionary that reconstructs exactly: ``relu(x) - relu(-x) == x``):
    >>> D = model.cfg.d_model
    >>> eye = torch.eye(D)
    >>> d = mi_lenses.Dictionary(torch.cat([eye, -eye], 1), torch.zeros(2 * D), torch.cat([eye, -eye]),
    ...                          torch.zeros(D), hook="blocks.1.hook_resid_post")
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    >>> ev = mi_lenses.evaluate_dictionary(model, d, tokens, progress=False)
    >>> ev.fvu[0] < 1e-10, abs(ev.delta_ce_bits[0]) < 1e-5, ev.loss_recovered[0] > 0.999
    (True, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mi_lenses.data import load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.options import DictionaryEvaluationOptions
from mi_lenses.features.reading import (
    DictionaryInput,
    as_dictionary,
    check_dictionary,
    dictionary_label,
    members,
    trained_exclude_first,
)
from mi_lenses.models.batch import check_context
from mi_lenses.models.view import ModelView
from mi_lenses.options import with_options
from mi_lenses.progress import bar as progress_bar
from mi_lenses.results import LN2, Result, dataframe, jsonable
from mi_lenses.viz.features import evaluation_fragment, evaluation_table

METRICS = ("fvu", "l0", "dead_fraction", "spliced_ce_bits", "zero_ce_bits", "mean_ce_bits", "delta_ce_bits",
           "loss_recovered", "loss_recovered_mean")


@dataclass
class DictionaryEvaluation(Result):
    """What :func:`evaluate_dictionary` measures (see :mod:`mi_lenses.features.evaluate`): one value per dictionary
    (``labels``: where each reads and writes) in every list; ``clean_ce_bits`` is the model's own."""

    model_name: str
    dictionary_name: str
    labels: list[str]
    n_tokens: int
    fvu: list[float]
    l0: list[float]
    dead_fraction: list[float]
    clean_ce_bits: float
    spliced_ce_bits: list[float]
    zero_ce_bits: list[float]
    mean_ce_bits: list[float]
    n_features: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"Dictionary evaluation: {self.dictionary_name} on {self.model_name}"

    @property
    def delta_ce_bits(self) -> list[float]:
        """Spliced minus clean cross-entropy (bits per token)."""
        return [s - self.clean_ce_bits for s in self.spliced_ce_bits]

    @staticmethod
    def _recovered(ablated: float, spliced: float, clean: float) -> float:
        gap = ablated - clean
        return (ablated - spliced) / gap if gap != 0 else float("nan")

    @property
    def loss_recovered(self) -> list[float]:
        """``(zero - spliced) / (zero - clean)``: 1 = the clean model's loss, 0 = as bad as zero-ablating."""
        return [self._recovered(z, s, self.clean_ce_bits) for z, s in zip(self.zero_ce_bits, self.spliced_ce_bits)]

    @property
    def loss_recovered_mean(self) -> list[float]:
        """The same against mean ablation."""
        return [self._recovered(m, s, self.clean_ce_bits) for m, s in zip(self.mean_ce_bits, self.spliced_ce_bits)]

    def _rows(self) -> list[dict[str, Any]]:
        return [{"dictionary": label, **{m: getattr(self, m)[i] for m in METRICS}}
                for i, label in enumerate(self.labels)]

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """JSON-ready: ``model``, ``dictionary``, ``n_tokens``, ``clean_ce_bits`` and per dictionary every metric."""
        self.check_batch(batch)
        return jsonable({"model": self.model_name, "dictionary": self.dictionary_name, "n_tokens": self.n_tokens,
                         "clean_ce_bits": self.clean_ce_bits, "dictionaries": self._rows()})

    def to_dataframe(self):
        """Tidy frame: one row per (dictionary, metric)."""
        return dataframe([{"dictionary": r["dictionary"], "metric": m, "value": r[m]} for r in self._rows()
                          for m in METRICS])

    def table(self, *, batch: int = 0):
        """A rich table: one row per dictionary."""
        self.check_batch(batch)
        return evaluation_table(f"{self.title} · {self.n_tokens} tokens", self._rows(),
                                f"clean CE {self.clean_ce_bits:.4f} bits/token; CE columns in bits/token")

    def fragment(self, *, batch: int = 0) -> str:
        """The same table as an HTML page body."""
        self.check_batch(batch)
        return evaluation_fragment(self.title, self._rows(),
                                   f"{self.n_tokens} tokens; clean CE {self.clean_ce_bits:.4f} bits/token")

    def _summary(self) -> str:
        fvu = ", ".join(f"{v:.3f}" for v in self.fvu)
        rec = ", ".join(f"{v:.3f}" for v in self.loss_recovered)
        return (f"{self.dictionary_name} on {self.model_name!r}: {self.n_tokens} tokens, FVU {fvu}, loss recovered "
                f"{rec}")


def _flat(act: Tensor) -> Tensor:
    return act.flatten(-2) if act.ndim == 4 else act


def _ce_sum(logits: Tensor, tokens: Tensor) -> float:
    """Summed next-token cross-entropy (nats) of every position with a next token."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return float(-lp.gather(-1, tokens[:, 1:, None].to(lp.device)).sum())


@with_options(DictionaryEvaluationOptions)
def evaluate_dictionary(
    model: Any,
    dictionary: DictionaryInput,
    data: Any,
    *,
    options: DictionaryEvaluationOptions | None = None,
) -> DictionaryEvaluation:
    """FVU, L0, dead features and the model's cross-entropy with ``dictionary`` spliced in, on held-out ``data``
    (see :mod:`mi_lenses.features.evaluate`).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), used as you hooked it.
        dictionary: a :class:`~mi_lenses.features.dictionary.Dictionary`, a
            :class:`~mi_lenses.features.dictionary.DictionarySet` (each member evaluated on its own; cross-layer
            transcoders are not supported) or a folder :func:`~mi_lenses.load_dictionary` reads.
        data: held-out text as for :func:`~mi_lenses.data.load_tokens` (a file, a folder, a cached ``datasets`` name)
            or token ids ``[n_seq, seq_len]``.
        options: a :class:`~mi_lenses.features.options.DictionaryEvaluationOptions` record; the keywords below
            override its fields.
        {options}

    Returns:
        :class:`DictionaryEvaluation`.
    """
    opts = options  # with_options merged the keywords into it
    view = ModelView(model)
    dictionary = as_dictionary(dictionary)
    hooks = _prepare(view, dictionary, opts)
    ds = members(dictionary)
    tokens = _tokens(view, data, opts)
    batches = [tokens[i: i + opts.batch_size] for i in range(0, tokens.shape[0], opts.batch_size)]
    totals = _Totals.zeros(ds)
    first = _first(ds, opts, tokens)
    for d in ds:
        d.to(view.device)
    bar = progress_bar(2 * len(batches), "evaluate dictionary", enabled=opts.progress)
    with torch.no_grad(), bar:
        for toks in batches:  # clean (with the reads), then each dictionary spliced in
            _clean_and_spliced(view, ds, hooks, toks.to(view.device), totals, first)
            bar.update(1)
        means = [s / totals.n_tok for s in totals.ysum]
        for toks in batches:  # ablations: zero and the mean over the data
            _ablated(view, hooks, toks.to(view.device), means, totals, first)
            bar.update(1)
    return _assemble(view, dictionary, ds, tokens, totals, first)


# ---------------------------------------------------------------------------------------------- prepare
def _prepare(view: ModelView, dictionary: Dictionary | DictionarySet, opts: DictionaryEvaluationOptions
             ) -> list[tuple[str, str]]:
    """Refuse what cannot be evaluated; each member's ``(reads, writes)`` hooks on this model."""
    if isinstance(dictionary, DictionarySet) and dictionary.cross:
        raise LensInputError("evaluate_dictionary does not splice cross-layer transcoders yet: evaluate a per-layer "
                             "set or single dictionaries.")
    opts.validate()
    return check_dictionary(view, dictionary)


def _tokens(view: ModelView, data: Any, opts: DictionaryEvaluationOptions) -> Tensor:
    """The held-out token ids ``[n_seq, seq_len]`` on the CPU (at most ``max_tokens`` of them)."""
    if isinstance(data, Tensor):
        tokens = data
        if opts.max_tokens:
            tokens = tokens[: max(1, opts.max_tokens // tokens.shape[-1])]
    else:
        check_context(view, opts.seq_len, "each sequence", fix="Pass a smaller seq_len (--seq-len).")
        tokens = load_tokens(data, view, opts.seq_len, max_tokens=opts.max_tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise LensInputError(f"token data must be [n_seq, seq_len >= 2], got {tuple(tokens.shape)}.")
    return tokens.long().cpu()


def _first(ds: list[Dictionary], opts: DictionaryEvaluationOptions, tokens: Tensor) -> int:
    """The leading positions left out: the option, or the most any dictionary was trained without."""
    first = opts.exclude_first if opts.exclude_first is not None else max(trained_exclude_first(d) for d in ds)
    if not isinstance(first, int) or not 0 <= first < tokens.shape[1] - 1:
        raise LensInputError(f"exclude_first must be an int in [0, {tokens.shape[1] - 1}) for sequences of "
                             f"{tokens.shape[1]} tokens, got {first!r}.")
    return first


@dataclass
class _Totals:
    """The running sums every metric is a ratio of, one entry per dictionary, and the token counts."""

    err2: Tensor  # [M] summed squared reconstruction error
    ysum: list[Tensor]  # [d_out] per dictionary: sum of the target
    y2: list[Tensor]  # [d_out] per dictionary: sum of its squares
    l0: Tensor  # [M] active features, summed over tokens
    fired: list[Tensor]  # [n_features] per dictionary: fired at least once
    ce: dict[str, Any]  # summed cross-entropy (nats): "clean", and per dictionary "spliced", "zero", "mean"
    n_tok: int = 0
    n_pred: int = 0

    @classmethod
    def zeros(cls, ds: list[Dictionary]) -> _Totals:
        """Empty sums for the dictionaries ``ds``."""
        M = len(ds)
        return cls(err2=torch.zeros(M, dtype=torch.float64),
                   ysum=[torch.zeros(d.d_out, dtype=torch.float64) for d in ds],
                   y2=[torch.zeros(d.d_out, dtype=torch.float64) for d in ds],
                   l0=torch.zeros(M, dtype=torch.float64),
                   fired=[torch.zeros(d.n_features, dtype=torch.bool) for d in ds],
                   ce={"clean": 0.0, "spliced": [0.0] * M, "zero": [0.0] * M, "mean": [0.0] * M})


# ---------------------------------------------------------------------------------------------- forward
def _splice(pair: tuple[str, str], replace: Any, first: int = 0) -> list[tuple[str, Any]]:
    """Hooks that put ``replace(x, y)`` (x: what a dictionary reads at ``pair[0]``, y: what it writes at
    ``pair[1]``) in place of y, but for the first ``first`` positions of each sequence."""
    h_in, h_out = pair
    seen: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any) -> Tensor:
        seen["x"] = _flat(act)
        return act

    def write(act: Tensor, hook: Any) -> Tensor:
        y = _flat(act)
        out = replace(seen.get("x", y), y).to(act.dtype)
        return torch.cat([y[:, :first], out[:, first:]], 1).reshape(act.shape)

    return ([] if h_in == h_out else [(h_in, read)]) + [(h_out, write)]


def _clean_run(view: ModelView, toks: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's own logits on ``toks`` and its activations at ``names`` (flattened per head)."""
    got: dict[str, Tensor] = {}

    def keeper(name: str) -> Any:
        def keep(act: Tensor, hook: Any) -> Tensor:
            got[name] = _flat(act)
            return act
        return keep

    with view.model.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
        logits = view.model(toks)
    return logits, got


def _clean_and_spliced(view: ModelView, ds: list[Dictionary], hooks: list[tuple[str, str]], toks: Tensor,
                       totals: _Totals, first: int) -> None:
    """One batch: the clean run (the model's loss, what each dictionary reads and writes), then each dictionary
    spliced in, added to ``totals``."""
    logits, got = _clean_run(view, toks, list(dict.fromkeys(n for pair in hooks for n in pair)))
    totals.ce["clean"] += _ce_sum(logits, toks)
    totals.n_tok += toks.shape[0] * (toks.shape[1] - first)
    totals.n_pred += toks.shape[0] * (toks.shape[1] - 1)
    for j, (d, (h_in, h_out)) in enumerate(zip(ds, hooks)):
        _reconstruction(j, d, got[h_in][:, first:], got[h_out][:, first:], totals)
        with view.model.hooks(fwd_hooks=_splice(hooks[j], lambda x, y, d=d: d.decode(d.encode(x), x), first)):
            totals.ce["spliced"][j] += _ce_sum(view.model(toks), toks)


def _ablated(view: ModelView, hooks: list[tuple[str, str]], toks: Tensor, means: list[Tensor],
             totals: _Totals, first: int) -> None:
    """One batch with each dictionary's target zero-ablated, then replaced by its mean over the data."""
    for j in range(len(hooks)):
        with view.model.hooks(fwd_hooks=_splice(hooks[j], lambda x, y: torch.zeros_like(y), first)):
            totals.ce["zero"][j] += _ce_sum(view.model(toks), toks)
        mean = means[j].float().to(view.device)
        with view.model.hooks(fwd_hooks=_splice(hooks[j], lambda x, y, m=mean: m.expand_as(y), first)):
            totals.ce["mean"][j] += _ce_sum(view.model(toks), toks)


# ---------------------------------------------------------------------------------------------- reduce
def _reconstruction(j: int, d: Dictionary, read: Tensor, written: Tensor, totals: _Totals) -> None:
    """Dictionary ``j``'s reconstruction error, target moments, L0 and fired features on one batch, into
    ``totals``."""
    x = read.float().reshape(-1, read.shape[-1])
    y = written.float().reshape(-1, written.shape[-1])
    if x.shape[-1] != d.d_in or y.shape[-1] != d.d_out:
        raise LensInputError(f"{d.hook}: the dictionary reads width {d.d_in} and writes {d.d_out}, the "
                             f"model's hooks have {x.shape[-1]} and {y.shape[-1]}.")
    acts = d.encode(x)
    totals.err2[j] += float((y - d.decode(acts, x)).double().pow(2).sum())
    totals.ysum[j] += y.double().sum(0).cpu()
    totals.y2[j] += y.double().pow(2).sum(0).cpu()
    totals.l0[j] += float((acts != 0).sum())
    totals.fired[j] |= (acts != 0).any(0).cpu()


# ---------------------------------------------------------------------------------------------- assemble
def _assemble(view: ModelView, dictionary: Dictionary | DictionarySet, ds: list[Dictionary], tokens: Tensor,
              t: _Totals, first: int) -> DictionaryEvaluation:
    """The sums as per-token ratios: FVU, L0, dead fraction and the cross-entropies in bits per predicted token."""
    M, n_tok = len(ds), t.n_tok
    total_var = [float((t.y2[j] - t.ysum[j].pow(2) / n_tok).sum()) for j in range(M)]
    bits = t.n_pred * LN2
    labels = [f"{d.kind} {d.hook}" + (f" -> {d.hook_out}" if d.is_transcoder else "") for d in ds]
    return DictionaryEvaluation(
        model_name=view.name, dictionary_name=dictionary_label(dictionary), labels=labels, n_tokens=n_tok,
        fvu=[float(t.err2[j]) / max(total_var[j], 1e-30) for j in range(M)], l0=[float(v) / n_tok for v in t.l0],
        dead_fraction=[float((~f).float().mean()) for f in t.fired], clean_ce_bits=t.ce["clean"] / bits,
        spliced_ce_bits=[v / bits for v in t.ce["spliced"]], zero_ce_bits=[v / bits for v in t.ce["zero"]],
        mean_ce_bits=[v / bits for v in t.ce["mean"]], n_features=[d.n_features for d in ds],
        meta={"seq_len": int(tokens.shape[1]), "n_seq": int(tokens.shape[0]), "exclude_first": first})


__all__ = ["DictionaryEvaluation", "evaluate_dictionary"]
