"""LensResult: what a lens believes at every layer and position, with the statistics and renderers.

One result type serves every lens (logit lens, tuned lens, ...): layers (rows) run from the embedding row to the final
output row; per (layer, batch, position) it holds the top-k tokens, ranks, KL to the final distribution, entropy and
cross-entropy. Units: the tensors are in nats; ``*_bits`` properties convert. Padding is never a number: padded
positions hold NaN (floats) and -1 (ids and ranks), and exports leave them out.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is")
    >>> res.top_tokens[-1][0][-1] == [res.vocab[i] for i in res.top_ids[-1, 0, -1].tolist()]
    True
    >>> res.to_dataframe().columns[:4].tolist()
    ['layer', 'layer_index', 'batch', 'position']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.results import LN2, Result, dataframe, jsonable, plural
from mi_lenses.viz.lens import lens_fragment
from mi_lenses.viz.terminal import lens_table


# Default tolerance of LensResult.verify (log-prob units), per matmul or model dtype.
VERIFY_ATOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class LensResult(Result):
    """Per-layer, per-position readout of a lens.

    Shapes: ``R`` layers (embedding row ... final output row), ``B`` prompts, ``P`` selected positions, ``k`` top
    tokens, ``T`` targets. ``positions[j]`` is column ``j`` as requested (``-1``: each prompt's last token);
    ``token_index[b, j]`` is the token of prompt ``b`` it reads (-1 where prompt ``b`` has none: ``valid`` is False).

    >>> res = mi_lenses.logit_lens(model, "The capital of France is")
    >>> res.final_top1_rank[-1, 0].tolist() == [0] * len(res.positions)   # the final row ranks its top-1 first
    True
    """

    model_name: str
    lens_name: str
    labels: list[str]
    point: str
    tokens: Int[Tensor, "B S"]
    str_tokens: list[list[str]]
    positions: list[int]
    token_index: Int[Tensor, "B P"]
    valid: Bool[Tensor, "B P"]
    top_ids: Int[Tensor, "R B P k"]
    top_logits: Float[Tensor, "R B P k"]
    logsumexp: Float[Tensor, "R B P"]
    entropy: Float[Tensor, "R B P"]
    kl: Float[Tensor, "R B P"]
    cross_entropy: Float[Tensor, "R B P"]
    final_top1: Int[Tensor, "B P"]
    final_top1_rank: Int[Tensor, "R B P"]
    target_ids: Int[Tensor, " T"]
    target_ranks: Int[Tensor, "R B P T"]
    target_logprobs: Float[Tensor, "R B P T"]
    vocab: dict[int, str] = field(repr=False)
    logits: Float[Tensor, "R B P V"] | None = field(default=None, repr=False)
    # the model's own log-probs at the final row's top-k ids, and its own max log-prob (for verify)
    reference_logprobs: Float[Tensor, "B P k"] | None = field(default=None, repr=False)
    reference_max_logprob: Float[Tensor, "B P"] | None = field(default=None, repr=False)
    dtype: str = "float32"
    model_dtype: str = "float32"  # the model's weights (its own logits, which verify compares with, are this precise)
    # log-prob, under each row, of the reference's top-1 token (the model's own prediction at t + ahead)
    final_top1_logprob: Float[Tensor, "R B P"] | None = field(default=None, repr=False)
    ahead: int = 0  # the lens predicts the model's distribution at t + ahead (see Lens.ahead)
    final_is_output: bool = True  # the final row is the model's own output (False for lenses that map it)

    view_options: ClassVar[dict[str, Any]] = {"value": "prob", "max_positions": 12, "max_layers": None}  # see results

    # ------------------------------------------------------------------------------------ derived views
    @property
    def top_probs(self) -> Float[Tensor, "R B P k"]:
        return (self.top_logits - self.logsumexp[..., None]).exp()

    @property
    def target_probs(self) -> Float[Tensor, "R B P T"]:
        return self.target_logprobs.exp()

    @property
    def kl_bits(self) -> Float[Tensor, "R B P"]:
        return self.kl / LN2

    @property
    def entropy_bits(self) -> Float[Tensor, "R B P"]:
        return self.entropy / LN2

    @property
    def cross_entropy_bits(self) -> Float[Tensor, "R B P"]:
        return self.cross_entropy / LN2

    @property
    def surprisal_bits(self) -> Float[Tensor, "R B P"]:
        """``-log2 p(model's own top-1 token)`` under each row: the Patchscopes paper's surprisal (NaN where unknown)."""
        if self.final_top1_logprob is None:
            return torch.full(self.kl.shape, torch.nan)
        return -self.final_top1_logprob / LN2

    @property
    def prec_at_1(self) -> Float[Tensor, "R B P"]:
        """1.0 where a row's top-1 token is the model's own top-1 (at ``t + ahead``), 0.0 where not, NaN where there
        is no reference."""
        hit = (self.top_ids[..., 0] == self.final_top1[None]).float()
        return torch.where(self.final_top1[None] >= 0, hit, torch.nan)

    @property
    def n_batch(self) -> int:
        return int(self.valid.shape[0])

    @property
    def title(self) -> str:
        return f"{self.lens_name}: {self.model_name}"

    @property
    def top_tokens(self) -> list:
        """Decoded top-k tokens, nested ``[layer][batch][position][k]`` (``""`` at padding)."""
        v = self.vocab
        return [[[[v.get(i, "") for i in pos] for pos in b] for b in r] for r in self.top_ids.tolist()]

    @property
    def target_strs(self) -> list[str]:
        return [self.vocab[i] for i in self.target_ids.tolist()]

    @property
    def position_tokens(self) -> list[list[str]]:
        """The input token at each selected position, ``[batch][position]`` (``""`` where a prompt has none)."""
        return [[row[i] if i >= 0 else "" for i in idx] for row, idx in zip(self.str_tokens, self.token_index.tolist())]

    def columns(self, batch: int = 0) -> list[int]:
        """The columns that hold real tokens of prompt ``batch``."""
        return [j for j in range(len(self.positions)) if bool(self.valid[batch, j])]

    def mean_over_positions(self, values: Tensor) -> Float[Tensor, " R"]:
        """Average a ``[R, B, P]`` statistic over valid (non-padding, finite) positions."""
        mask = self.valid[None].expand_as(values) & torch.isfinite(values)
        return torch.where(mask, values, 0.0).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)

    # ------------------------------------------------------------------------------------ identities
    def verify(self, atol: float | None = None) -> "LensResult":
        """Check that the final row reproduces the model's own output; raise ``VerificationError`` otherwise.

        Compares the final row's top-k log-probs with the model's log-probs at the same tokens, and checks that the
        final row's top-1 token is the model's top-1 (up to ``atol`` for exact ties). ``atol`` defaults to
        :data:`VERIFY_ATOL` of the coarser of the matmul dtype and the model's dtype (1e-3 in float32, 0.25 for a
        bfloat16 matmul or model).
        """
        if atol is None:
            atol = max(VERIFY_ATOL.get(self.dtype, VERIFY_ATOL["bfloat16"]),
                       VERIFY_ATOL.get(self.model_dtype, VERIFY_ATOL["float32"]))
        if not self.final_is_output:
            raise VerificationError(
                f"the {self.lens_name} maps the final row too (or predicts {self.ahead} positions ahead): its final "
                "row is not the model's output, so this identity does not apply to it."
            )
        if self.reference_logprobs is None or self.reference_max_logprob is None:
            raise VerificationError(
                "verify needs the model's own logits and the final row: run the lens on a prompt or tokens (or pass "
                "logits= together with cache=), with the final row among the layers."
            )
        mask = self.valid
        if not mask.any():
            return self
        ours = (self.top_logits[-1] - self.logsumexp[-1][..., None])[mask]
        theirs = self.reference_logprobs[mask]
        err = (ours - theirs).abs().max().item()
        if not err <= atol:
            raise VerificationError(
                f"the lens's final row differs from the model's log-probs by {err:.2e} (> {atol:.0e}): the decode "
                "path (final norm + unembedding) does not reproduce this model."
            )
        gap = (self.reference_max_logprob[mask] - theirs[:, 0]).max().item()
        if not gap <= atol:
            raise VerificationError(
                f"the lens's final top-1 token is not the model's top-1 (log-prob gap {gap:.2e})."
            )
        if self.final_top1_rank[-1][mask].max().item() != 0:
            raise VerificationError("the final top-1 token does not have rank 0 at the final row.")
        return self

    # ------------------------------------------------------------------------------------ exports
    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """JSON-ready dict for one prompt (the ``mi-lenses logit-lens --json`` contract), real tokens only.
        Units: bits; ``layers`` run from the embedding row to the final row; ``positions`` are token indices."""
        b = self.check_batch(batch)
        cols = self.columns(b)
        out: dict[str, Any] = {
            "model": self.model_name,
            "lens": self.lens_name,
            "tokens": [self.position_tokens[b][j] for j in cols],
            "positions": [int(self.token_index[b, j]) for j in cols],
            "layers": list(self.labels),
            "top_tokens": [[row[b][j] for j in cols] for row in self.top_tokens],
            "top_probs": self.top_probs[:, b, cols],
            "final_top1_rank": self.final_top1_rank[:, b, cols],
            "kl_to_final": self.kl_bits[:, b, cols],
            "entropy": self.entropy_bits[:, b, cols],
            "cross_entropy": self.cross_entropy_bits[:, b, cols],
            "units": {"kl_to_final": "bits", "entropy": "bits", "cross_entropy": "bits"},
        }
        if len(self.target_ids):
            out["targets"] = self.target_strs
            out["target_rank"] = self.target_ranks[:, b, cols]
            out["target_probs"] = self.target_probs[:, b, cols]
        return jsonable(out)

    def to_dataframe(self):
        """Tidy pandas frame: one row per (layer, batch, position, k) with token, prob, logit and the statistics;
        padding excluded."""
        R, B, P, K = self.top_ids.shape
        idx = torch.cartesian_prod(torch.arange(R), torch.arange(B), torch.arange(P), torch.arange(K))
        r, b, p, k = idx.unbind(-1)
        keep = self.valid[b, p]
        r, b, p, k = r[keep], b[keep], p[keep], k[keep]
        ids = self.top_ids[r, b, p, k]
        frame = dataframe(
            {
                "layer": [self.labels[i] for i in r.tolist()],
                "layer_index": r.numpy(),
                "batch": b.numpy(),
                "position": self.token_index[b, p].numpy(),
                "input_token": [self.position_tokens[bb][pp] for bb, pp in zip(b.tolist(), p.tolist())],
                "k": k.numpy(),
                "token_id": ids.numpy(),
                "token": [self.vocab[i] for i in ids.tolist()],
                "prob": self.top_probs[r, b, p, k].numpy(),
                "logit": self.top_logits[r, b, p, k].numpy(),
                "final_top1_rank": self.final_top1_rank[r, b, p].numpy(),
                "kl_bits": self.kl_bits[r, b, p].numpy(),
                "entropy_bits": self.entropy_bits[r, b, p].numpy(),
                "cross_entropy_bits": self.cross_entropy_bits[r, b, p].numpy(),
            }
        )
        for t, name in enumerate(self.target_strs):
            frame[f"rank[{name}]"] = self.target_ranks[r, b, p, t].numpy()
            frame[f"prob[{name}]"] = self.target_probs[r, b, p, t].numpy()
        return frame

    def fragment(self, *, batch: int = 0) -> str:
        """The page body for one prompt: top-1 grid, rank grids, KL chart, circuitsvis views."""
        return lens_fragment(self, batch=self.check_batch(batch))

    def table(self, *, batch: int = 0, value: Literal["prob", "rank"] = "prob", max_positions: int = 12,
              max_layers: int | None = None):
        """A rich table of the top-1 token per layer (rows) and position (columns: the last ``max_positions``), with
        KL and every target's rank at the last position; ``max_layers`` strides the rows (the final row is always
        kept)."""
        for name, v in (("max_positions", max_positions), ("max_layers", max_layers)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LensInputError(f"{name} must be a positive int, got {v!r}.")
        return lens_table(self, batch=self.check_batch(batch), value=value, max_positions=max_positions,
                          max_layers=max_layers)

    def _summary(self) -> str:
        targets = f", targets {self.target_strs}" if len(self.target_ids) else ""
        ahead = f", {self.ahead} ahead" if self.ahead else ""
        return (f"{self.lens_name} on {self.model_name!r}: {plural(self.n_batch, 'prompt')}, {len(self.labels)} rows "
                f"({self.labels[0]} .. {self.labels[-1]}) x {plural(len(self.positions), 'position')}, top-"
                f"{self.top_ids.shape[-1]} tokens{targets}{ahead}, point {self.point}")
