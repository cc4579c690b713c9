"""Affine lenses: one affine map per residual row, ``h -> scale * W_r h + b_r``, decoded through the model's own final
norm and unembedding. The tuned lens (``W_r = I + A_r``, trained), the Jacobian lens, the linear Future Lens and the
attribute lens (linear relational embeddings) are all of this family; this module holds what they share: the map,
the one check against a model (:meth:`AffineLens.bind`), and the change of residual basis.

Rows are keyed by ``lens_index`` (tuned-lens indexing: 0 = embeddings, ``l`` = input of block ``l`` = output of
block ``l - 1``; ``n_layers`` = the final row). ``point="resid_post"`` reads the same states, so the same maps apply.

A lens stores its matrices in one of two forms: ``"full"`` (``W_r`` itself: :class:`RowMapLens`) or ``"residual"``
(``A_r`` with ``W_r = I + A_r``, zero at the logit lens: the tuned lens, whose training starts there). Files:
:mod:`mi_lenses.lenses.files`.

Example:
    >>> lens = mi_lenses.JacobianLens.identity(model)          # every J = I: exactly the logit lens
    >>> res = lens(model, "The capital of France is")
    >>> bool(torch.equal(res.top_ids, mi_lenses.logit_lens(model, "The capital of France is").top_ids))
    True
    >>> tuned = mi_lenses.TunedLens.from_model(model)          # residual form, A = 0: the logit lens too
    >>> full = RowMapLens.from_lens(tuned)                     # the same maps in full form: W = I + A = I
    >>> bool(torch.equal(full.stored(1)[0], torch.eye(model.cfg.d_model))), bool(tuned.stored(1)[0].any())
    (True, False)
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses import files, tuned_lens_format
from mi_lenses.lenses.files import FORMATS, LensFormat, LensRecord
from mi_lenses.lenses.lens import Lens
from mi_lenses.models.identity import check_identity, residual_is_centered
from mi_lenses.models.view import ModelView, ResidualRow

Form = Literal["full", "residual"]
KINDS: dict[str, type["AffineLens"]] = {}  # "kind" in a lens file -> its class (each subclass registers itself)


class AffineLens(Lens):
    """Affine maps per residual row (see the module docstring).

    Class attributes a subclass sets: ``kind`` (its name in lens files), ``form`` (``"full"`` or ``"residual"``),
    ``final_identity`` (the final row is the identity without a stored map: the Jacobian lens).

    Instance attributes: ``n_layers``, ``d_model`` (the model the maps belong to), ``scale`` (multiplies ``W``: the
    attribute lens's beta; 1 otherwise), ``ahead`` (the Future Lens) and ``meta`` (what the maps belong to,
    :func:`~mi_lenses.models.identity.model_identity`, and how they were fitted).
    """

    kind: ClassVar[str] = "affine"
    form: ClassVar[Form] = "full"
    final_identity: ClassVar[bool] = False
    n_layers: int
    d_model: int
    scale: float = 1.0
    meta: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.form not in ("full", "residual"):
            raise TypeError(f"{cls.__name__}.form must be 'full' or 'residual', got {cls.form!r}")
        KINDS[cls.kind] = cls  # lens files name their class by ``kind``

    # ------------------------------------------------------------------------------------------ storage
    @abstractmethod
    def stored_rows(self) -> list[int]:
        """The rows that have a stored map, sorted."""

    @abstractmethod
    def stored(self, row: int) -> tuple[Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"]]:
        """Row ``row``'s matrix as stored (``W`` or ``A``, per ``form``) and bias."""

    @classmethod
    @abstractmethod
    def from_stored(cls, maps: dict[int, tuple[Tensor, Tensor]], *, n_layers: int, d_model: int, scale: float = 1.0,
                    ahead: int = 0, meta: dict[str, Any] | None = None) -> "AffineLens":
        """A lens of this class from stored matrices and biases per row (the inverse of :meth:`stored`)."""

    # ------------------------------------------------------------------------------------------ the map
    @property
    def rows(self) -> list[int]:
        """The rows (lens indices) this lens can read, the final row included where it is the identity."""
        rows = self.stored_rows()
        return rows + [self.n_layers] if self.final_identity and self.n_layers not in rows else rows

    def matrix(self, row: int) -> Float[Tensor, "d_model d_model"]:
        """The full ``W_row`` (``I + A_row`` for a residual-form lens), before ``scale``."""
        M, _ = self.stored(row)
        return M + torch.eye(self.d_model, dtype=M.dtype, device=M.device) if self.form == "residual" else M

    def apply(self, hidden: Float[Tensor, "... d_model"], row: int) -> Float[Tensor, "... d_model"]:
        """``scale * W[row] h + b[row]`` (the identity on the final row of a ``final_identity`` lens)."""
        if hidden.shape[-1] != self.d_model:
            raise LensInputError(f"hidden states have d_model {hidden.shape[-1]} but this {self.name} maps d_model "
                                 f"{self.d_model}: load the lens for this model.")
        if row not in self.stored_rows():
            if row == self.n_layers and self.final_identity:  # e.g. the tuned lens: no translator for the output
                return hidden
            raise LensInputError(
                f"this {self.name} has no map for row {row}; it reads rows {self.rows} (0 = embeddings, l = output "
                f"of block l-1, {self.n_layers} = final). Pass layers={self.rows} or fit those rows.")
        M, b = self.stored(row)
        x = hidden.reshape(-1, self.d_model).float()
        with torch.no_grad():
            z = torch.addmm(b.to(x.device, x.dtype), x, M.to(x.device, x.dtype).T, alpha=self.scale)
        return (x + z if self.form == "residual" else z).reshape(hidden.shape)

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        if row.label.endswith("_mid"):
            raise LensInputError(f"the {self.name} maps block inputs/outputs; it has no map for resid_mid. Use "
                                 "point='resid_pre' (default) or 'resid_post'.")
        return self.apply(hidden, row.lens_index)

    # ------------------------------------------------------------------------------------------ the model
    def bind(self, model: Any) -> "AffineLens":
        """Check that the maps belong to ``model`` (layers, d_model, unembedding fingerprint, residual basis) and
        return the lens to run on it. Maps fitted on a mean-free LayerNorm residual (compatibility mode) are
        converted exactly for a raw model (:meth:`centered_to_raw`); the reverse cannot be exact and is refused."""
        view = ModelView(model)
        if (self.n_layers, self.d_model) != (view.n_layers, view.d_model):
            raise LensInputError(
                f"this {self.name} is for a model with {self.n_layers} layers and d_model {self.d_model} "
                f"({self.meta.get('model_name') or '?'}), but {view.name} has {view.n_layers} layers and d_model "
                f"{view.d_model}: fit or load one for this model.")
        check_identity(self.meta, view, self.name)
        fitted_centered = bool(self.meta.get("residual_centered", False))
        if fitted_centered == residual_is_centered(view):
            return self
        if fitted_centered:
            return self.centered_to_raw()
        raise LensInputError(
            f"this {self.name} was fitted on the raw residual stream of a LayerNorm model, but this model runs in "
            "TransformerLens compatibility mode (mean-free residual stream), where it cannot be applied exactly. "
            "Load the model with mi_lenses.load_model(..., compatibility_mode=False), or fit the lens on it.")

    def centered_to_raw(self) -> "AffineLens":
        """The same lens for the raw (not mean-free) residual stream of a LayerNorm model: every stored matrix
        ``M <- M P`` with ``P = I - 11^T / d`` (exact: the final LayerNorm removes the mean the raw stream adds)."""
        out = self.replace_maps({r: (M - M.mean(-1, keepdim=True), b) for r, (M, b) in self._all_stored().items()})
        out.meta["residual_centered"] = False
        return out

    # ------------------------------------------------------------------------------------------ copies
    def _all_stored(self) -> dict[int, tuple[Tensor, Tensor]]:
        return {r: tuple(t.detach().float().cpu() for t in self.stored(r)) for r in self.stored_rows()}

    def replace_maps(self, maps: dict[int, tuple[Tensor, Tensor]]) -> "AffineLens":
        """The same lens (class, sizes, scale, ahead, a copy of meta) with other stored maps."""
        return type(self).from_stored(maps, n_layers=self.n_layers, d_model=self.d_model, scale=self.scale,
                                      ahead=self.ahead, meta=dict(self.meta))

    def save(self, path: str | os.PathLike, format: LensFormat = "mi_lenses") -> Path:
        """Write the lens folder atomically: ``format="mi_lenses"`` (the native format, any affine lens) or
        ``"tuned-lens"`` (the ``tuned-lens`` package's, for a lens with a map on every row ``0 .. n_layers-1``)."""
        return save_lens(self, path, format=format)

    def record(self) -> LensRecord:
        """The lens as the plain contents of a lens file (:mod:`mi_lenses.lenses.files`)."""
        return LensRecord(self.kind, self.form, self._all_stored(), self.n_layers, self.d_model, self.scale,
                          self.ahead, dict(self.meta))


