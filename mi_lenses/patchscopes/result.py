"""Results of Patchscope runs: one prompt's rows (:class:`PatchscopeResult`, one per source layer) and layer x layer
sweeps (:class:`SweepResult`). Surprisal is stored in nats (``-ln p``); ``surprisal_bits`` and every export use bits.

Example:
    >>> res = mi_lenses.patchscope(model, mi_lenses.Source("The capital of France is", layers=[0, -1]),
    ...                            mi_lenses.presets.identity(), max_new_tokens=2)
    >>> res.source_layers, res.prec_at_1.tolist()[-1], len(res.generated)
    ([0, 2], True, 2)
    >>> res.top_tokens[-1][0] == res.source_prediction   # at the last layer, the identity Patchscope is the model
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.indexing import resolve_index
from mi_lenses.results import LN2, Result, dataframe, jsonable, plural
from mi_lenses.viz.patchscopes import result_fragment, result_table, sweep_fragment, sweep_table


@dataclass
class PatchscopeResult(Result):
    """One source prompt and position; one layer (row) per (source layer ``l``, target layer ``l*``).

    ``prec_at_1[r]``: the target's top-1 next token equals the source model's own next-token prediction at ``i``;
    ``surprisal[r]``: ``-ln p_target(that token)`` in nats (``surprisal_bits`` in bits). ``generated_ids``
    ``[R, n]`` when generation ran.
    """

    model_name: str
    target_model_name: str
    target_name: str
    source_prompt: str
    source_str_tokens: list[str]
    source_position: int
    source_prediction: str
    source_layers: list[int]
    target_layers: list[int]
    target_prompt: str
    target_str_tokens: list[str]
    target_positions: list[int]
    mapped: bool
    top_ids: Int[Tensor, "R k"]
    top_logprobs: Float[Tensor, "R k"]
    prec_at_1: Bool[Tensor, " R"]
    surprisal: Float[Tensor, " R"]  # nats; surprisal_bits converts
    generated_ids: Int[Tensor, "R n"] | None
    vocab: dict[int, str] = field(repr=False)
    eos_token_id: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    view_options: ClassVar[dict[str, Any]] = {"layer": 0}  # see mi_lenses.results

    # ------------------------------------------------------------------------------------ views
    @property
    def source_token(self) -> str:
        """The source token at position ``i`` (whose hidden state is patched)."""
        return self.source_str_tokens[self.source_position]

    @property
    def surprisal_bits(self) -> Float[Tensor, " R"]:
        return self.surprisal / LN2

    @property
    def title(self) -> str:
        return f"Patchscope ({self.target_name}): {self.model_name}"

    @property
    def top_probs(self) -> Float[Tensor, "R k"]:
        return self.top_logprobs.exp()

    @property
    def top_tokens(self) -> list[list[str]]:
        return [[self.vocab[i] for i in row] for row in self.top_ids.tolist()]

    @property
    def generated_tokens(self) -> list[list[str]] | None:
        """Generated tokens per row, cut at the end-of-sequence token when ``stop_at_eos`` was on."""
        if self.generated_ids is None:
            return None
        out = []
        for row in self.generated_ids.tolist():
            if self.eos_token_id is not None and self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            out.append([self.vocab[i] for i in row])
        return out

    @property
    def generated(self) -> list[str] | None:
        toks = self.generated_tokens
        return None if toks is None else ["".join(t) for t in toks]

    @property
    def row_labels(self) -> list[str]:
        return [f"{l}" if l == t else f"{l}->{t}" for l, t in zip(self.source_layers, self.target_layers)]

    # ------------------------------------------------------------------------------------ exports
    def to_dict(self, *, batch: int = 0, layer: int | None = 0) -> dict[str, Any]:
        """JSON-ready dict. ``layer=r`` (default 0): row ``r`` merged with the source fields (the ``mi-lenses
        patchscope --json`` contract: source_token, generated, top_tokens, ...); ``layer=None``: the source fields
        plus ``"layers"``, one entry per row. Surprisal in bits."""
        self.check_batch(batch)
        gen = self.generated
        head = {
            "model": self.model_name, "target_model": self.target_model_name, "target": self.target_name,
            "source_prompt": self.source_prompt, "source_position": self.source_position,
            "source_token": self.source_token, "target_prompt": self.target_prompt,
            "target_positions": self.target_positions, "source_prediction": self.source_prediction,
            "units": {"surprisal": "bits"}, "settings": self.settings,
        }
        rows = [{
            "source_layer": self.source_layers[r], "target_layer": self.target_layers[r],
            "top_tokens": self.top_tokens[r], "top_probs": self.top_probs[r], "prec_at_1": bool(self.prec_at_1[r]),
            "surprisal": float(self.surprisal_bits[r]), "generated": None if gen is None else gen[r],
        } for r in range(len(self.source_layers))]
        if layer is None:
            return jsonable({**head, "layers": rows})

        return jsonable({**head, **rows[resolve_index(layer, len(rows), "layer", f"this result has {len(rows)} rows, one per source layer")]})

    def to_dataframe(self):
        """Tidy frame: one row per (source layer, target layer, k) with token, prob, prec@1, surprisal, generation."""
        gen = self.generated
        records = []
        for r, (l, t) in enumerate(zip(self.source_layers, self.target_layers)):
            for k, (tok, p) in enumerate(zip(self.top_tokens[r], self.top_probs[r].tolist())):
                records.append(dict(source_layer=l, target_layer=t, k=k, token=tok, prob=p,
                                    prec_at_1=bool(self.prec_at_1[r]), surprisal_bits=float(self.surprisal_bits[r]),
                                    generated=None if gen is None else gen[r]))
        return dataframe(records)

    def table(self, *, batch: int = 0):
        """A rich table: layer | top-1 (prob) | prec@1 | surprisal | generation."""
        self.check_batch(batch)
        return result_table(self)

    def fragment(self, *, batch: int = 0) -> str:
        """The prompts (patched positions highlighted) and one table row per (l, l*)."""
        self.check_batch(batch)
        return result_fragment(self)

    def _summary(self) -> str:
        on = self.model_name if self.target_model_name == self.model_name else \
            f"{self.model_name} -> {self.target_model_name}"
        hits = int(self.prec_at_1.sum())
        return (f"{self.target_name} on {on!r}: source {self.source_token!r} at position {self.source_position}, "
                f"{plural(len(self.source_layers), 'layer')} {self.row_labels}, prec@1 {hits}/"
                f"{len(self.source_layers)} on {self.source_prediction!r}"
                f"{'' if self.generated_ids is None else f', {self.generated_ids.shape[1]} tokens generated'}")


@dataclass
class SweepResult(Result):
    """Patchscope statistics over source layers ``l`` x target layers ``l*`` x source positions.

    ``prec_at_1``/``surprisal``/``answer_prob`` are ``[Ls, Lt, P]`` (``nan`` where a pair was not run, e.g. off the
    diagonal of an ``l* = l`` sweep); the ``*_mean`` properties average over positions. ``answer_prob`` is the
    probability of ``answer`` (default: the source model's own next-token prediction at each position).

    ``positions[p]`` is ``(batch, position)`` of source position ``p`` (position counted in that prompt's tokens).
    """

    model_name: str
    target_model_name: str
    target_name: str
    source_layers: list[int]
    target_layers: list[int]
    diagonal: bool
    positions: list[tuple[int, int]]  # (batch, position) of every source position
    source_tokens: list[str]  # the token at each source position
    source_predictions: list[str]
    prec_at_1: Float[Tensor, "Ls Lt P"]
    surprisal: Float[Tensor, "Ls Lt P"]  # nats
    answer_prob: Float[Tensor, "Ls Lt P"]
    answer: str | None
    top1_ids: Int[Tensor, "Ls Lt P"]
    vocab: dict[int, str] = field(repr=False)
    seconds: float = float("nan")

    @property
    def surprisal_bits(self) -> Float[Tensor, "Ls Lt P"]:
        return self.surprisal / LN2

    @property
    def title(self) -> str:
        return f"Patchscope sweep ({self.target_name}): {self.model_name}"

    @property
    def prec_at_1_mean(self) -> Float[Tensor, "Ls Lt"]:
        return self.prec_at_1.mean(-1)

    @property
    def surprisal_bits_mean(self) -> Float[Tensor, "Ls Lt"]:
        return _nanmean(self.surprisal_bits)

    @property
    def answer_prob_mean(self) -> Float[Tensor, "Ls Lt"]:
        return _nanmean(self.answer_prob)

    def per_layer(self) -> Float[Tensor, " Ls"]:
        """Precision@1 for ``l* = l`` (the diagonal) per source layer."""
        if self.diagonal:
            return self.prec_at_1_mean[:, 0]
        idx = [self.target_layers.index(l) if l in self.target_layers else None for l in self.source_layers]
        return torch.tensor([float(self.prec_at_1_mean[a, j]) if j is not None else math.nan
                             for a, j in enumerate(idx)])

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """JSON-ready (``--sweep --json``): ``prec_at_1[l][l2]`` and ``surprisal[l][l2]`` (bits, position means)."""
        self.check_batch(batch)
        tl = self.source_layers if self.diagonal else self.target_layers
        prec, surp, prob = self.prec_at_1_mean, self.surprisal_bits_mean, self.answer_prob_mean
        n = len(self.source_layers)

        def full(t: Tensor) -> list:  # an l* = l sweep becomes a square matrix with None off the diagonal
            if self.diagonal:
                return [[float(t[a, 0]) if a == b else None for b in range(n)] for a in range(n)]
            return t.tolist()

        return jsonable({
            "model": self.model_name,
            "target_model": self.target_model_name,
            "target": self.target_name,
            "source_layers": self.source_layers,
            "target_layers": tl,
            "n_positions": len(self.positions),
            "prec_at_1": full(prec),
            "surprisal": full(surp),
            "answer_prob": full(prob),
            "answer": self.answer,
            "units": {"surprisal": "bits"},
        })

    def to_dataframe(self):
        """Tidy frame: one row per (source layer, target layer, source position)."""
        Ls, Lt, P = self.prec_at_1.shape
        records = []
        for a in range(Ls):
            for b in range(Lt):
                t = self.source_layers[a] if self.diagonal else self.target_layers[b]
                for p in range(P):
                    if math.isnan(float(self.prec_at_1[a, b, p])):
                        continue
                    records.append(dict(
                        source_layer=self.source_layers[a], target_layer=t, batch=self.positions[p][0],
                        position=self.positions[p][1], source_token=self.source_tokens[p],
                        source_prediction=self.source_predictions[p], top1=self.vocab[int(self.top1_ids[a, b, p])],
                        prec_at_1=float(self.prec_at_1[a, b, p]), surprisal_bits=float(self.surprisal_bits[a, b, p]),
                        answer_prob=float(self.answer_prob[a, b, p]),
                    ))
        return dataframe(records)

    def table(self, *, batch: int = 0):
        """A rich table: precision@1 and surprisal per source layer at ``l* = l`` (where it was run)."""
        self.check_batch(batch)
        return sweep_table(self)

    def fragment(self, *, batch: int = 0) -> str:
        """Heat maps of precision@1, surprisal and target probability over (l, l*), and precision@1 per layer."""
        self.check_batch(batch)
        return sweep_fragment(self)

    def _summary(self) -> str:
        pairs = "l* = l" if self.diagonal else f"x {len(self.target_layers)} target layers"
        mean = float(_nanmean(self.prec_at_1.flatten()[None]))
        return (f"{self.target_name} on {self.model_name!r}: {len(self.source_layers)} source layers {pairs}, "
                f"{plural(len(self.positions), 'position')}, mean prec@1 {mean:.3f}")


def _nanmean(t: Tensor) -> Tensor:
    ok = torch.isfinite(t)
    return torch.where(ok, t, 0.0).sum(-1) / ok.sum(-1).clamp(min=1) + torch.where(ok.any(-1), 0.0, torch.nan)
