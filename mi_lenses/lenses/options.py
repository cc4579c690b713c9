"""The lens options, written once: :class:`LensOptions` is the record :func:`~mi_lenses.lenses.engine.run_lens` takes;
:func:`with_lens_options` (:func:`mi_lenses.options.with_options`) gives every lens entry point (``logit_lens``,
``tuned_lens``, ``run_lens``, calling a ``Lens``) one explicit keyword-only parameter per field, so ``help()`` and
``inspect.signature`` show every option with its default, and the command line derives its flags from the same fields
(``metadata["cli"]``).

Example:
    >>> opts = LensOptions(top_k=3, positions=[-1])
    >>> opts.top_k, opts.point, opts.replace(point="resid_post").point
    (3, 'resid_pre', 'resid_post')
    >>> import inspect; "top_k" in inspect.signature(mi_lenses.logit_lens).parameters
    True
    >>> res = mi_lenses.logit_lens(model, "The capital of France is", options=opts, top_k=2)   # keywords win
    >>> tuple(res.top_ids.shape)
    (4, 1, 1, 2)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec
from mi_lenses.options import Options, option, with_options

Point = Literal["resid_pre", "resid_mid", "resid_post"]
MatmulDType = Literal["float32", "bfloat16", "float16"]
TokenLike = str | int


@dataclass(frozen=True)
class LensOptions(Options):
    """Every option of a lens run (see :func:`~mi_lenses.lenses.engine.run_lens`); frozen, so one record can serve
    many calls (``opts.replace(top_k=10)`` for a variant)."""

    layers: IndexSpec = option(None, "row indices (embedding row .. final row; negative allowed); default all, or the "
                                   "rows a lens that reads only some has (``lens.rows``)")
    positions: IndexSpec = option(None, "token positions, counted in each prompt's own tokens (-1: each prompt's last "
                                      "real token); default all. A position a shorter prompt lacks is masked for it")
    point: Point = option("resid_pre", "'resid_pre' (row l is the input of block l), 'resid_mid' or 'resid_post'",
                        cli={"choices": ["resid_pre", "resid_mid", "resid_post"]})
    top_k: int = option(5, "tokens kept per row and position", cli={"type": int})
    targets: TokenLike | Sequence[TokenLike] | None = option(
        None, "token strings (each exactly one token, mind the leading space) or ids whose rank and probability are "
              "tracked", cli={"flag": "--target", "action": "append"})
    return_logits: bool = option(False, "also return the full [rows, batch, pos, vocab] logits (memory heavy)")
    prepend_bos: bool | None = option(None, "override the model's BOS default when tokenising text")
    dtype: MatmulDType | torch.dtype = option(
        "float32", "matmul dtype: 'float32', or 'bfloat16'/'float16' (faster only on hardware with fast "
                   "low-precision matmul; statistics are still reduced in float32)",
        cli={"choices": ["float32", "bfloat16", "float16"]})
    position_chunk: int = option(256, "positions decoded per chunk (streaming size)")
    vocab_tile: int | None = option(None, "vocabulary columns per logit tile (default: sized to stay in cache)")
    fused: bool | None = option(None, "reduce each logit tile in one torch.compile'd kernel (compiled once per process; "
                                    "default: eager reductions, about 0.8 of the matmul roofline)")
    check: bool = option(True, "verify the final row against the model's own logits whenever a forward pass was run")
    beyond_context: bool = option(False, "accept prompts longer than the model's context (cfg.n_ctx); positions past "
                                       "it are out of distribution")
    progress: bool = option(True, "show a progress bar when the work takes more than a couple of seconds")

    def validate(self, *, flags: bool = False) -> "LensOptions":
        """Check what can be checked without a model (the engine checks the rest: the vocabulary bound of ``top_k``,
        layers, positions, targets); errors name the option, or its ``--flag`` with ``flags=True``."""
        def name(field_name: str) -> str:
            cli = next(f for f in dataclasses.fields(self) if f.name == field_name).metadata.get("cli")
            return (cli or {}).get("flag", "--" + field_name.replace("_", "-")) if flags else field_name

        if self.point not in typing.get_args(Point):
            raise LensInputError(f"unknown residual point {self.point!r}; use one of {typing.get_args(Point)}.")
        if isinstance(self.dtype, str) and self.dtype not in typing.get_args(MatmulDType):
            raise LensInputError(f"{name('dtype')} must be one of {list(typing.get_args(MatmulDType))}, got "
                                 f"{self.dtype!r}.")
        for f in ("top_k", "position_chunk", "vocab_tile"):
            v = getattr(self, f)
            if (v is not None or f != "vocab_tile") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LensInputError(f"{name(f)} must be an int >= 1, got {v!r}.")
        return self


FIELDS = tuple(f.name for f in dataclasses.fields(LensOptions))


with_lens_options = with_options(LensOptions)
"""Give a lens entry point (whose last parameter is ``options: LensOptions | None = None``) one keyword-only parameter
per :class:`LensOptions` field (see :func:`mi_lenses.options.with_options`)."""
