"""Lens files: one native format for every affine lens, the files of earlier versions, and the ``tuned-lens``
package's format as an import/export adapter (:mod:`mi_lenses.lenses.tuned_lens_format`). Every write is atomic
(temp files renamed into place, the config last); every read checks shapes, dtypes, finiteness and the checksum, and
loads tensors with ``safetensors`` or ``torch.load(..., weights_only=True)``, so a pickle payload can never run.

Native format (a folder)::

    maps.safetensors   "W.{r}" (form "full") or "A.{r}" (form "residual": W = I + A) [d_model, d_model] and
                       "b.{r}" [d_model] per stored row r
    mi_lens.json       {"format": "mi_lenses.affine_lens", "version": 2, "kind", "form", "rows", "n_layers",
                        "d_model", "scale", "ahead", "model_name", "unembed_hash", "unembed_fingerprint",
                        "residual_centered", "sha256" (of maps.safetensors), "meta": {...}}

Read as well: ``mi_lenses.row_map`` version 1 (the same files, form "full") and ``mi_lenses.tuned_lens`` version 1
(``lens.safetensors`` with ``weight [n_layers, d, d]``, ``bias [n_layers, d]``), written by mi_lenses 0.1.

This module deals in :class:`LensRecord` (the plain contents of a lens file); the lenses are built from records,
and saved and loaded, by :mod:`mi_lenses.lenses.affine` (``lens.save(path)``, ``mi_lenses.load_lens(path)``).

Example:
    >>> lens = TunedLens.from_model(model)
    >>> _ = lens.save(tmp / "ours"); _ = lens.save(tmp / "theirs", format="tuned-lens")
    >>> sorted(p.name for p in (tmp / "ours").iterdir()), sorted(p.name for p in (tmp / "theirs").iterdir())
    (['maps.safetensors', 'mi_lens.json'], ['config.json', 'params.pt'])
    >>> rec = read(tmp / "theirs")                  # auto-detects the format
    >>> rec.kind, rec.form, sorted(rec.maps) == list(range(model.cfg.n_layers))
    ('tuned', 'residual', True)
    >>> bool(torch.equal(read(tmp / "ours").maps[1][0], lens.stored(1)[0]))
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.errors import LensInputError
from mi_lenses.lenses import tuned_lens_format
from mi_lenses.models.identity import IDENTITY_KEYS, file_sha256

LensFormat = Literal["mi_lenses", "tuned-lens"]
FORMATS = ("mi_lenses", "tuned-lens")
FORMAT_ID, VERSION = "mi_lenses.affine_lens", 2
CONFIG, WEIGHTS = "mi_lens.json", "maps.safetensors"
LEGACY_ROW_MAP = "mi_lenses.row_map"  # version 1: the native files, form "full"
LEGACY_TUNED, LEGACY_TUNED_WEIGHTS = "mi_lenses.tuned_lens", "lens.safetensors"  # version 1


@dataclass
class LensRecord:
    """The contents of a lens file: the lens class's ``kind``, the storage ``form`` (``"full"``: ``W``;
    ``"residual"``: ``A`` with ``W = I + A``), the stored ``(matrix, bias)`` per row, sizes, ``scale``, ``ahead`` and
    ``meta`` (the model identity and how the lens was fitted)."""

    kind: str
    form: Literal["full", "residual"]
    maps: dict[int, tuple[Tensor, Tensor]]
    n_layers: int
    d_model: int
    scale: float = 1.0
    ahead: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- write
def write(path: str | os.PathLike, rec: LensRecord) -> Path:
    """Write ``rec`` into the folder ``path`` in the native format (each file atomically, the config last)."""
    key = "A" if rec.form == "residual" else "W"
    tensors: dict[str, Tensor] = {}
    for r, (M, b) in sorted(rec.maps.items()):
        tensors[f"{key}.{r}"] = M.detach().float().cpu().clone().contiguous()  # clone: no shared storage
        tensors[f"b.{r}"] = b.detach().float().cpu().clone().contiguous()
    digest: dict[str, str] = {}

    def weights(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        digest["sha256"] = file_sha256(tmp)

    identity = {k: rec.meta.get(k) for k in IDENTITY_KEYS}
    rest = {k: v for k, v in rec.meta.items() if k not in identity}

    def config(tmp: Path) -> None:
        cfg = {"format": FORMAT_ID, "version": VERSION, "kind": rec.kind, "form": rec.form, "rows": sorted(rec.maps),
               "n_layers": rec.n_layers, "d_model": rec.d_model, "scale": rec.scale, "ahead": rec.ahead, **identity,
               "sha256": digest["sha256"], "meta": rest}
        tmp.write_text(json.dumps(cfg, indent=1))

    return write_files_atomic(path, [(WEIGHTS, weights), (CONFIG, config)])


# ---------------------------------------------------------------------------------------------- read
def lens_format(path: str | os.PathLike) -> LensFormat:
    """``"mi_lenses"`` or ``"tuned-lens"`` for a lens folder; ``LensInputError`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise LensInputError(f"{path} is not a folder: pass the lens folder (holding {CONFIG} or "
                             f"{tuned_lens_format.CONFIG}).")
    if (path / CONFIG).is_file():
        return "mi_lenses"
    if tuned_lens_format.holds_lens(path):
        return "tuned-lens"
    raise LensInputError(
        f"{path} holds no lens: expected {CONFIG} + {WEIGHTS} (mi_lenses) or {tuned_lens_format.CONFIG} + "
        f"{tuned_lens_format.WEIGHTS} (tuned-lens package).")


def read(path: str | os.PathLike) -> LensRecord:
    """The record of a lens folder in any format (checked: shapes, dtypes, finiteness, checksum)."""
    path = Path(path)
    if lens_format(path) == "tuned-lens":
        cfg = read_json(path / tuned_lens_format.CONFIG)
        A, b = tuned_lens_format.read(path, cfg)
        L, d = cfg["num_hidden_layers"], cfg["d_model"]
        check_maps(A, b, L, d, path / tuned_lens_format.WEIGHTS)
        meta = {"model_name": cfg.get("base_model_name_or_path") or "", "residual_centered": False,
                "imported_from": "tuned-lens"}
        return LensRecord("tuned", "residual", {i: (A[i], b[i]) for i in range(L)}, L, d, meta=meta)
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    fmt = cfg.get("format")
    if fmt == LEGACY_TUNED:
        return _read_legacy_tuned(path, cfg)
    if fmt not in (FORMAT_ID, LEGACY_ROW_MAP):
        raise LensInputError(f"{cfg_path} is not a mi_lenses lens config (format {fmt!r}).")
    if int(cfg.get("version", 0)) > VERSION:
        raise LensInputError(f"{cfg_path} has format version {cfg.get('version')}: upgrade mi_lenses to read it.")
    kind, form = cfg.get("kind"), cfg.get("form", "full")
    if not isinstance(kind, str) or form not in ("full", "residual"):
        raise LensInputError(f"{cfg_path} has no valid 'kind'/'form' (got {kind!r}, {form!r}): the lens config is "
                             "corrupt.")
    L, d = int_field(cfg, "n_layers", cfg_path), int_field(cfg, "d_model", cfg_path)
    tensors = _safetensors(path / WEIGHTS, cfg.get("sha256"), cfg_path)
    key = "A" if form == "residual" else "W"
    rows = cfg.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, int) and 0 <= r <= L for r in rows):
        raise LensInputError(f"{cfg_path} has no valid 'rows' (got {rows!r}): the lens config is corrupt.")
    maps = {}
    for r in rows:
        M, b = tensors.get(f"{key}.{r}"), tensors.get(f"b.{r}")
        check_maps(M, b, None, d, path / WEIGHTS, what=f"row {r}")
        maps[r] = (M, b)
    meta = dict(cfg.get("meta") or {})
    meta.update({k: cfg.get(k) for k in IDENTITY_KEYS})
    return LensRecord(kind, form, maps, L, d, float(cfg.get("scale", 1.0)), int(cfg.get("ahead", 0)), meta)


def _read_legacy_tuned(path: Path, cfg: dict) -> LensRecord:
    """A tuned lens written by mi_lenses 0.1 (``lens.safetensors``: stacked ``weight`` and ``bias``)."""
    cfg_path = path / CONFIG
    if int(cfg.get("version", 0)) > 1:
        raise LensInputError(f"{cfg_path} has format version {cfg.get('version')}: upgrade mi_lenses to read it.")
    L, d = int_field(cfg, "n_layers", cfg_path), int_field(cfg, "d_model", cfg_path)
    state = _safetensors(path / LEGACY_TUNED_WEIGHTS, cfg.get("sha256"), cfg_path)
    weight, bias = state.get("weight"), state.get("bias")
    check_maps(weight, bias, L, d, path / LEGACY_TUNED_WEIGHTS)
    meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "n_layers", "d_model", "sha256")}
    return LensRecord("tuned", "residual", {i: (weight[i], bias[i]) for i in range(L)}, L, d, meta=meta)


def _safetensors(w_path: Path, sha256: str | None, cfg_path: Path) -> dict[str, Tensor]:
    if not w_path.is_file():
        raise LensInputError(f"{w_path} is missing: the lens folder is incomplete.")
    if sha256 and file_sha256(w_path) != sha256:
        raise LensInputError(f"{w_path} does not match the checksum in {cfg_path}: the file is corrupt or truncated, "
                             "or was edited; save the lens again.")
    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LensInputError(f"cannot read {w_path} ({err}): the file is corrupt or truncated.") from err


# ---------------------------------------------------------------------------------------------- checks
def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a ``LensInputError`` saying the file is corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LensInputError(f"{path} is not valid JSON ({err}): the lens file is corrupt or truncated.") from err
    if not isinstance(data, dict):
        raise LensInputError(f"{path} is not a JSON object: the lens file is corrupt.")
    return data


def int_field(cfg: dict, key: str, where: Path) -> int:
    """A positive int field of a lens config, or a ``LensInputError``."""
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LensInputError(f"{where} has no valid {key!r} (got {value!r}): the lens config is corrupt.")
    return value


def check_maps(weight: Any, bias: Any, L: int | None, d: int, where: Path, what: str = "weight") -> None:
    """Matrices ``[L, d, d]`` (or one ``[d, d]`` when ``L`` is None) and biases of matching shape: floating point,
    finite; otherwise a ``LensInputError`` saying the file is corrupt."""
    lead = () if L is None else (L,)
    for name, t, shape in ((what, weight, (*lead, d, d)), ("bias", bias, (*lead, d))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = None if not isinstance(t, torch.Tensor) else tuple(t.shape)
            raise LensInputError(f"{where}: {name} has shape {got}, expected {shape}: the lens file is corrupt.")
        if not t.is_floating_point():
            raise LensInputError(f"{where} holds {t.dtype} tensors, expected floating point: the lens file is "
                                 "corrupt or not a lens.")
        if not torch.isfinite(t).all():
            raise LensInputError(f"{where} holds non-finite values: the lens is broken; retrain it.")
