"""The options of reading and evaluating dictionaries over a corpus, written once: :class:`FeatureContextsOptions`
(:func:`~mi_lenses.features.contexts.feature_contexts`) and :class:`DictionaryEvaluationOptions`
(:func:`~mi_lenses.features.evaluate.evaluate_dictionary`). :func:`~mi_lenses.options.with_options` gives each entry
point one explicit keyword-only parameter per field (``help()`` and ``inspect.signature`` show them with their types
and defaults, the docstring lists them), and ``mi-lenses feature-contexts`` / ``mi-lenses evaluate-dictionary``
derive their flags, types and defaults from the same fields (``metadata["cli"]``, see
:func:`~mi_lenses.commands.add_dataclass_options`). Training keeps its own record,
:class:`~mi_lenses.features.train.DictionaryTrainConfig`.

Example:
    >>> opts = FeatureContextsOptions(features=[3, "L1F7"], top_k=4)
    >>> opts.validate().top_k, opts.replace(top_k=2).top_k, opts.context
    (4, 2, 8)
    >>> import inspect; inspect.signature(mi_lenses.feature_contexts).parameters["top_k"].default
    20
    >>> FeatureContextsOptions(context=-1).validate(flags=True)
    Traceback (most recent call last):
    ...
    mi_lenses.errors.LensInputError: --context must be an int >= 0, got -1.
    >>> feature_spec("12"), feature_spec("L1F7")          # what --features reads: an index, or a label
    (12, 'L1F7')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.compare import DEFAULT_MAX_TOKENS
from mi_lenses.options import Options, option

NO_PROGRESS = {"flag": "--no-progress", "action": "store_false", "help": "no progress bar"}


def feature_spec(text: str) -> int | str:
    """One ``--features`` item: an index over the whole dictionary (``12``, ``-1``) or a label (``L1F7``)."""
    try:
        return int(text)
    except ValueError:
        return text


def _spelled(record: Options, name: str, flags: bool) -> str:
    """A field's name as an error names it: the Python keyword, or with ``flags`` its ``--flag``."""
    if not flags:
        return name
    cli = next(f for f in dataclasses.fields(record) if f.name == name).metadata.get("cli") or {}
    return cli.get("flag", "--" + name.replace("_", "-"))


def _check_counts(record: Options, least: dict[str, int], flags: bool, message: str) -> None:
    """Each field named in ``least`` is an int (not a bool) at least its bound, else ``message`` (formatted with
    ``name``, ``least`` and ``value``) as a ``LensInputError``."""
    for name, bound in least.items():
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < bound:
            raise LensInputError(message.format(name=_spelled(record, name, flags), least=bound, value=value))


@dataclass(frozen=True)
class FeatureContextsOptions(Options):
    """Every option of :func:`~mi_lenses.features.contexts.feature_contexts` (the model, the dictionary and the data
    are its own arguments); frozen, so one record serves many calls (``opts.replace(top_k=5)``)."""

    features: Sequence[int | str] | None = option(
        None, "the features to collect (indices over the whole dictionary, or labels: F7, or L1F7 in a set); None: "
              "every feature", cli={"nargs": "+", "type": feature_spec, "metavar": "N"})
    top_k: int = option(20, "contexts kept per feature", cli={"type": int})
    context: int = option(8, "tokens shown on each side of the most active token (within its sequence)",
                          cli={"type": int})
    max_tokens: int | None = option(65536, "read at most this many tokens of data (None: all; a list of texts is "
                                           "read whole)", cli={"type": int})
    seq_len: int = option(128, "tokens per sequence (text data)", cli={"type": int})
    batch_size: int = option(8, "sequences per forward pass", cli={"type": int})
    exclude_first: int | None = option(None, "leave the first N positions of every sequence out (None: as the "
                                             "dictionary was trained, 0 if it does not say)", cli={"type": int})
    lens: Any = option(None, "read the feature logit lens through this lens (a TunedLens or another affine lens, or "
                             "its folder) instead of the logit lens", cli={"metavar": "DIR"})
    progress: bool = option(True, "show a progress bar", cli=NO_PROGRESS)

    def validate(self, *, flags: bool = False) -> FeatureContextsOptions:
        """Check the counts (the features are checked against the dictionary, the data against the model); errors
        name the option, or its ``--flag`` with ``flags=True``."""
        _check_counts(self, {"top_k": 1, "context": 0, "batch_size": 1}, flags,
                      "{name} must be an int >= {least}, got {value!r}.")
        return self


@dataclass(frozen=True)
class DictionaryEvaluationOptions(Options):
    """Every option of :func:`~mi_lenses.features.evaluate.evaluate_dictionary` (the model, the dictionary and the
    data are its own arguments); frozen, so one record serves many calls."""

    max_tokens: int | None = option(DEFAULT_MAX_TOKENS, "evaluate on at most this many tokens of data (None: all)",
                                    cli={"type": int})
    seq_len: int = option(128, "tokens per sequence (text data)", cli={"type": int})
    batch_size: int = option(4, "sequences per forward pass", cli={"type": int})
    exclude_first: int | None = option(None, "leave the first N positions of every sequence out of the metrics and "
                                             "splice nothing there (None: as the dictionary was trained, 0 if it does "
                                             "not say)", cli={"type": int})
    progress: bool = option(True, "show a progress bar", cli=NO_PROGRESS)

    def validate(self, *, flags: bool = False) -> DictionaryEvaluationOptions:
        """Check the batch size (the data is checked against the model); errors name the option, or its ``--flag``
        with ``flags=True``."""
        _check_counts(self, {"batch_size": 1}, flags, "{name} must be a positive int, got {value!r}.")
        return self


__all__ = ["DictionaryEvaluationOptions", "FeatureContextsOptions", "feature_spec"]
