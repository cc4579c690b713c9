"""Lenses made of one affine map per residual row, ``h -> scale * W_r h + b_r``, decoded through the model's own final
norm and unembedding: the Jacobian lens, the linear Future Lens and the attribute lens (linear relational
embeddings) are all of this kind. This module holds what they share: the map, the check against a model, and the
file format.

Rows are keyed by ``lens_index`` (tuned-lens indexing: 0 = embeddings, ``l`` = input of block ``l`` = output of
block ``l - 1``; ``n_layers`` = the final row). ``point="resid_post"`` reads the same states, so the same maps apply.

File format (a folder, written atomically, the JSON last)::

    maps.safetensors   "W.{r}" [d_model, d_model] and "b.{r}" [d_model] per fitted row r
    mi_lens.json       {"format": "mi_lenses.row_map", "version": 1, "kind", "rows", "n_layers", "d_model",
                        "scale", "ahead", "model_name", "unembed_hash", "unembed_fingerprint", "residual_centered",
                        "sha256" (of maps.safetensors), "meta": {...}}

Example:
    >>> lens = mi_lenses.JacobianLens.identity(model)          # every J = I: exactly the logit lens
    >>> res = lens(model, "The capital of France is")
    >>> bool(torch.equal(res.top_ids, mi_lenses.logit_lens(model, "The capital of France is").top_ids))
    True
    >>> _ = lens.save(tmp / "jlens"); type(mi_lenses.load_row_map(tmp / "jlens", model)).__name__
    'JacobianLens'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.logit_lens import Lens
from mi_lenses.lenses.tuned.io import _sha256
from mi_lenses.models.view import ModelView, ResidualRow

FORMAT_ID = "mi_lenses.row_map"
VERSION = 1
CONFIG = "mi_lens.json"
WEIGHTS = "maps.safetensors"
_KINDS: dict[str, type["RowMapLens"]] = {}


class RowMapLens(Lens):
    """Affine maps per residual row: row ``r`` decodes ``scale * W[r] @ h + b[r]``.

    Attributes:
        W, b: ``{lens_index: [d_model, d_model]}`` and ``{lens_index: [d_model]}`` (float32, CPU).
        n_layers, d_model: the model the maps belong to.
        scale: multiplies ``W`` (the attribute lens's beta); 1 otherwise.
        meta: what the maps belong to (model identity, as for tuned lenses) and how they were fitted.

    A row without a map is an error that names the rows there are, except the final row of a lens whose
    ``final_identity`` is True (the Jacobian lens: its final transport is the identity by construction).
    """

    kind = "row_map"
    final_identity = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _KINDS[cls.kind] = cls

    def __init__(self, W: dict[int, Tensor], b: dict[int, Tensor] | None = None, *, n_layers: int, d_model: int,
                 scale: float = 1.0, ahead: int = 0, meta: dict[str, Any] | None = None):
        if not W:
            raise LensInputError("a row-map lens needs at least one row's map.")
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

    # ------------------------------------------------------------------------------------------ the map
    @property
    def rows(self) -> list[int]:
        """The rows (lens indices) this lens can read, the final row included where it is the identity."""
        rows = sorted(self.W)
        return rows + [self.n_layers] if self.final_identity and self.n_layers not in self.W else rows

    def apply(self, hidden: Float[Tensor, "... d_model"], row: int) -> Float[Tensor, "... d_model"]:
        """``scale * W[row] h + b[row]`` (the identity on the final row of a ``final_identity`` lens)."""
        if hidden.shape[-1] != self.d_model:
            raise LensInputError(f"hidden states have d_model {hidden.shape[-1]}; this lens maps d_model "
                                 f"{self.d_model}: load the lens for this model.")
        if row not in self.W:
            if row == self.n_layers and self.final_identity:
                return hidden
            raise LensInputError(
                f"this {self.name} has no map for row {row}; it reads rows {self.rows} (0 = embeddings, l = output "
                f"of block l-1, {self.n_layers} = final). Pass layers={self.rows} or fit those rows.")
        W, b = self.W[row].to(hidden.device), self.b[row].to(hidden.device)
        return torch.addmm(b, hidden.reshape(-1, self.d_model).float(), W.T, alpha=self.scale).reshape(hidden.shape)

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]:
        if row.label.endswith("_mid"):
            raise LensInputError(f"the {self.name} maps block inputs/outputs; it has no map for resid_mid. Use "
                                 "point='resid_pre' (default) or 'resid_post'.")
        return self.apply(hidden, row.lens_index)

    # ------------------------------------------------------------------------------------------ the model
    def bind(self, model: Any) -> "RowMapLens":
        """Check that the maps belong to ``model`` (layers, d_model, unembedding fingerprint, residual basis) and
        return the lens to run on it (maps fitted on a mean-free LayerNorm residual are converted exactly for a raw
        model; the reverse is refused, as for tuned lenses)."""
        from mi_lenses.lenses.tuned.lens import FINGERPRINT_TOL, residual_is_centered, unembed_fingerprint

        view = ModelView(model)
        if (self.n_layers, self.d_model) != (view.n_layers, view.d_model):
            raise LensInputError(
                f"this {self.name} is for a model with {self.n_layers} layers and d_model {self.d_model} "
                f"({self.meta.get('model_name', '?')}), but {view.name} has {view.n_layers} layers and d_model "
                f"{view.d_model}: fit or load one for this model.")
        fp = self.meta.get("unembed_fingerprint")
        if fp is not None:
            ours, theirs = torch.tensor(unembed_fingerprint(view)), torch.tensor(fp, dtype=torch.float32)
            if ours.shape != theirs.shape or (ours - theirs).abs().max() > FINGERPRINT_TOL * theirs.abs().max():
                raise LensInputError(
                    f"this {self.name} was fitted for another model ({self.meta.get('model_name', '?')}): its "
                    f"unembedding differs from {view.name}'s. Fit one for this model.")
        fitted_centered = bool(self.meta.get("residual_centered", False))
        if fitted_centered == residual_is_centered(view):
            return self
        if fitted_centered:
            out = self.copy(W={r: w - w.mean(-1, keepdim=True) for r, w in self.W.items()})
            out.meta["residual_centered"] = False
            return out
        raise LensInputError(
            f"this {self.name} was fitted on the raw residual stream of a LayerNorm model, but this model runs in "
            "TransformerLens compatibility mode (mean-free residual stream), where it cannot be applied exactly. "
            "Load the model with mi_lenses.load_model(..., compatibility_mode=False), or fit the lens on it.")

    def copy(self, **changes: Any) -> "RowMapLens":
        """The same lens with some of ``W``, ``b``, ``scale``, ``ahead``, ``meta`` replaced."""
        args = dict(W=self.W, b=self.b, n_layers=self.n_layers, d_model=self.d_model, scale=self.scale,
                    ahead=self.ahead, meta=dict(self.meta))
        args.update(changes)
        out = type(self).__new__(type(self))
        RowMapLens.__init__(out, **args)
        for k, v in vars(self).items():
            if k not in vars(out):
                setattr(out, k, v)
        return out

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the lens folder atomically (``maps.safetensors`` + ``mi_lens.json``, see the module docstring)."""
        from safetensors.torch import save_file

        tensors = {f"W.{r}": w.clone().contiguous() for r, w in self.W.items()}  # clone: no shared storage
        tensors.update({f"b.{r}": b.clone().contiguous() for r, b in self.b.items()})
        digest: dict[str, str] = {}

        def weights(tmp: Path) -> None:
            save_file(tensors, str(tmp))
            digest["sha256"] = _sha256(tmp)

        identity = {k: self.meta.get(k) for k in ("model_name", "unembed_hash", "unembed_fingerprint",
                                                 "residual_centered")}
        rest = {k: v for k, v in self.meta.items() if k not in identity}

        def config(tmp: Path) -> None:
            cfg = {"format": FORMAT_ID, "version": VERSION, "kind": self.kind, "rows": sorted(self.W),
                   "n_layers": self.n_layers, "d_model": self.d_model, "scale": self.scale, "ahead": self.ahead,
                   **identity, "sha256": digest["sha256"], "meta": rest}
            tmp.write_text(json.dumps(cfg, indent=1))

        return write_files_atomic(path, [(WEIGHTS, weights), (CONFIG, config)])


def load_row_map(path: str | os.PathLike, model: Any = None) -> RowMapLens:
    """Load a lens folder written by :meth:`RowMapLens.save` (its class from ``"kind"``); with ``model`` it is checked
    against (bound to) the model."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file() or not (folder / WEIGHTS).is_file():
        raise LensInputError(f"{folder} is not a row-map lens folder (no {CONFIG} + {WEIGHTS}): save one with "
                             "lens.save(folder).")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT_ID or cfg.get("kind") not in _KINDS:
        raise LensInputError(f"{cfg_path} is not a mi_lenses row-map lens (format {cfg.get('format')!r}, kind "
                             f"{cfg.get('kind')!r}).")
    if _sha256(folder / WEIGHTS) != cfg.get("sha256"):
        raise LensInputError(f"{folder / WEIGHTS} does not match the checksum in {CONFIG}: the folder is corrupt or "
                             "was edited; save the lens again.")
    tensors = load_file(str(folder / WEIGHTS))
    rows = [int(r) for r in cfg["rows"]]
    meta = dict(cfg.get("meta") or {})
    meta.update({k: cfg.get(k) for k in ("model_name", "unembed_hash", "unembed_fingerprint", "residual_centered")})
    cls = _KINDS[cfg["kind"]]
    lens = cls.__new__(cls)
    RowMapLens.__init__(lens, {r: tensors[f"W.{r}"] for r in rows}, {r: tensors[f"b.{r}"] for r in rows},
                        n_layers=cfg["n_layers"], d_model=cfg["d_model"], scale=cfg.get("scale", 1.0),
                        ahead=cfg.get("ahead", 0), meta=meta)
    return lens.bind(model) if model is not None else lens

