"""LensResult: what a lens believes at every layer and position, with the statistics and renderers.

One result type serves every lens (logit lens now, tuned lens later): rows run from the embedding row to the final
output row; per (row, batch, position) it holds the top-k tokens, ranks, KL to the final distribution, entropy and
cross-entropy. Units: the tensors are in nats; ``*_bits`` properties convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mi_lenses.errors import VerificationError  # noqa: F401  (re-exported here)

LN2 = math.log(2.0)


@dataclass
class LensResult:
    """Per-layer, per-position readout of a lens.

    Shapes: ``R`` rows (embedding row ... final output row), ``B`` prompts, ``P`` selected positions, ``k`` top
    tokens, ``T`` targets.

    Example::

        res = mi_lenses.logit_lens(model, "The capital of France is")
        res.top_tokens[-1][0][-1]      # final row, prompt 0, last position: [' Paris', ...]
        res.final_top1_rank[:, 0, -1]  # rank of the final prediction at every layer
        res.verify(); res.to_html("lens.html")
    """

    model_name: str
    lens_name: str
    labels: list[str]
    point: str
    tokens: Int[Tensor, "B S"]
    str_tokens: list[list[str]]
    positions: list[int]
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
    def top_tokens(self) -> list:
        """Decoded top-k tokens, nested ``[row][batch][position][k]``."""
        v = self.vocab
        return [[[[v[i] for i in pos] for pos in b] for b in r] for r in self.top_ids.tolist()]

    @property
    def target_strs(self) -> list[str]:
        return [self.vocab[i] for i in self.target_ids.tolist()]

    @property
    def position_tokens(self) -> list[list[str]]:
        """The input token at each selected position, ``[batch][position]``."""
        return [[row[p] if p < len(row) else "" for p in self.positions] for row in self.str_tokens]

    def mean_over_positions(self, values: Tensor) -> Float[Tensor, " R"]:
        """Average a ``[R, B, P]`` statistic over valid (non-padding, finite) positions."""
        mask = self.valid[None].expand_as(values) & torch.isfinite(values)
        return torch.where(mask, values, 0.0).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)

    # ------------------------------------------------------------------------------------ identities
    def verify(self, atol: float = 1e-3) -> "LensResult":
        """Check that the final row reproduces the model's own output; raise ``VerificationError`` otherwise.

        Compares the final row's top-k log-probs with the model's log-probs at the same tokens, and checks that the
        final row's top-1 token is the model's top-1 (up to ``atol`` for exact ties).
        """
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
    def to_dict(self, batch: int = 0) -> dict[str, Any]:
        """JSON-ready dict for one prompt (the ``mi-lenses logit-lens --json`` contract). Units: bits."""
        b = batch
        n = int(self.valid[b].sum())
        out: dict[str, Any] = {
            "model": self.model_name,
            "lens": self.lens_name,
            "tokens": self.position_tokens[b][:n],
            "positions": self.positions[:n],
            "layers": list(self.labels),
            "top_tokens": [row[b][:n] for row in self.top_tokens],
            "top_probs": _round(self.top_probs[:, b, :n]),
            "final_top1_rank": self.final_top1_rank[:, b, :n].tolist(),
            "kl_to_final": _round(self.kl_bits[:, b, :n]),
            "entropy": _round(self.entropy_bits[:, b, :n]),
            "cross_entropy": _round(self.cross_entropy_bits[:, b, :n]),
            "units": {"kl_to_final": "bits", "entropy": "bits", "cross_entropy": "bits"},
        }
        if len(self.target_ids):
            out["targets"] = self.target_strs
            out["target_rank"] = self.target_ranks[:, b, :n].tolist()
            out["target_probs"] = _round(self.target_probs[:, b, :n])
        return out

    def to_dataframe(self):
        """Tidy pandas frame: one row per (layer, batch, position, k) with token, prob, logit and the statistics."""
        import pandas as pd

        R, B, P, K = self.top_ids.shape
        idx = torch.cartesian_prod(torch.arange(R), torch.arange(B), torch.arange(P), torch.arange(K))
        r, b, p, k = idx.unbind(-1)
        keep = self.valid[b, p]
        r, b, p, k = r[keep], b[keep], p[keep], k[keep]
        ids = self.top_ids[r, b, p, k]
        frame = pd.DataFrame(
            {
                "layer": [self.labels[i] for i in r.tolist()],
                "layer_index": r.numpy(),
                "batch": b.numpy(),
                "position": [self.positions[i] for i in p.tolist()],
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

    def to_html(self, path=None, batch: int = 0) -> str:
        """Standalone offline HTML page (circuitsvis bundle inlined); written atomically to ``path`` if given."""
        from mi_lenses.viz.lens import lens_page

        return lens_page(self, path=path, batch=batch)

    def show(self, batch: int = 0):
        """Render in a notebook (circuitsvis ``RenderedHTML``, offline)."""
        from mi_lenses.viz.lens import lens_notebook

        return lens_notebook(self, batch=batch)

    def table(self, batch: int = 0, value: str = "prob"):
        """A rich table of the top-1 token per layer (rows) and position (columns)."""
        from mi_lenses.viz.terminal import lens_table

        return lens_table(self, batch=batch, value=value)

    def print(self, batch: int = 0, value: str = "prob") -> None:
        from mi_lenses.viz.terminal import print_renderable

        print_renderable(self.table(batch=batch, value=value))


def _round(t: Tensor, digits: int = 6) -> list:
    """Nested lists of rounded floats, ``None`` for NaN/inf (JSON has neither)."""

    def conv(x):
        if isinstance(x, list):
            return [conv(v) for v in x]
        return round(x, digits) if math.isfinite(x) else None

    return conv(t.tolist())
