"""The report: one prompt, one forward pass, every lens, the attribution and the attention, on one offline page.

:func:`report` answers a researcher's first three questions about a prompt: what does each layer believe (logit lens,
the tuned lens beside it, the identity Patchscope against the logit lens), which parts wrote the answer (direct logit
attribution: heads, MLPs, neurons, the source positions of the top heads) and where do the heads look (head, model
and neuron views, attention sinks, previous-token and induction heads); with ``corrupted=`` a prompt of the same
length, also what matters causally (exact activation patching of the residual stream, layer x position, and attribution
patching of every head). Every section reuses the same cache, and each result inside is the ordinary result of its own
entry point, verified as usual.

A prompt longer than ``LONG_PROMPT`` tokens gets what a reader of the page can use, in bounded memory: the lenses at
its last ``LONG_PROMPT`` positions, and the attention diagnostics of every head over the whole prompt with the pattern
rows of the last ``HEAD_VIEW_WINDOW`` queries and pooled images (``attention(last_queries=...)``), every pattern reduced
as the one forward pass runs. The whole prompt's lens is ``mi_lenses.logit_lens(model, prompt)``.

Example:
    >>> rep = mi_lenses.report(model, "The capital of France is", progress=False)
    >>> rep.sections
    ['logit_lens', 'patchscope', 'dla', 'attention']
    >>> rep.prediction == rep.logit_lens.top_tokens[-1][0][-1][0]      # the model's own next token
    True
    >>> frame = rep.to_dataframe()         # one row per residual state, embed .. final
    >>> list(frame.columns[:4])
    ['layer', 'top1', 'top1_prob', 'rank_prediction']
    >>> '<nav class="toc">' in rep.to_html(tmp / "report.html")
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.attn import AttentionResult, attention
from mi_lenses.attn.engine import attention_reductions
from mi_lenses.attn.engine import required_hooks as attention_hooks
from mi_lenses.attribution import DLAResult, direct_logit_attribution
from mi_lenses.attribution.components import required_hooks as dla_hooks
from mi_lenses.attribution.sources import pattern_rows_kept
from mi_lenses.errors import LensInputError
from mi_lenses.graphs import AttributionGraph, attribution_graph
from mi_lenses.lenses.affine import load_lens
from mi_lenses.lenses.lens import Lens
from mi_lenses.lenses.logit_lens import logit_lens
from mi_lenses.lenses.result import LensResult
from mi_lenses.models.batch import Batch, PromptInput, Reduction
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching import PatchingResult, activation_patching
from mi_lenses.patchscopes import SweepResult, presets, sweep
from mi_lenses.progress import bar
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.attention import HEAD_VIEW_WINDOW
from mi_lenses.viz.lens import best_tokens
from mi_lenses.viz.report import report_fragment, report_table

Section = Literal["logit_lens", "tuned_lens", "patchscope", "dla", "attention", "patching", "graph"]
GRAPH_NODES = 512  # the graph section's node budget (features expanded)
TRAJECTORY_TOKENS = 6  # tokens in the "top tokens per layer" chart
# Beyond this many tokens the lenses cover the last LONG_PROMPT positions (a grid the page can still show; the lens
# costs ~1 forward pass per 4k positions on SmolLM2), and the attention section keeps the pattern rows of the last
# HEAD_VIEW_WINDOW queries (what the head and neuron views show) and each head's pooled image, reduced as the forward
# pass runs, instead of every layer's [heads, pos, pos] pattern (64 GiB at 8k tokens on SmolLM2).
LONG_PROMPT = 512


@dataclass
class Report(Result):
    """Everything :func:`report` computed for one prompt. Each part is ``None`` when its section was skipped.

    ``logit_lens``/``tuned_lens``: every layer x position (the last ``LONG_PROMPT`` positions of a longer prompt;
    ``targets``: the model's prediction, the attributed answer, and the wrong token when given); ``trajectory``: the
    last position with exact probabilities of the tokens some layer believed most (``targets``); ``patchscope``: the
    identity Patchscope at ``l* = l`` over the last positions, with ``lens_precision`` (logit lens, ``resid_post``)
    and ``tuned_precision`` per layer on the same positions (a hit: top-1 equals the model's own next-token
    prediction); ``dla``: the attribution of ``answer`` (minus ``wrong``) at the last position; ``attention``: every
    head (on a long prompt, the pattern rows of its last queries: see the module docstring); ``patching`` (with a
    corrupted prompt): the exact ``resid_pre`` grid, and ``patching_heads`` the attribution of every head (normalised
    logit difference of ``answer`` and ``wrong``); ``graph`` (with transcoders): the prompt's attribution graph.
    """

    model_name: str
    prompt: str
    str_tokens: list[str]
    prediction: str
    prediction_prob: float
    answer: str
    wrong: str | None
    sections: list[str]
    prediction_id: int = -1
    answer_id: int = -1
    wrong_id: int | None = None
    logit_lens: LensResult | None = field(default=None, repr=False)
    tuned_lens: LensResult | None = field(default=None, repr=False)
    trajectory: LensResult | None = field(default=None, repr=False)
    tuned_trajectory: LensResult | None = field(default=None, repr=False)
    patchscope: SweepResult | None = field(default=None, repr=False)
    lens_precision: Float[Tensor, " L"] | None = None
    tuned_precision: Float[Tensor, " L"] | None = None
    dla: DLAResult | None = field(default=None, repr=False)
    attention: AttentionResult | None = field(default=None, repr=False)
    patching: PatchingResult | None = field(default=None, repr=False)
    patching_heads: PatchingResult | None = field(default=None, repr=False)
    graph: AttributionGraph | None = field(default=None, repr=False)
    corrupted: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    view_options: ClassVar[dict[str, Any]] = {"max_layers": 16}  # see mi_lenses.results

    @property
    def title(self) -> str:
        return f"Report: {self.model_name}"

    @property
    def top_head(self) -> tuple[int, int] | None:
        """The head with the largest direct effect on the answer, ``(layer, head)`` (None without DLA)."""
        if self.dla is None:
            return None
        label = self.dla.top(1, kinds="head", batch=0)[0][0]
        layer, head = label[1:].split("H")
        return int(layer), int(head)

    def target_index(self, which: Literal["prediction", "answer", "wrong"]) -> int:
        """The lenses' target column of the model's prediction, the answer or the wrong token."""
        token = {"prediction": self.prediction_id, "answer": self.answer_id, "wrong": self.wrong_id}[which]
        if token is None or self.logit_lens is None:
            raise LensInputError(f"this report tracks no {which} token.")
        return self.logit_lens.target_ids.tolist().index(token)

    # ------------------------------------------------------------------------------------ per-layer summary
    def per_layer(self) -> list[dict[str, Any]]:
        """One record per residual state (the logit lens's rows, ``embed`` .. ``final``) at the last position: its
        top-1 token and probability, the ranks of the prediction and the answer, KL to the final distribution and
        entropy (bits), the tuned lens's, and the identity Patchscope's and the logit lens's precision@1 for the
        same state (row ``r`` is the output of block ``r - 1``)."""
        ll = self.logit_lens
        if ll is None:
            return []
        last = ll.columns(0)[-1]
        answer = self.target_index("answer")
        out = []
        for r, label in enumerate(ll.labels):
            rec: dict[str, Any] = {
                "layer": label,
                "top1": ll.top_tokens[r][0][last][0],
                "top1_prob": float(ll.top_probs[r, 0, last, 0]),
                "rank_prediction": int(ll.final_top1_rank[r, 0, last]),
                "rank_answer": int(ll.target_ranks[r, 0, last, answer]),
                "kl_bits": float(ll.kl_bits[r, 0, last]),
                "entropy_bits": float(ll.entropy_bits[r, 0, last]),
            }
            if self.tuned_lens is not None:
                tl = self.tuned_lens
                rec.update(tuned_top1=tl.top_tokens[r][0][last][0], tuned_top1_prob=float(tl.top_probs[r, 0, last, 0]),
                           tuned_kl_bits=float(tl.kl_bits[r, 0, last]),
                           tuned_entropy_bits=float(tl.entropy_bits[r, 0, last]))
            if self.patchscope is not None:
                block = r - 1
                ok = 0 <= block < len(self.patchscope.source_layers)
                rec["patchscope_prec_at_1"] = float(self.patchscope.per_layer()[block]) if ok else math.nan
                rec["lens_prec_at_1"] = float(self.lens_precision[block]) if ok else math.nan
                if self.tuned_precision is not None:
                    rec["tuned_prec_at_1"] = float(self.tuned_precision[block]) if ok else math.nan
            out.append(rec)
        return out

    # ------------------------------------------------------------------------------------ protocol
    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """JSON-ready: the prompt, the prediction, ``per_layer`` records, timings and each section's own
        ``to_dict()``."""
        self.check_batch(batch)
        parts = {name: getattr(self, name) for name in SECTIONS}
        return jsonable({
            "model": self.model_name,
            "prompt": self.prompt,
            "tokens": self.str_tokens,
            "prediction": self.prediction,
            "prediction_prob": self.prediction_prob,
            "answer": self.answer,
            "wrong": self.wrong,
            "sections": self.sections,
            "seconds": self.seconds,
            "per_layer": self.per_layer(),
            **{name: part.to_dict() for name, part in parts.items() if part is not None},
            **({"patching_heads": self.patching_heads.to_dict()} if self.patching_heads is not None else {}),
        })

    def to_dataframe(self):
        """:meth:`per_layer` as a tidy frame (one row per residual state)."""
        return dataframe(self.per_layer())

    def table(self, *, batch: int = 0, max_layers: int = 16):
        """The terminal summary: the logit lens table, a per-layer table (strided to ``max_layers`` rows, the
        final row always), the largest DLA parts and the top heads of every attention diagnostic."""
        self.check_batch(batch)
        return report_table(self, max_layers=max_layers)

    def fragment(self, *, batch: int = 0) -> str:
        """The page body: a table of contents and one section per part."""
        self.check_batch(batch)
        return report_fragment(self)

    def _summary(self) -> str:
        prompt = self.prompt if len(self.prompt) <= 60 else "…" + self.prompt[-59:]
        return (f"on {self.model_name!r}: {prompt!r} ({plural(len(self.str_tokens), 'token')}) -> "
                f"{self.prediction!r} (p {self.prediction_prob:.3f}), sections {self.sections}, "
                f"{self.seconds.get('total', float('nan')):.1f} s")


def report(
    model: Any,
    prompt: PromptInput,
    *,
    lens: Any = None,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    sections: Sequence[Section] | None = None,
    top_k: int = 5,
    patchscope_positions: int = 8,
    induction_length: int | None = None,
    corrupted: PromptInput | None = None,
    transcoders: Any = None,
    prepend_bos: bool | None = None,
    beyond_context: bool = False,
    progress: bool = True,
) -> Report:
    """Everything about one prompt (see the module docstring): logit lens, tuned lens (with ``lens``), identity
    Patchscope vs logit lens, direct logit attribution and attention.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``.
        prompt: one prompt (text, or token ids ``[1, pos]``).
        lens: a tuned lens (``TunedLens`` or a folder in either format) shown beside the logit lens.
        answer: the token attributed by DLA and tracked by the lenses (exactly one token; default: the model's own
            next-token prediction).
        wrong: a token subtracted from the answer in DLA (``logit[answer] - logit[wrong]``), also tracked.
        sections: any of ``"logit_lens"``, ``"tuned_lens"``, ``"patchscope"``, ``"dla"``, ``"attention"``,
            ``"patching"``, ``"graph"`` (default: all, ``"tuned_lens"`` only with ``lens``, ``"patching"`` with
            ``corrupted``, ``"graph"`` with ``transcoders``). Skip the Patchscope to save most of the time.
        top_k: tokens kept per layer and position by the lenses.
        patchscope_positions: the identity Patchscope runs at the prompt's last N positions (each one patched into
            every layer).
        induction_length: length of the random sequence of the attention's induction diagnostic (``0``: skip).
        corrupted: a corrupted prompt of the same length: adds the ``patching`` section (exact ``resid_pre``
            patching, layer x position, and attribution patching of every head, of ``answer`` against ``wrong``).
        prepend_bos: override the model's BOS default when tokenising.
        beyond_context: accept a prompt longer than the model's context (``cfg.n_ctx``).
        progress: a progress bar on stderr while it computes (it appears after a couple of seconds).

    Returns:
        :class:`Report` (``show()``, ``to_html(path)``, ``print()``, ``to_json()``, ``to_dataframe()``).
    """
    t_start = time.perf_counter()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    chosen = [SECTION_TABLE[name] for name in _sections(sections, lens, corrupted, transcoders)]
    for name, v in (("top_k", top_k), ("patchscope_positions", patchscope_positions)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LensInputError(f"{name} must be a positive int, got {v!r}.")
    if lens is not None and not isinstance(lens, Lens):
        lens = load_lens(lens, view.model)
    batch = view.batch(prompt, prepend_bos=prepend_bos, beyond_context=beyond_context)
    if batch.shape[0] != 1:
        raise LensInputError(f"a report is about one prompt; got {batch.shape[0]}. Run it once per prompt.")
    wrong_id = None if wrong is None else view.to_single_token(wrong)
    answer_id = None if answer is None else view.to_single_token(answer)
    if wrong_id is not None and wrong_id == answer_id:
        raise LensInputError(f"answer and wrong are the same token ({view.id_to_str(answer_id)!r}): logit[answer] - "
                             "logit[wrong] is 0 whatever the model does. Pass another wrong token, or leave it out.")
    if corrupted is not None:
        _check_corrupted(view, batch, corrupted, prepend_bos, beyond_context)
    seconds: dict[str, float] = {}
    with bar(len(chosen) + 1, "report", enabled=progress) as b:
        # one forward pass for every section
        names = {row.hook_name for point in ("resid_pre", "resid_post") for row in view.residual_rows(point)}
        reduce: list = []  # what a section keeps of a [batch, heads, pos, pos] hook as it passes
        for section in chosen:
            names |= set(section.hooks(view, batch))
            reduce += section.reduce(view, batch)
        t0 = time.perf_counter()
        logits, cache = view.run_with_cache(batch, names, progress=progress, reduce=reduce, fused=True)
        last_logp = logits[0, -1].float().log_softmax(-1)
        pred_id = int(last_logp.argmax())
        answer_id = pred_id if answer_id is None else answer_id
        # ranks tracked by the lenses: the prediction, the answer, the wrong token (each once)
        targets = list(dict.fromkeys([pred_id, answer_id] + ([wrong_id] if wrong_id is not None else [])))
        ctx = _Context(view, batch.tokens, batch.lengths[0], cache, logits, lens, answer_id, wrong_id, targets, top_k,
                       patchscope_positions, induction_length, prepend_bos, [s.name for s in chosen],
                       corrupted=corrupted, long=_long(batch), transcoders=transcoders)
        seconds["forward pass"] = time.perf_counter() - t0
        b.update(1)
        for section in chosen:
            b.set_postfix_str(section.name.replace("_", " "))
            t = time.perf_counter()
            ctx.parts.update(section.compute(ctx))
            seconds[section.name] = time.perf_counter() - t
            b.update(1)
    seconds["total"] = time.perf_counter() - t_start
    text = view.str_tokens(batch)[0]
    return recorded(Report(
        model_name=view.name,
        prompt=prompt if isinstance(prompt, str) else "".join(text),
        str_tokens=text,
        prediction=view.id_to_str(pred_id),
        prediction_prob=float(last_logp[pred_id].exp()),
        answer=view.id_to_str(answer_id),
        wrong=None if wrong_id is None else view.id_to_str(wrong_id),
        sections=ctx.sections,
        corrupted=None if corrupted is None else (corrupted if isinstance(corrupted, str) else
                                                  "".join(view.str_tokens(view.batch(corrupted))[0])),
        prediction_id=pred_id,
        answer_id=answer_id,
        wrong_id=wrong_id,
        seconds=seconds,
        **ctx.parts,
    ), hooks)


# ------------------------------------------------------------------------------------------------ the sections
@dataclass
class _Context:
    """What every section reads: the prompt's one forward pass and the report's options; ``parts`` collects the
    Report fields the sections computed so far (in table order)."""

    view: ModelView
    tokens: Tensor
    n_tokens: int
    cache: Any
    logits: Tensor
    lens: Any
    answer_id: int
    wrong_id: int | None
    targets: list[int]
    top_k: int
    patchscope_positions: int
    induction_length: int | None
    prepend_bos: bool | None
    sections: list[str]
    parts: dict[str, Any] = field(default_factory=dict)
    corrupted: Any = None
    long: bool = False  # a long prompt: the lenses' last positions, the attention's last queries (see LONG_PROMPT)
    transcoders: Any = None

    @property
    def positions(self) -> list[int] | None:
        """The lenses' positions: all, or the last ``LONG_PROMPT`` of a long prompt."""
        return list(range(-LONG_PROMPT, 0)) if self.long else None

    @property
    def run(self) -> dict[str, Any]:
        """The shared cache, as every entry point takes it (no forward pass of their own, no bar of their own)."""
        return dict(cache=self.cache, logits=self.logits, progress=False)


@dataclass(frozen=True)
class _Section:
    """One section of the report: the hooks it adds to the shared forward pass (cached whole, or ``reduce``d as they
    pass: see :func:`~mi_lenses.models.batch.run_with_cache`), and what it computes from it (the ``Report`` fields
    it fills)."""

    name: str
    hooks: Callable[[ModelView, Batch], Iterable[str]]
    compute: Callable[[_Context], dict[str, Any]]
    reduce: Callable[[ModelView, Batch], list[tuple[str, Reduction]]] = lambda view, batch: []


def _logit_lens(c: _Context) -> dict[str, Any]:
    ll = logit_lens(c.view, c.tokens, top_k=c.top_k, targets=c.targets, positions=c.positions, **c.run)
    return {"logit_lens": ll, "trajectory": _trajectory(c, ll, None)}


def _tuned_lens(c: _Context) -> dict[str, Any]:
    out = {"tuned_lens": c.lens(c.view, c.tokens, top_k=c.top_k, targets=c.targets, positions=c.positions, **c.run)}
    if "trajectory" in c.parts:  # the same tokens as the logit lens's trajectory
        out["tuned_trajectory"] = _trajectory(c, c.parts["logit_lens"], c.lens,
                                              ids=c.parts["trajectory"].target_ids.tolist())
    return out


def _patchscope(c: _Context) -> dict[str, Any]:
    """The identity Patchscope at ``l* = l`` over the last positions, and the logit lens's (and tuned lens's)
    precision@1 per block output on the same positions."""
    positions = list(range(-min(c.patchscope_positions, c.n_tokens), 0))
    sw = sweep(c.view, c.tokens, presets.identity(), target_layers="same", positions=positions, progress=False,
               cache=c.cache, logits=c.logits)

    def precision(runner: Any) -> Tensor:
        res = runner(c.view, c.tokens, positions=positions, point="resid_post", top_k=1, **c.run)
        hits = (res.top_ids[:, 0, :, 0] == res.final_top1[0][None]).float()  # [L + 1 rows, P]
        return hits.mean(-1)[1:]  # row l + 1 is the output of block l

    tuned = c.lens if "tuned_lens" in c.sections else None
    return {"patchscope": sw, "lens_precision": precision(logit_lens),
            "tuned_precision": None if tuned is None else precision(tuned)}


def _dla(c: _Context) -> dict[str, Any]:
    return {"dla": direct_logit_attribution(c.view, c.tokens, answer=c.answer_id, wrong=c.wrong_id, **c.run)}


def _attention(c: _Context) -> dict[str, Any]:
    return {"attention": attention(c.view, c.tokens, cache=c.cache, induction_length=c.induction_length,
                                   last_queries=HEAD_VIEW_WINDOW if c.long else None,
                                   prepend_bos=c.prepend_bos, progress=False)}


def _patching(c: _Context) -> dict[str, Any]:
    """Exact patching of the residual stream (layer x position) and attribution patching of every head."""
    kw = dict(answer=c.answer_id, wrong=c.wrong_id, prepend_bos=c.prepend_bos, progress=False)
    return {"patching": activation_patching(c.view, c.tokens, c.corrupted, what="resid_pre", **kw),
            "patching_heads": activation_patching(c.view, c.tokens, c.corrupted, what="head_out",
                                                  method="attribution", **kw)}


def _graph(c: _Context) -> dict[str, Any]:
    """The prompt's attribution graph through the transcoders (verified), with ``GRAPH_NODES`` feature nodes."""
    return {"graph": attribution_graph(c.view, c.tokens, c.transcoders, max_feature_nodes=GRAPH_NODES,
                                       prepend_bos=c.prepend_bos, progress=False)}


def _long(batch: Batch) -> bool:
    return batch.shape[1] > LONG_PROMPT


def _is_pattern(name: str) -> bool:
    return name.endswith(("hook_pattern", "hook_attn_scores"))


def _dla_hooks(view: ModelView, batch: Batch) -> list[str]:
    return [name for name in dla_hooks(view) if not _is_pattern(name)]


def _dla_reduce(view: ModelView, batch: Batch) -> list[tuple[str, Reduction]]:
    """DLA reads each pattern at the last position only."""
    return pattern_rows_kept(view, torch.tensor([batch.shape[1] - 1]))


def _attention_hooks(view: ModelView, batch: Batch) -> list[str]:
    return [name for name in attention_hooks(view) if not (_long(batch) and _is_pattern(name))]


def _attention_reduce(view: ModelView, batch: Batch) -> list[tuple[str, Reduction]]:
    return attention_reductions(view, batch, list(range(view.n_layers)), HEAD_VIEW_WINDOW) if _long(batch) else []


SECTION_TABLE: dict[str, _Section] = {s.name: s for s in (
    _Section("logit_lens", lambda view, batch: (), _logit_lens),
    _Section("tuned_lens", lambda view, batch: (), _tuned_lens),
    _Section("patchscope", lambda view, batch: (), _patchscope),
    _Section("dla", _dla_hooks, _dla, _dla_reduce),
    _Section("attention", _attention_hooks, _attention, _attention_reduce),
    _Section("patching", lambda view, batch: (), _patching),
    _Section("graph", lambda view, batch: (), _graph),
)}
SECTIONS: tuple[str, ...] = tuple(SECTION_TABLE)  # in page order


# ------------------------------------------------------------------------------------------------ helpers
def _check_corrupted(view: ModelView, batch: Any, corrupted: PromptInput, prepend_bos: bool | None,
                     beyond_context: bool) -> None:
    """Before any section runs: the corrupted prompt is one prompt of the prompt's token length (the report patches
    position by position and takes no position map)."""
    other = view.batch(corrupted, prepend_bos=prepend_bos, beyond_context=beyond_context)
    if other.shape[0] != 1 or other.lengths[0] != batch.lengths[0]:
        got = f"{other.lengths[0]} tokens" if other.shape[0] == 1 else f"{other.shape[0]} prompts"
        raise LensInputError(
            f"the corrupted prompt must be one prompt of the prompt's length, {batch.lengths[0]} tokens; it has {got}. "
            "Change a word for a word of the same token length, or patch prompts of different lengths with "
            "activation_patching(..., position_map=...) / mi-lenses patch --position-map C:K,...")


def _sections(sections: Sequence[str] | None, lens: Any, corrupted: Any = None, transcoders: Any = None
              ) -> list[str]:
    needs = {"tuned_lens": lens, "patching": corrupted, "graph": transcoders}
    if sections is None:
        return [s for s in SECTIONS if s not in needs or needs[s] is not None]
    if isinstance(sections, str):
        sections = [sections]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise LensInputError(f"unknown report section(s) {unknown}; use some of {list(SECTIONS)}.")
    if not sections:
        raise LensInputError(f"no section chosen: pick some of {list(SECTIONS)} (or None for all).")
    if "tuned_lens" in sections and lens is None:
        raise LensInputError("the tuned_lens section needs a lens: pass lens=FOLDER (or --lens DIR).")
    if "patching" in sections and corrupted is None:
        raise LensInputError("the patching section needs a corrupted prompt: pass corrupted=PROMPT (or "
                             "--corrupted TEXT), as long as the prompt.")
    if "graph" in sections and transcoders is None:
        raise LensInputError("the graph section needs transcoders: pass transcoders=FOLDER (or --transcoders DIR; "
                             "mi_lenses.load_dictionary() gives the embedded model's).")
    return [s for s in SECTIONS if s in sections]


def _trajectory(c: _Context, ll: LensResult, lens: Any, ids: list[int] | None = None) -> LensResult:
    """The last position's exact probability per layer of the tokens some layer believed most (the answer too)."""
    if ids is None:
        last = ll.columns(0)[-1]
        ids = list(dict.fromkeys(best_tokens(ll, 0, last, TRAJECTORY_TOKENS) + [c.answer_id]))
    runner = lens if lens is not None else logit_lens
    return runner(c.view, c.tokens, positions=[-1], top_k=1, targets=ids, **c.run)
