"""The patching options, written once: one record per entry point (:class:`ActivationOptions`, :class:`EdgeOptions`,
:class:`PathOptions`), each extending :class:`PairOptions` (the runs and the metric every experiment shares).
:func:`~mi_lenses.options.with_options` gives an entry point one explicit keyword-only parameter per field (``help()`` and
``inspect.signature`` show them with their types and defaults, the docstring lists them), and ``mi-lenses patch``
derives its flags, choices and defaults from the same fields (``metadata["cli"]``, see
:func:`~mi_lenses.commands.add_dataclass_options`).

Example:
    >>> opts = ActivationOptions(answer=" Paris", method="eap_ig")
    >>> opts.validate().integration_steps(), opts.replace(method="exact").integration_steps()
    (16, None)
    >>> import inspect; list(inspect.signature(mi_lenses.path_patching).parameters)[:5]
    ['model', 'clean', 'corrupted', 'answer', 'wrong']
    >>> ActivationOptions(mode="both").validate()
    Traceback (most recent call last):
    ...
    mi_lenses.errors.LensInputError: mode must be 'denoise' ... or 'noise' ..., got 'both'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

from mi_lenses.attribution.directions import TokenSpec
from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec
from mi_lenses.options import Options, option
from mi_lenses.patching.metric import MetricFn
from mi_lenses.patching.pair import MODES, Mode, PositionMap
from mi_lenses.patching.sites import BYS, WHATS, By, What

Method = Literal["exact", "attribution", "eap_ig", "ig"]
EdgeMethod = Literal["attribution", "eap_ig"]
Freeze = Literal["heads", "heads_and_mlps"]
Head = tuple[int, int]
Receiver = tuple[int, int, str]
DEFAULT_IG_STEPS = 16

# the Args lines every entry point shares, before its options (RECORD: the name of its options record)
PAIR_ARGS = """\
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), hooked as you like: your
            hooks stay active in every forward pass (and are listed in the result's ``active_hooks``).
        clean: a prompt, a list of prompts (pairs with ``corrupted``; one length per side) or token ids ``[B, S]``.
        corrupted: as many prompts as ``clean``, each as long as the clean ones (``activation_patching`` aligns
            other lengths with ``position_map``).
        options: a :class:`~mi_lenses.patching.options.RECORD` record; the keywords below override its fields."""


@dataclass(frozen=True)
class PairOptions(Options):
    """The runs and the metric of a patching experiment (every entry point takes these)."""

    answer: TokenSpec | None = option(
        None, "the default metric's answer token: the normalised logit[answer] - logit[wrong] at the last position "
              "(one token, or one per prompt pair; mind the leading space)", cli={"required": True})
    wrong: TokenSpec | None = option(None, "the default metric's wrong token (without it: the normalised "
                                         "logit[answer])", cli={})
    metric: MetricFn | None = option(None, "instead of answer/wrong: any metric(logits [B, S, vocab]) -> scalar (raw "
                                         "values, as TransformerLens's patching_metric)")
    mode: Mode = option("denoise", "'denoise' (clean activations into the corrupted run) or 'noise' (corrupted into "
                                 "clean)", cli={"choices": list(MODES)})
    prepend_bos: bool | None = option(None, "override the model's BOS default when tokenising text")
    beyond_context: bool = option(False, "accept prompts longer than the model's context (cfg.n_ctx)")

    def validate(self) -> Any:
        """Check what needs no model (the prompts, tokens and grid are checked against it later)."""
        if self.mode not in MODES:
            raise LensInputError(f"mode must be 'denoise' (clean into corrupted) or 'noise' (corrupted into clean), "
                                 f"got {self.mode!r}.")
        return self

    @classmethod
    def docs(cls) -> str:
        """The Args section of the entry points: the model, the prompts, ``options``, then one line per option
        (name, default, help)."""
        return PAIR_ARGS.replace("RECORD", cls.__name__) + "\n" + "\n".join(
            f"        {f.name} (default ``{f.default!r}``): {f.metadata['help']}." for f in dataclasses.fields(cls))


class _Gradients:
    """``method`` and ``ig_steps`` of an entry point that estimates from gradients."""

    method: str
    ig_steps: int | None

    def integration_steps(self) -> int | None:
        """The number of integration points of ``eap_ig`` and ``ig`` (None for the other methods)."""
        return (self.ig_steps or DEFAULT_IG_STEPS) if self.method in ("eap_ig", "ig") else None

    def _check_method(self, methods: tuple[str, ...]) -> None:
        if self.method not in methods:
            raise LensInputError(f"method must be one of {list(methods)}, got {self.method!r}.")
        steps = self.ig_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise LensInputError(f"ig_steps must be a positive int, got {steps!r}.")
        if steps is not None and self.method not in ("eap_ig", "ig"):
            raise LensInputError("ig_steps= goes with method='eap_ig' or 'ig'.")


@dataclass(frozen=True)
class ActivationOptions(_Gradients, PairOptions):
    """The options of :func:`~mi_lenses.patching.activation.activation_patching`."""

    what: What = option("resid_pre", "the activation patched (see mi_lenses.patching.sites)", cli={"choices": WHATS})
    by: By | None = option(None, "the grid after the layer (default per what: layer_pos, layer_head for heads, "
                               "layer_neuron for neurons)", cli={"choices": BYS})
    method: Method = option("exact", "'exact' (forward passes, TransformerLens's numbers), 'attribution' (one forward "
                                   "and one backward pass), 'eap_ig' (integrated gradients along the input path) or "
                                   "'ig' (integrated gradients at the patched site: each layer's activation "
                                   "interpolated between the runs, Marks et al. 2024)",
                          cli={"choices": list(get_args(Method))})
    ig_steps: int | None = option(None, f"the points of method='eap_ig' or 'ig' (default {DEFAULT_IG_STEPS})",
                                  cli={"type": int})
    dictionary: Any = option(None, "with what='features': the dictionary (an SAE or a transcoder, or its folder) whose "
                                   "features are patched, or a DictionarySet with one dictionary per block (per-layer "
                                   "transcoders): every block's features, the grid's layers those blocks (each "
                                   "layer's slice equal to patching its dictionary alone; cross-layer transcoders and "
                                   "two dictionaries in one block are refused)", cli={"metavar": "FOLDER"})
    layers: IndexSpec = option(None, "the layers of the grid (default all; features: the dictionary's block, or the "
                                     "set's blocks to patch)")
    position_map: PositionMap | None = option(
        None, "{clean position: corrupted position} for prompts of different lengths (the grid runs over the mapped "
              "pairs; on the command line C:K,... e.g. '0:0,5:6,-1:-1', the last positions at least)",
        cli={"metavar": "C:K,..."})
    max_batch: int | None = option(None, "rows (cells x prompt pairs) per forward pass of the exact engine (default: "
                                       "8192 tokens' worth)", cli={"type": int})
    progress: bool = option(True, "a progress bar over the exact engine's cells (the flag --no-progress turns it off)",
                          cli={"flag": "--no-progress", "action": "store_false"})

    def validate(self) -> "ActivationOptions":
        super().validate()
        self._check_method(get_args(Method))
        return self


@dataclass(frozen=True)
class EdgeOptions(_Gradients, PairOptions):
    """The options of :func:`~mi_lenses.patching.edges.edge_attribution`."""

    method: EdgeMethod = option("attribution", "'attribution' (EAP: the gradient at the base run) or 'eap_ig' "
                                             "(integrated along the input path)")
    ig_steps: int | None = option(None, f"the points of method='eap_ig' (default {DEFAULT_IG_STEPS})")

    def validate(self) -> "EdgeOptions":
        super().validate()
        self._check_method(get_args(EdgeMethod))
        return self


@dataclass(frozen=True)
class PathOptions(PairOptions):
    """The options of :func:`~mi_lenses.patching.paths.path_patching`."""

    senders: Sequence[Head] | None = option(None, "[(layer, head), ...] patched together; None: every head, one at a "
                                                "time")
    receivers: Literal["logits", "q", "k", "v"] | Sequence[Receiver] = option(
        "logits", "'logits'; [(layer, head, 'q'|'k'|'v'), ...] patched together; or 'q'/'k'/'v': every head after "
                  "the senders, one at a time")
    freeze: Freeze = option("heads", "'heads' (every other head frozen at its base value, the paper) or "
                                   "'heads_and_mlps' (the MLPs too: the direct path)")
    max_batch: int | None = option(None, "paths per forward pass (default: 8192 tokens' worth)")
    progress: bool = option(True, "a progress bar over the paths")

    def validate(self) -> "PathOptions":
        super().validate()
        if self.freeze not in get_args(Freeze):
            raise LensInputError(f"freeze must be 'heads' or 'heads_and_mlps', got {self.freeze!r}.")
        return self