class RowMapLens(AffineLens):
    """An affine lens holding full matrices per row: ``W``, ``b`` are ``{lens_index: [d_model, d_model]}`` and
    ``{lens_index: [d_model]}`` (float32, CPU). The base of the Jacobian, Future and attribute lenses."""

    name = "row-map lens"
    kind = "row_map"
    form = "full"

    def __init__(self, W: dict[int, Tensor], b: dict[int, Tensor] | None = None, *, n_layers: int, d_model: int,
                 scale: float = 1.0, ahead: int = 0, meta: dict[str, Any] | None = None):
        if not W:
            raise LensInputError(f"a {self.name} needs at least one row's map.")
        self.n_layers, self.d_model = int(n_layers), int(d_model)
        self.W = {int(r): w.detach().float().cpu() for r, w in W.items()}
        self.b = {int(r): (b or {}).get(r, torch.zeros(self.d_model)).detach().float().cpu() for r in self.W}
        for r, w in self.W.items():
            if not 0 <= r <= self.n_layers:
                raise LensInputError(f"row {r} is out of range 0..{self.n_layers} for a {self.n_layers}-layer model.")
            if tuple(w.shape) != (self.d_model, self.d_model) or tuple(self.b[r].shape) != (self.d_model,):
                raise LensInputError(f"row {r}'s map has shapes {tuple(w.shape)}, {tuple(self.b[r].shape)}; "
                                     f"expected ({self.d_model}, {self.d_model}) and ({self.d_model},).")
        self.scale = float(scale)
        self.ahead = int(ahead)
        self.meta: dict[str, Any] = dict(meta or {})

    def stored_rows(self) -> list[int]:
        return sorted(self.W)

    def stored(self, row: int) -> tuple[Tensor, Tensor]:
        return self.W[row], self.b[row]

    @classmethod
    def from_stored(cls, maps: dict[int, tuple[Tensor, Tensor]], *, n_layers: int, d_model: int, scale: float = 1.0,
                    ahead: int = 0, meta: dict[str, Any] | None = None) -> "RowMapLens":
        out = cls.__new__(cls)
        RowMapLens.__init__(out, {r: m for r, (m, _) in maps.items()}, {r: b for r, (_, b) in maps.items()},
                            n_layers=n_layers, d_model=d_model, scale=scale, ahead=ahead, meta=meta)
        return out

    @classmethod
    def from_lens(cls, lens: AffineLens) -> "RowMapLens":
        """Any affine lens in full form (``W = scale * (I + A)`` for a residual-form lens, scale folded in)."""
        maps = {r: (lens.matrix(r).detach().float().cpu() * lens.scale, lens.stored(r)[1].detach().float().cpu())
                for r in lens.stored_rows()}
        return cls.from_stored(maps, n_layers=lens.n_layers, d_model=lens.d_model, ahead=lens.ahead,
                               meta=dict(lens.meta))

    def copy(self, **changes: Any) -> "RowMapLens":
        """The same lens with some of ``W``, ``b``, ``scale``, ``ahead``, ``meta`` replaced."""
        W, b = changes.pop("W", self.W), changes.pop("b", self.b)
        args = dict(n_layers=self.n_layers, d_model=self.d_model, scale=self.scale, ahead=self.ahead,
                    meta=dict(self.meta))
        args.update(changes)
        out = type(self).from_stored({r: (W[r], b.get(r, torch.zeros(self.d_model))) for r in W}, **args)
        for k, v in vars(self).items():  # a subclass's own attributes (e.g. an attribute lens's relation)
            if k not in vars(out):
                setattr(out, k, v)
        return out

    def replace_maps(self, maps: dict[int, tuple[Tensor, Tensor]]) -> "RowMapLens":
        return self.copy(W={r: m for r, (m, _) in maps.items()}, b={r: b for r, (_, b) in maps.items()})


