"""The Patchscope configuration (Ghandeharioun et al. 2024): ``(S, i, M, l) -> (T, i*, f, M*, l*)``.

A :class:`Source` names the source prompt ``S``, position ``i``, model ``M`` and layer ``l``; a :class:`Target` names
the target prompt ``T``, position ``i*``, the map ``f``, model ``M*`` and layer ``l*``. Everything is checked up
front by :func:`resolve` (positions, placeholder, layers, ``d_model`` vs the map), before any forward pass.

**Layer convention.** Layer ``l`` means the *output* of block ``l`` (``blocks.{l}.hook_resid_post``, ``0..L-1``,
negative from the end), as in the paper. This is logit-lens row ``l + 1`` (``point="resid_pre"`` rows, tuned-lens
indexing) and the row labelled ``"{l}_post"`` (``"final"`` for ``l = L-1``) of ``logit_lens(..., point="resid_post")``.

**Placeholder convention.** Unless ``Target.positions`` is given, ``i*`` is the position of the token that *ends* the
last occurrence of ``Target.placeholder`` in the target prompt (``occurrence="all"``: every occurrence, all patched
with the same vector, as SelfIE does). The placeholder must end on a token boundary (a merge with the text after it is
an error). The readout is always the target's **last** position: the next-token distribution after the whole prompt.

Example:
    >>> src = Source("The capital of France is", layers=1)          # i = -1 (last token), M = the run's model
    >>> tgt = Target("cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?", placeholder="?")   # l* = l, f = identity
    >>> rt = resolve_target(tgt, ModelView(model))
    >>> rt.positions == (rt.tokens.shape[1] - 1,)                    # the final "?" is patched
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import resolve_index
from mi_lenses.models.batch import check_context
from mi_lenses.models.view import ModelView

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
POINT = "resid_post"


@dataclass(frozen=True)
class Source:
    """Where the hidden state comes from: prompt ``S``, layers ``l``, position ``i``, model ``M``.

    ``layers`` is one block or several (kept as a tuple): one patched run per source layer (e.g. the per-layer
    generation table). ``model=None`` means the model passed to :func:`mi_lenses.patchscopes.patchscope`.

    >>> Source("The capital of France is", layers=range(2)).layers
    (0, 1)
    """

    prompt: str | Tensor
    layers: int | Sequence[int]
    position: int = -1
    model: Any = None
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        many = isinstance(self.layers, (list, tuple, range))
        object.__setattr__(self, "layers", tuple(self.layers) if many else (self.layers,))


@dataclass(frozen=True)
class Target:
    """Where the state goes: prompt ``T``, positions ``i*``, map ``f``, model ``M*``, layer ``l*``.

    Defaults: ``layer=None`` -> ``l* = l``; ``positions=None`` -> the placeholder token; ``map=None`` -> identity;
    ``model=None`` -> the source model. ``max_new_tokens`` is the preset's suggested generation length.
    """

    prompt: str | Tensor = IDENTITY_PROMPT
    layer: int | None = None
    positions: int | Sequence[int] | None = None
    placeholder: str | None = "?"
    occurrence: Literal["last", "all"] = "last"
    model: Any = None
    map: Callable[[Tensor], Tensor] | None = None
    name: str = "custom"
    max_new_tokens: int = 0
    prepend_bos: bool | None = None
    description: str = ""

    def replace(self, **changes: Any) -> "Target":
        """A copy with some fields changed, e.g. ``identity().replace(layer=3, model=other, map=f)``."""
        return dataclasses.replace(self, **changes)


@dataclass
class ResolvedTarget:
    """A target checked against its model: tokens ``[1, T]`` and patch positions (all ``< T``)."""

    view: ModelView
    tokens: Tensor
    positions: tuple[int, ...]

    @property
    def str_tokens(self) -> list[str]:
        return [self.view.id_to_str(int(t)) for t in self.tokens[0]]


def resolve_layer(view: ModelView, layer: Any, what: str) -> int:
    """A block index (negative from the end), with an error that names the valid range."""
    return resolve_index(layer, view.n_layers, what, f"{view.name} has {view.n_layers} blocks; layer l means the "
                         f"output of block l (blocks.l.hook_resid_post)")


def resolve_position(position: Any, length: int, what: str) -> int:
    """A position in a prompt of ``length`` tokens (negative from the end)."""
    return resolve_index(position, length, what, f"the prompt has {length} tokens")


def placeholder_positions(
    view: ModelView, prompt: str, placeholder: str, occurrence: Literal["last", "all"] = "last",
    prepend_bos: bool | None = None
) -> list[int]:
    """Positions of the tokens that end each occurrence of ``placeholder`` (only the last with ``"last"``)."""
    if occurrence not in ("last", "all"):
        raise LensInputError(f"occurrence must be 'last' or 'all', got {occurrence!r}.")
    if not placeholder:
        raise LensInputError("the placeholder must be a non-empty string (e.g. 'x' or '?').")
    full = view.to_tokens(prompt, prepend_bos)[0]
    starts, at = [], prompt.find(placeholder)
    while at >= 0:
        starts.append(at)
        at = prompt.find(placeholder, at + len(placeholder))
    if not starts:
        raise LensInputError(
            f"the target prompt {prompt!r} has no placeholder {placeholder!r}: write {placeholder!r} where the "
            f"source state should be patched, or pass Target(positions=...) (--target-position on the command line)."
        )
    if occurrence == "last":
        starts = starts[-1:]
    out = []
    for s in starts:
        prefix = view.to_tokens(prompt[: s + len(placeholder)], prepend_bos)[0]
        n = prefix.shape[0]
        if n > full.shape[0] or not torch.equal(full[:n], prefix):
            raise LensInputError(
                f"the placeholder {placeholder!r} at character {s} of the target prompt merges with the text after "
                f"it into one token: put a space or newline after it, or pass Target(positions=...)."
            )
        out.append(n - 1)
    if len(set(out)) != len(out):
        raise LensInputError(f"two occurrences of {placeholder!r} end in the same token; pass Target(positions=...).")
    return out


def resolve_target(target: Target, view: ModelView) -> ResolvedTarget:
    """Tokenise the target prompt and find ``i*`` (validated)."""
    if not isinstance(target, Target):
        raise LensInputError(f"expected a Target (e.g. mi_lenses.patchscopes.presets.identity()), got {target!r}.")
    tokens = view.to_tokens(target.prompt, target.prepend_bos)
    if tokens.shape[0] != 1:
        raise LensInputError("the target prompt must be one prompt (a string or tokens [1, pos]).")
    T = tokens.shape[1]
    check_context(view, T, "the target prompt", opt_in=False)
    if target.positions is not None:
        raw = [target.positions] if not isinstance(target.positions, (list, tuple, range)) else list(target.positions)
        if not raw:
            raise LensInputError("Target(positions=[]) patches nothing: give at least one position.")
        positions = [resolve_position(p, T, "target position") for p in raw]
    elif isinstance(target.prompt, str) and target.placeholder:
        positions = placeholder_positions(view, target.prompt, target.placeholder, target.occurrence,
                                          target.prepend_bos)
    else:
        raise LensInputError(
            "the target needs a position: pass Target(positions=...) or a string prompt with a placeholder."
        )
    if len(set(positions)) != len(positions):
        raise LensInputError(f"target positions {positions} name a position twice.")
    return ResolvedTarget(view, tokens, tuple(sorted(positions)))


def resolve_map(fmap: Any, source: ModelView, target: ModelView) -> Callable[[Tensor], Tensor] | None:
    """Check that ``f`` maps the source ``d_model`` to the target ``d_model`` (identity needs equal sizes)."""
    if fmap is None:
        if source.d_model != target.d_model:
            raise LensInputError(
                f"the source model has d_model {source.d_model} and the target model {target.d_model}: pass "
                f"Target(map=...), e.g. mi_lenses.patchscopes.fit_map(source_model, texts, source_layer, "
                f"target_model=target_model, target_layer=target_layer)."
            )
        return None
    if not callable(fmap):
        raise LensInputError(f"map must be callable (hidden [n, d_source] -> [n, d_target]), got {fmap!r}.")
    probe = torch.zeros(2, source.d_model, device=source.device)
    try:
        with torch.no_grad():
            out = fmap(probe)
    except Exception as err:  # noqa: BLE001 - any failure of a user map is a bad-input error here
        raise LensInputError(
            f"the map failed on a [2, {source.d_model}] batch of source states ({type(err).__name__}: {err}): it "
            f"must take [n, {source.d_model}] and return [n, {target.d_model}]."
        ) from err
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, target.d_model):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise LensInputError(
            f"the map turns [2, {source.d_model}] into {shape}; the target model needs [2, {target.d_model}]."
        )
    return fmap


def same_vocabulary(a: ModelView, b: ModelView) -> bool:
    """Whether token ids mean the same strings in both models (then precision@1 compares ids)."""
    if a.model is b.model or (a.tokenizer is not None and a.tokenizer is b.tokenizer):
        return True
    if a.d_vocab != b.d_vocab or a.tokenizer is None or b.tokenizer is None:
        return False
    try:
        return a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: treat as different
        return False


def translate_ids(ids: Tensor, source: ModelView, target: ModelView) -> Tensor:
    """Source-vocabulary ids as target-vocabulary ids (-1 where the string is not one target token)."""
    if same_vocabulary(source, target):
        return ids.clone()
    out = []
    for i in ids.tolist():
        s = source.id_to_str(i)
        try:
            out.append(target.to_single_token(s))
        except LensInputError:
            out.append(-1)
    return torch.tensor(out, dtype=torch.long)
