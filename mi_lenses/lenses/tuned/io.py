"""Lens files: our own format (safetensors + JSON) and the ``tuned-lens`` package format, both written atomically.

Own format (a folder)::

    lens.safetensors    weight [n_layers, d_model, d_model], bias [n_layers, d_model]
    mi_lens.json        {"format": "mi_lenses.tuned_lens", "version": 1, "model_name", "d_model", "n_layers",
                         "unembed_hash", "unembed_fingerprint", "residual_centered", "sha256" (of lens.safetensors),
                         "training": {...}}

``tuned-lens`` format (a folder): ``config.json`` (``base_model_name_or_path, d_model, num_hidden_layers, bias,
unembed_hash, lens_type``) and ``params.pt`` (``{"{i}.weight": [d, d], "{i}.bias": [d]}``), read with
``torch.load(..., weights_only=True)`` so a pickle payload can never run.

Example:
    >>> lens = TunedLens.from_model(model)
    >>> _ = save_lens(lens, tmp / "ours"); _ = save_lens(lens, tmp / "theirs", format="tuned-lens")
    >>> sorted(p.name for p in (tmp / "theirs").iterdir())
    ['config.json', 'params.pt']
    >>> load_lens(tmp / "theirs", model).n_layers      # auto-detects the format, checks it belongs to model
    3
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from mi_lenses.atomic import write_files_atomic
from mi_lenses.errors import LensInputError
from mi_lenses.lenses.tuned.lens import TunedLens

OWN_CONFIG = "mi_lens.json"
OWN_WEIGHTS = "lens.safetensors"
TL_CONFIG = "config.json"
TL_WEIGHTS = "params.pt"
FORMAT_ID = "mi_lenses.tuned_lens"
VERSION = 1
FORMATS = ("mi_lenses", "tuned-lens")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- save
LensFormat = Literal["mi_lenses", "tuned-lens"]


def save_lens(lens: TunedLens, path: str | os.PathLike, format: LensFormat = "mi_lenses") -> Path:
    """Write ``lens`` into the folder ``path`` (each file atomically, the config last) in ``format``
    (``"mi_lenses"`` or ``"tuned-lens"``).

    The ``tuned-lens`` format has no notion of a mean-free residual stream: a lens trained on a LayerNorm model in
    compatibility mode is exported in its exact raw-residual form (``A P``).
    """
    if format not in FORMATS:
        raise LensInputError(f"unknown lens format {format!r}; use one of {FORMATS}.")
    weight = lens.weight.detach().float().cpu().contiguous()
    bias = lens.bias.detach().float().cpu().contiguous()

    if format == "mi_lenses":
        from safetensors.torch import save_file

        digest = {}

        def weights(tmp: Path) -> None:
            save_file({"weight": weight, "bias": bias}, str(tmp))
            digest["sha256"] = _sha256(tmp)

        def config(tmp: Path) -> None:
            cfg = {"format": FORMAT_ID, "version": VERSION, "n_layers": lens.n_layers, "d_model": lens.d_model,
                   **lens.meta, "sha256": digest["sha256"]}
            tmp.write_text(json.dumps(cfg, indent=1))

        writers = [(OWN_WEIGHTS, weights), (OWN_CONFIG, config)]

    else:
        if lens.meta.get("residual_centered"):
            lens = lens.centered_to_raw()
            weight = lens.weight.detach().float().cpu().contiguous()

        def weights(tmp: Path) -> None:
            state = {}
            for i in range(lens.n_layers):
                state[f"{i}.weight"] = weight[i].clone()
                state[f"{i}.bias"] = bias[i].clone()
            torch.save(state, tmp)

        def config(tmp: Path) -> None:
            cfg = {
                "base_model_name_or_path": lens.meta.get("model_name", ""),
                "d_model": lens.d_model,
                "num_hidden_layers": lens.n_layers,
                "bias": True,
                "base_model_revision": None,
                "unembed_hash": None,  # tuned-lens hashes the HF lm_head; it only warns on a mismatch
                "lens_type": "linear_tuned_lens",
            }
            tmp.write_text(json.dumps(cfg, indent=1))

        writers = [(TL_WEIGHTS, weights), (TL_CONFIG, config)]

    return write_files_atomic(path, writers)


# ---------------------------------------------------------------------------------------------- load
def lens_format(path: str | os.PathLike) -> LensFormat:
    """``"mi_lenses"`` or ``"tuned-lens"`` for a lens folder; ``LensInputError`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise LensInputError(f"{path} is not a folder: pass the lens folder (holding {OWN_CONFIG} or {TL_CONFIG}).")
    if (path / OWN_CONFIG).is_file():
        return "mi_lenses"
    if (path / TL_CONFIG).is_file() and (path / TL_WEIGHTS).is_file():
        return "tuned-lens"
    raise LensInputError(
        f"{path} holds no lens: expected {OWN_CONFIG} + {OWN_WEIGHTS} (mi_lenses) or {TL_CONFIG} + {TL_WEIGHTS} "
        "(tuned-lens package)."
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LensInputError(f"{path} is not valid JSON ({err}): the lens file is corrupt or truncated.") from err
    if not isinstance(data, dict):
        raise LensInputError(f"{path} is not a JSON object: the lens file is corrupt.")
    return data


def _int_field(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LensInputError(f"{where} has no valid {key!r} (got {value!r}): the lens config is corrupt.")
    return value


def load_lens(path: str | os.PathLike, model: Any = None) -> TunedLens:
    """Load a lens folder in either format; with ``model``, check it belongs to the model and bind it.

    >>> TunedLens.from_model(model).save(tmp / "lens")
    >>> res = load_lens(tmp / "lens", model)(model, "The capital of France is")
    """
    path = Path(path)
    fmt = lens_format(path)
    lens = _load_own(path) if fmt == "mi_lenses" else _load_tuned_lens(path)
    return lens.bind(model) if model is not None else lens


def _load_own(path: Path) -> TunedLens:
    cfg_path, w_path = path / OWN_CONFIG, path / OWN_WEIGHTS
    cfg = _read_json(cfg_path)
    if cfg.get("format") != FORMAT_ID:
        raise LensInputError(f"{cfg_path} is not a mi_lenses lens config (format {cfg.get('format')!r}).")
    if int(cfg.get("version", 0)) > VERSION:
        raise LensInputError(f"{cfg_path} has format version {cfg.get('version')}: upgrade mi_lenses to read it.")
    L, d = _int_field(cfg, "n_layers", cfg_path), _int_field(cfg, "d_model", cfg_path)
    if not w_path.is_file():
        raise LensInputError(f"{w_path} is missing: the lens folder is incomplete.")
    if cfg.get("sha256") and _sha256(w_path) != cfg["sha256"]:
        raise LensInputError(f"{w_path} does not match the checksum in {cfg_path}: the file is corrupt or truncated.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LensInputError(f"cannot read {w_path} ({err}): the file is corrupt or truncated.") from err
    _check_shapes(state.get("weight"), state.get("bias"), L, d, w_path)
    meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "n_layers", "d_model", "sha256")}
    lens = TunedLens(L, d, meta)
    with torch.no_grad():
        lens.weight.copy_(state["weight"])
        lens.bias.copy_(state["bias"])
    return lens


def _load_tuned_lens(path: Path) -> TunedLens:
    cfg_path, w_path = path / TL_CONFIG, path / TL_WEIGHTS
    cfg = _read_json(cfg_path)
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise LensInputError(f"{cfg_path}: lens_type {lens_type!r} is not supported (only 'linear_tuned_lens').")
    L, d = _int_field(cfg, "num_hidden_layers", cfg_path), _int_field(cfg, "d_model", cfg_path)
    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (a pickle payload), EOFError/RuntimeError (truncated), ...
        raise LensInputError(
            f"cannot read {w_path} safely ({type(err).__name__}: {str(err).splitlines()[0][:200]}): the file is "
            "corrupt, truncated, or carries objects other than tensors (refused, nothing was executed)."
        ) from err
    if not isinstance(state, dict):
        raise LensInputError(f"{w_path} does not hold a dict of tensors: not a tuned-lens params.pt.")
    expected = {f"{i}.{k}" for i in range(L) for k in ("weight", "bias")}
    keys = set(state)
    if cfg.get("bias", True) is False:
        expected = {k for k in expected if k.endswith(".weight")}
    if keys != expected:
        missing, extra = sorted(expected - keys)[:4], sorted(keys - expected)[:4]
        raise LensInputError(
            f"{w_path} keys do not match {L} translators (missing {missing}, unexpected {extra}): "
            "the file is corrupt or belongs to another lens."
        )
    try:
        weight = torch.stack([state[f"{i}.weight"] for i in range(L)])
        bias = torch.stack([state.get(f"{i}.bias", torch.zeros(d, dtype=weight.dtype)) for i in range(L)])
    except (TypeError, RuntimeError) as err:
        raise LensInputError(f"{w_path} holds tensors of inconsistent shapes ({err}).") from err
    _check_shapes(weight, bias, L, d, w_path)
    weight, bias = weight.float(), bias.float()
    meta = {
        "model_name": cfg.get("base_model_name_or_path") or "",
        "residual_centered": False,
        "imported_from": "tuned-lens",
    }
    lens = TunedLens(L, d, meta)
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    return lens


def _check_shapes(weight: Any, bias: Any, L: int, d: int, where: Path) -> None:
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (L, d, d):
        got = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise LensInputError(f"{where}: weight has shape {got}, expected {(L, d, d)}: the lens file is corrupt.")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (L, d):
        got = None if not isinstance(bias, torch.Tensor) else tuple(bias.shape)
        raise LensInputError(f"{where}: bias has shape {got}, expected {(L, d)}: the lens file is corrupt.")
    bad = [t.dtype for t in (weight, bias) if not t.is_floating_point()]
    if bad:
        raise LensInputError(f"{where} holds {bad[0]} tensors, expected floating point: the lens file is corrupt or "
                             "not a tuned lens.")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise LensInputError(f"{where} holds non-finite values: the lens is broken; retrain it.")