# ---------------------------------------------------------------------------------------------- files
def save_lens(lens: AffineLens, path: str | os.PathLike, format: LensFormat = "mi_lenses") -> Path:
    """Write ``lens`` into the folder ``path`` (each file atomically, the config last) in ``format``: the native
    format (:mod:`mi_lenses.lenses.files`), or the ``tuned-lens`` package's.

    The ``tuned-lens`` format has no notion of a mean-free residual stream: a lens fitted on a LayerNorm model in
    compatibility mode is exported in its exact raw-residual form (``M P``).

    Args:
        lens: the fitted lens (a ``TunedLens``, ``JacobianLens``, ``FutureLens``, attribute lens, ...).
        path: the folder written (created if missing).
        format: ``"mi_lenses"`` (default; every lens kind) or ``"tuned-lens"`` (a lens with a translator for every
            block, predicting the next token).

    Returns:
        The folder written.
    """
    if format not in FORMATS:
        raise LensInputError(f"unknown lens format {format!r}; use one of {FORMATS}.")
    if format == "mi_lenses":
        return files.write(path, lens.record())
    if lens.meta.get("residual_centered"):
        lens = lens.centered_to_raw()
    return tuned_lens_format.write(path, _translators(lens), d_model=lens.d_model,
                                   model_name=str(lens.meta.get("model_name") or ""))


