"""The experiment every patching engine takes: the prompt pair and its tokens, the metric, the user's hooks, the
batching and the clock.

Each entry point (:func:`~mi_lenses.patching.activation.activation_patching`,
:func:`~mi_lenses.patching.edges.edge_attribution`, :func:`~mi_lenses.patching.paths.path_patching`) has the shape of
the lens engine (:mod:`mi_lenses.lenses.engine`): **prepare** (its options validated, :meth:`Experiment.prepare`:
the pair checked and the metric resolved before any forward pass), **forward** (one engine, exact, gradient, edge or
path, runs the clean and corrupted runs, :meth:`Experiment.measure` records the metric on them once, and the patched
runs), **reduce** (raw metric values into normalised ones) and **assemble** (the result, with
:meth:`Experiment.result_fields` and :meth:`Experiment.finish`).

Example:
    >>> exp = Experiment.prepare(model, "The capital of France is", "The capital of Rome is",
    ...                          PairOptions(answer=" Paris", wrong=" city"))
    >>> with torch.no_grad():
    ...     base, source = (exp.metric.cells(logits=model(run.tokens)) for run in (exp.pair.base, exp.pair.source))
    >>> exp.measure(base=base, source=source)
    >>> exp.normalise(torch.cat([base, source])).tolist()   # denoising: the corrupted run scores 0, the clean run 1
    [0.0, 1.0]
    >>> exp.span, exp.metric.clean == float(source[0])
    (1.0, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mi_lenses.attribution.directions import TokenSpec, resolve_direction
from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching.metric import Metric, MetricFn
from mi_lenses.patching.options import PairOptions
from mi_lenses.patching.pair import Pair, PositionMap, make_pair


@dataclass
class Experiment:
    """One patching experiment (see the module docstring): ``hooks`` are the user's hooks active when it started
    (they stay active in every run and are recorded on the result); ``max_batch`` and ``progress`` steer the engines
    that batch many patched runs."""

    view: ModelView
    pair: Pair
    metric: Metric
    hooks: list[str]
    max_batch: int | None = None
    progress: bool = True
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def prepare(cls, model: Any, clean: PromptInput, corrupted: PromptInput, opts: PairOptions, *,
                position_map: PositionMap | None = None, aligned: str | None = None, max_batch: int | None = None,
                progress: bool = True) -> "Experiment":
        """The experiment of ``clean`` and ``corrupted`` under ``opts`` (validated): the pair checked (``aligned``:
        the analysis that takes no position map, see :func:`~mi_lenses.patching.pair.make_pair`), the metric
        resolved; no forward pass yet."""
        started = time.perf_counter()
        view = ModelView(model)
        hooks = active_hooks(view.model)
        opts.validate()
        pair = make_pair(view, clean, corrupted, position_map=position_map, mode=opts.mode,
                         prepend_bos=opts.prepend_bos, beyond_context=opts.beyond_context, aligned=aligned)
        metric = resolve_metric(view, pair, opts.answer, opts.wrong, opts.metric)
        return cls(view, pair, metric, hooks, max_batch, progress, started)

    # ------------------------------------------------------------------------------------------ the two runs
    def measure(self, *, base: Float[Tensor, " 1"], source: Float[Tensor, " 1"]) -> None:
        """Record the raw metric of the base and the source run (the engines call this once, before the patched runs
        where they can); refused where the default metric does not separate the runs."""
        clean, corrupted = (source, base) if self.pair.mode == "denoise" else (base, source)
        self.metric.set_runs(clean=clean, corrupted=corrupted)

    @property
    def gap(self) -> float:
        """What raw values are divided by: ``clean - corrupted`` for the default metric, 1 for a callable."""
        return (self.metric.clean - self.metric.corrupted) if self.metric.normalised else 1.0

    @property
    def span(self) -> float:
        """``metric(source) - metric(base)`` in the result's units: ±1 for the default metric (+1 denoising)."""
        sign = 1.0 if self.pair.mode == "denoise" else -1.0
        return sign * (1.0 if self.metric.normalised else self.metric.clean - self.metric.corrupted)

    def normalise(self, raw: Tensor) -> Tensor:
        """Raw metric values in the result's units (0 = corrupted, 1 = clean for the default metric)."""
        return self.metric.normalise(raw)

    # ------------------------------------------------------------------------------------------ assemble
    def position_labels(self) -> list[str]:
        """One label per aligned position: the token, ``clean/corrupted`` where the two differ."""
        c, x = self.view.str_tokens(self.pair.clean)[0], self.view.str_tokens(self.pair.corrupted)[0]
        return [c[a] if c[a] == x[b] else f"{c[a]}/{x[b]}" for a, b in self.pair.clean_map]

    def result_fields(self) -> dict[str, Any]:
        """The keywords every :class:`~mi_lenses.patching.result.PatchingResult` of this experiment shares."""
        m = self.metric
        return dict(model_name=self.view.name, mode=self.pair.mode, metric=m.name, pos_labels=self.position_labels(),
                    clean_tokens=self.view.str_tokens(self.pair.clean)[0],
                    corrupted_tokens=self.view.str_tokens(self.pair.corrupted)[0], pos_map=list(self.pair.clean_map),
                    clean_value=m.clean, corrupted_value=m.corrupted, normalised=m.normalised,
                    n_prompts=self.pair.n_prompts, seconds=self.seconds)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, result: Any) -> Any:
        """``result`` with the user's hooks recorded on it."""
        return recorded(result, self.hooks)


def resolve_metric(view: ModelView, pair: Pair, answer: TokenSpec | None, wrong: TokenSpec | None,
                   metric: MetricFn | None) -> Metric:
    """The metric of a call: a callable, or the normalised logit difference of ``answer`` (minus ``wrong``)."""
    if metric is not None:
        if not callable(metric):
            raise LensInputError(f"metric must be a function of the logits [batch, pos, vocab], got {metric!r}.")
        if answer is not None or wrong is not None:
            raise LensInputError("pass either metric= or answer=/wrong= (the default metric), not both.")
        return Metric.callable(view, metric, pair.n_prompts)
    if answer is None:
        raise LensInputError("pass answer= (and usually wrong=): the default metric is the normalised "
                             "logit[answer] - logit[wrong]. Or pass metric=callable on the logits.")
    tokens = resolve_direction(view, pair.n_prompts, answer, wrong)
    return Metric.logit_diff(view, tokens.answer_ids, tokens.wrong_ids, tokens.label)
