"""The patching metric: the normalised logit difference by default, or any function of the logits.

Default: ``LD = mean over prompts of (logit[answer] - logit[wrong])`` at each prompt's last position (``logit[answer]``
alone without ``wrong``), normalised so that the corrupted run scores 0 and the clean run 1:

    value = (LD(patched) - LD(corrupted)) / (LD(clean) - LD(corrupted))

in both modes (denoising moves a cell from 0 towards 1, noising from 1 towards 0). This is the metric of the
TransformerLens IOI tutorials, and the one the oracle tests hand to ``transformer_lens.patching``. A callable
``metric(logits [B, S, vocab]) -> scalar`` replaces it (raw values, no normalisation), exactly as
``patching_metric`` in TransformerLens.

The default needs only two logits per prompt, so it is computed from the final residual stream through the model's
decoder (:mod:`mi_lenses.models.decode`): no ``[rows, pos, vocab]`` tensor is made.

Example:
    >>> m = Metric.logit_diff(ModelView(model), answer_ids=torch.tensor([5]), wrong_ids=None)
    >>> logits = torch.zeros(2, 3, model.cfg.d_vocab); logits[1, -1, 5] = 2.0
    >>> m.set_runs(clean=m.cells(logits=logits[1:]), corrupted=m.cells(logits=logits[:1]))
    >>> m.normalise(m.cells(logits=logits)).tolist()     # one prompt, two cells: the corrupted and the clean logits
    [0.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView

MetricFn = Callable[[Tensor], Tensor]


@dataclass
class Metric:
    """One metric: the logit difference of ``answer_ids`` (minus ``wrong_ids``; one per prompt) or a callable ``fn``.
    ``clean``/``corrupted`` are its raw values on the two runs (set by :meth:`set_runs`)."""

    view: ModelView
    name: str
    n_prompts: int
    answer_ids: Tensor | None = None
    wrong_ids: Tensor | None = None
    fn: MetricFn | None = None
    clean: float = float("nan")
    corrupted: float = float("nan")

    @classmethod
    def logit_diff(cls, view: ModelView, answer_ids: Tensor, wrong_ids: Tensor | None, label: str = "") -> "Metric":
        name = label or ("logit[answer] - logit[wrong]" if wrong_ids is not None else "logit[answer]")
        return cls(view, f"normalised {name}", int(answer_ids.shape[0]), answer_ids.long(),
                   None if wrong_ids is None else wrong_ids.long())

    @classmethod
    def callable(cls, view: ModelView, fn: MetricFn, n_prompts: int) -> "Metric":
        return cls(view, getattr(fn, "__name__", "metric"), n_prompts, fn=fn)

    @property
    def normalised(self) -> bool:
        return self.fn is None

    @property
    def needs_logits(self) -> bool:
        """A callable reads the full logits; the default only two columns of the last position."""
        return self.fn is not None

    # ------------------------------------------------------------------------------------------ evaluation
    def cells(self, *, logits: Tensor | None = None, resid: Tensor | None = None) -> Float[Tensor, " n"]:
        """Raw metric per cell of rows ``[n * B, S, ...]`` (each cell's ``B`` prompts consecutive): from the model's
        ``logits`` or from the final residual stream ``resid`` (decoded here). Differentiable."""
        B = self.n_prompts
        if self.fn is not None:  # one cell at a time: a [rows, pos, vocab] tensor of every row would be huge
            rows = (logits if logits is not None else resid).shape[0]
            out = [torch.as_tensor(self.fn(logits[i : i + B] if logits is not None
                                           else self.view.decode(resid[i : i + B]))) for i in range(0, rows, B)]
            for o in out:
                if o.numel() != 1:
                    raise LensInputError(f"metric must return a scalar (one number for the batch of {B} prompts), "
                                         f"got shape {tuple(o.shape)}.")
            values = torch.stack([o.reshape(()) for o in out]).float()
            if not bool(torch.isfinite(values.detach()).all()):
                i = int(torch.nonzero(~torch.isfinite(values.detach()))[0, 0])
                raise LensInputError(f"the metric {self.name!r} returned {float(values.detach()[i])} on the logits of a run (clean, "
                                     "corrupted or patched): a patching grid of it would hold NaN. Make the metric "
                                     "finite on every run (e.g. clamp a log, guard a division).")
            return values
        R = (logits if logits is not None else resid).shape[0]
        prompt = torch.arange(R) % B
        ids = self.answer_ids[prompt][:, None]
        if self.wrong_ids is not None:
            ids = torch.cat([ids, self.wrong_ids[prompt][:, None]], 1)
        if logits is not None:
            z = logits[:, -1].float().gather(-1, ids.to(logits.device))
        else:
            dec = self.view.decoder
            last = resid[:, -1].to(dec.W.device)
            z = dec.columns(dec.normalize(last), ids.to(last.device))
        diff = z[:, 0] - z[:, 1] if z.shape[1] == 2 else z[:, 0]
        return diff.view(-1, B).mean(-1)

    def set_runs(self, *, clean: Tensor, corrupted: Tensor) -> None:
        """Record the raw metric of the clean and the corrupted run (one cell each); the default metric refuses a
        pair it does not separate (its normalisation would divide by zero)."""
        self.clean, self.corrupted = float(clean.reshape(-1)[0]), float(corrupted.reshape(-1)[0])
        for run, value in (("clean", self.clean), ("corrupted", self.corrupted)):
            if not torch.isfinite(torch.tensor(value)):
                raise LensInputError(f"the metric ({self.name}) is {value} on the {run} run: a patching grid of it "
                                     "would be NaN. Make it finite on both runs (e.g. clamp a log, guard a division).")
        if self.normalised and not abs(self.clean - self.corrupted) > 1e-6:
            raise LensInputError(
                f"the clean and corrupted runs give the same {self.name[len('normalised '):]} ({self.clean:.6g}), so "
                "the normalised metric is undefined: choose a pair (or answer/wrong tokens) the model tells apart, or "
                "pass metric=callable for raw values.")

    def normalise(self, raw: Tensor) -> Tensor:
        """``(raw - corrupted) / (clean - corrupted)`` for the default metric; the raw values for a callable."""
        if not self.normalised:
            return raw
        return (raw - self.corrupted) / (self.clean - self.corrupted) + 0.0  # + 0.0: no negative zeros