def _translators(lens: AffineLens) -> list[tuple[Tensor, Tensor]]:
    """``(A_i, b_i)`` for ``i = 0 .. n_layers - 1`` with ``scale * W_i = I + A_i`` (the tuned-lens translator)."""
    missing = [i for i in range(lens.n_layers) if i not in lens.stored_rows()]
    if missing or lens.ahead:
        raise LensInputError(f"the tuned-lens format holds one translator for every row 0..{lens.n_layers - 1} "
                             f"predicting the next token; this {lens.name} lacks rows {missing[:5]} or predicts "
                             f"{lens.ahead} ahead. Save it with format='mi_lenses'.")
    eye = torch.eye(lens.d_model)
    out = []
    for i in range(lens.n_layers):
        M, b = (t.detach().float().cpu() for t in lens.stored(i))
        A = lens.scale * M + (lens.scale - 1) * eye if lens.form == "residual" else lens.scale * M - eye
        out.append((A.contiguous(), b.contiguous()))
    return out


def load_lens(path: str | os.PathLike, model: Any = None) -> AffineLens:
    """Load a lens folder in any format (its class from the file: a ``TunedLens``, ``JacobianLens``, ...); with
    ``model``, check that it belongs to the model and bind it.

    Args:
        path: a lens folder, in the native format or the ``tuned-lens`` package's.
        model: optional; the model the lens is checked against (layers, ``d_model``, unembedding fingerprint,
            residual basis) and bound to. Without it the lens is returned unchecked.

    Returns:
        The lens, of the class its file names.

    Example:
        >>> lens = mi_lenses.TunedLens.from_model(model)
        >>> _ = torch.nn.init.normal_(lens.weight, std=0.05)     # translators that are not the identity
        >>> _ = lens.save(tmp / "lens")
        >>> loaded = load_lens(tmp / "lens", model)
        >>> type(loaded).__name__, bool(torch.equal(loaded.weight, lens.weight))
        ('TunedLens', True)
        >>> res = loaded(model, "The capital of France is")
        >>> bool(torch.equal(res.top_logits, lens(model, "The capital of France is").top_logits))   # the same readout
        True
    """
    rec = files.read(path)
    if rec.kind not in KINDS:
        raise LensInputError(f"{path} holds a lens of kind {rec.kind!r}, which this mi_lenses does not know "
                             f"({', '.join(KINDS)}): upgrade mi_lenses to read it.")
    cls = KINDS[rec.kind]
    if cls.form != rec.form:
        raise LensInputError(f"{path} stores a {rec.kind} lens in form {rec.form!r}, but that lens is stored in form "
                             f"{cls.form!r}: the lens config is corrupt.")
    lens = cls.from_stored(rec.maps, n_layers=rec.n_layers, d_model=rec.d_model, scale=rec.scale, ahead=rec.ahead,
                           meta=rec.meta)
    return lens.bind(model) if model is not None else lens
