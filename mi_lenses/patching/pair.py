"""The clean and corrupted runs of a patching experiment: tokens, how their positions align, and which run is patched.

``mode="denoise"`` patches the clean run's activations into the corrupted run (the *base* run is the corrupted
one, the *source* the clean one): a cell's value says how much of the clean behaviour that activation restores.
``"noise"`` patches corrupted activations into the clean run: how much of it that activation destroys.

Both prompts are compared position by position. When they tokenise to different lengths, pass
``position_map={clean position: corrupted position, ...}`` (or a list of pairs): the grid then runs over the mapped
pairs only; without one the call is refused (TransformerLens would misalign silently or fail on the shapes).
Several prompt pairs (lists of equal length) are one experiment: every patch runs on every pair, and the metric is the
mean over pairs.

Example:
    >>> pair = make_pair(ModelView(model), "The capital of France is", "The capital of Rome is")
    >>> pair.base is pair.corrupted, pair.pos_map[:2], pair.n_positions
    (True, [(0, 0), (1, 1)], 6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, get_args

from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import Batch, PromptInput
from mi_lenses.models.view import ModelView

Mode = Literal["denoise", "noise"]
MODES: tuple[str, ...] = get_args(Mode)
PositionMap = Mapping[int, int] | Sequence[tuple[int, int]]


@dataclass
class Pair:
    """Clean and corrupted batches (``[B, S]`` each, no padding), the aligned positions ``pos_map`` as
    ``(clean position, corrupted position)`` and the ``mode``."""

    clean: Batch
    corrupted: Batch
    clean_map: list[tuple[int, int]]
    mode: str

    @property
    def base(self) -> Batch:
        """The run that is patched (corrupted when denoising)."""
        return self.corrupted if self.mode == "denoise" else self.clean

    @property
    def source(self) -> Batch:
        """The run the patched activations come from."""
        return self.clean if self.mode == "denoise" else self.corrupted

    @property
    def pos_map(self) -> list[tuple[int, int]]:
        """Aligned positions as ``(source position, base position)``."""
        return list(self.clean_map) if self.mode == "denoise" else [(b, a) for a, b in self.clean_map]

    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def n_positions(self) -> int:
        return len(self.clean_map)

    @property
    def same_length(self) -> bool:
        return self.clean.shape[1] == self.corrupted.shape[1] and all(a == b for a, b in self.clean_map) \
            and len(self.clean_map) == self.clean.shape[1]


def make_pair(view: ModelView, clean: PromptInput, corrupted: PromptInput, *, position_map: PositionMap | None = None,
              mode: Mode = "denoise", prepend_bos: bool | None = None,
              beyond_context: bool = False, aligned: str | None = None) -> Pair:
    """The :class:`Pair` of ``clean`` and ``corrupted`` (a prompt, a list of prompts or token ids ``[B, S]``),
    checked: as many clean as corrupted prompts, one length per side, positions aligned or mapped. ``aligned``:
    the analysis (``"edge attribution"``) that takes no position map, named when the lengths differ."""
    if mode not in MODES:
        raise LensInputError(f"mode must be 'denoise' (clean into corrupted) or 'noise' (corrupted into clean), "
                             f"got {mode!r}.")
    c = view.batch(clean, prepend_bos=prepend_bos, beyond_context=beyond_context)
    x = view.batch(corrupted, prepend_bos=prepend_bos, beyond_context=beyond_context)
    for name, b in (("clean", c), ("corrupted", x)):
        if b.padded:
            raise LensInputError(f"the {name} prompts tokenise to different lengths {b.lengths}: patching compares "
                                 "prompts position by position, so every prompt of one side needs the same number of "
                                 "tokens. Use prompts of one template, or one pair at a time.")
    if c.shape[0] != x.shape[0]:
        raise LensInputError(f"got {c.shape[0]} clean and {x.shape[0]} corrupted prompts: pass one corrupted prompt "
                             "per clean prompt.")
    Sc, Sx = c.shape[1], x.shape[1]
    if position_map is None:
        if Sc != Sx and aligned:
            raise LensInputError(
                f"the clean prompt has {Sc} tokens and the corrupted one {Sx}: {aligned} compares the runs position by "
                "position and takes no position map, so corrupt the prompt without changing its length (e.g. swap "
                "one name for another of one token). activation_patching takes position_map= for prompts of "
                "different lengths.")
        if Sc != Sx:
            raise LensInputError(
                f"the clean prompt has {Sc} tokens and the corrupted one {Sx}: their positions do not line up. Pass "
                "position_map={clean position: corrupted position, ...} (on the command line --position-map "
                "C:K,...) naming the positions that correspond (the last positions at least), or corrupt the prompt "
                "without changing its length.")
        pairs = [(p, p) for p in range(Sc)]
    else:
        items = list(position_map.items()) if isinstance(position_map, Mapping) else list(position_map)
        pairs = []
        for item in items:
            try:
                a, b = (int(v) for v in item)
            except (TypeError, ValueError):
                raise LensInputError(f"position_map entries are (clean position, corrupted position) pairs of ints, "
                                     f"got {item!r}.") from None
            if not (-Sc <= a < Sc and -Sx <= b < Sx):
                raise LensInputError(f"position_map pair {item!r} is out of range: the clean prompt has {Sc} tokens, "
                                     f"the corrupted one {Sx}.")
            pairs.append((a % Sc, b % Sx))
        if not pairs:
            raise LensInputError("position_map is empty: map at least one clean position to a corrupted one.")
        for k, side in ((0, "clean"), (1, "corrupted")):
            seen = [p[k] for p in pairs]
            if len(set(seen)) != len(seen):
                raise LensInputError(f"position_map names a {side} position twice: each position pairs with one.")
        pairs.sort(key=lambda p: p[1])
    return Pair(c, x, pairs, mode)
