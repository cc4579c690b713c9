"""The ``tuned-lens`` package's lens format, as an import/export adapter of plain tensors (the lens is built by
:mod:`mi_lenses.lenses.files`).

A folder with ``config.json`` (``base_model_name_or_path, d_model, num_hidden_layers, bias, unembed_hash,
lens_type``) and ``params.pt`` (``{"{i}.weight": [d, d], "{i}.bias": [d]}`` for ``i = 0 .. num_hidden_layers - 1``:
translator ``i`` maps ``h -> h + weight h + bias``, layer 0 = the embeddings, no translator for the output). Read with
``torch.load(..., weights_only=True)``, so a pickle payload can never run.

Example:
    >>> lens = TunedLens.from_model(model)
    >>> _ = lens.save(tmp / "theirs", format="tuned-lens")
    >>> cfg = json.loads((tmp / "theirs" / CONFIG).read_text())
    >>> A, b = read(tmp / "theirs", cfg)
    >>> tuple(A.shape), cfg["lens_type"], holds_lens(tmp / "theirs")
    ((3, 48, 48), 'linear_tuned_lens', True)
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

CONFIG, WEIGHTS = "config.json", "params.pt"


def holds_lens(path: Path) -> bool:
    """Whether ``path`` holds a lens in this format."""
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def write(path: str | os.PathLike, translators: list[tuple[Tensor, Tensor]], *, d_model: int,
          model_name: str) -> Path:
    """Write translators ``[(A_i, b_i)]`` (``h -> h + A_i h + b_i``) into the folder ``path``, atomically."""
    def weights(tmp: Path) -> None:
        state = {}
        for i, (A, b) in enumerate(translators):
            state[f"{i}.weight"], state[f"{i}.bias"] = A.clone(), b.clone()
        torch.save(state, tmp)

    def config(tmp: Path) -> None:
        cfg = {"base_model_name_or_path": model_name, "d_model": d_model, "num_hidden_layers": len(translators),
               "bias": True, "base_model_revision": None,
               "unembed_hash": None,  # tuned-lens hashes the HF lm_head; it only warns on a mismatch
               "lens_type": "linear_tuned_lens"}
        tmp.write_text(json.dumps(cfg, indent=1))

    return write_files_atomic(path, [(WEIGHTS, weights), (CONFIG, config)])


def read(path: Path, cfg: dict[str, Any]) -> tuple[Float[Tensor, "L d d"], Float[Tensor, "L d"]]:
    """The stacked translator weights and biases (float32) of the lens folder ``path`` whose parsed ``config.json``
    is ``cfg``; the config's sizes are checked, the tensors' shapes are the caller's to check."""
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise LensInputError(f"{cfg_path}: lens_type {lens_type!r} is not supported (only 'linear_tuned_lens').")
    for key in ("num_hidden_layers", "d_model"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LensInputError(f"{cfg_path} has no valid {key!r} (got {v!r}): the lens config is corrupt.")
    L, d = cfg["num_hidden_layers"], cfg["d_model"]
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
    if cfg.get("bias", True) is False:
        expected = {k for k in expected if k.endswith(".weight")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:4], sorted(set(state) - expected)[:4]
        raise LensInputError(f"{w_path} keys do not match {L} translators (missing {missing}, unexpected {extra}): "
                             "the file is corrupt or belongs to another lens.")
    try:
        weight = torch.stack([state[f"{i}.weight"] for i in range(L)])
        bias = torch.stack([state.get(f"{i}.bias", torch.zeros(d, dtype=weight.dtype)) for i in range(L)])
    except (TypeError, RuntimeError) as err:
        raise LensInputError(f"{w_path} holds tensors of inconsistent shapes ({err}).") from err
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise LensInputError(f"{w_path} holds {weight.dtype} tensors, expected floating point: the lens file is "
                             "corrupt or not a tuned lens.")
    return weight.float(), bias.float()
