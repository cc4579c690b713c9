"""Which architectures attribution graphs support: every configuration of the architecture matrix (tests/archs.py),
raw and in compatibility mode, gets random TopK skip transcoders on every block's MLP and
``mi_lenses.attribution_graph`` (which verifies the graph before returning). One line per cell:

* ``OK``: the graph verifies (every node's input is its edges plus its constant, the logits are reproduced);
* ``REFUSED``: a ``LensInputError`` naming why, before any edge is computed (no MLP hooks, attention outside
  ``attn.hook_pattern``, a norm TransformerLens cannot rebuild);
* ``NOT-EXACT``: refused by the verification (a non-linear path the replacement model does not freeze);
* ``BOOT-FAIL``: TransformerLens does not boot the configuration.

docs/graphs.md lists the result. Usage (from the repo root)::

    .venv/bin/python scripts/graph_support.py [NAME ...]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import arch_matrix
from archs import SPECS
from tiny import _train_tokenizer

import mi_lenses
from mi_lenses import Dictionary, DictionarySet, ModelLoadError
from mi_lenses.errors import LensInputError, VerificationError


def transcoders(m) -> DictionarySet:
    g = torch.Generator().manual_seed(0)
    D = m.cfg.d_model
    return DictionarySet([
        Dictionary(torch.randn(D, 32, generator=g) * 0.4, torch.randn(32, generator=g) * 0.1,
                   torch.randn(32, D, generator=g) * 0.2, torch.zeros(D), hook=f"blocks.{l}.mlp.hook_in",
                   hook_out=f"blocks.{l}.mlp.hook_out", activation="topk", k=4,
                   W_skip=torch.randn(D, D, generator=g) * 0.05) for l in range(m.cfg.n_layers)])


def outcome(matrix: arch_matrix.Matrix, name: str, mode: str) -> str:
    try:
        m = matrix.model(name, mode)
    except ModelLoadError as err:
        return f"BOOT-FAIL {str(err)[:100]}"
    try:
        g = mi_lenses.attribution_graph(m, matrix.entry(name).tokens, transcoders(m), max_feature_nodes=None,
                                        progress=False)
    except VerificationError as err:
        return f"NOT-EXACT {str(err)[:140]}"
    except LensInputError as err:
        return f"REFUSED {str(err)[:140]}"
    return f"OK {g.layout.n_features} features"


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    matrix = arch_matrix.Matrix(_train_tokenizer(tempfile.mkdtemp()), tempfile.mkdtemp())
    for name in sys.argv[1:] or list(SPECS):
        for mode in ("raw", "compat"):
            print(f"{name:24s} {mode:6s} {outcome(matrix, name, mode)}", flush=True)


if __name__ == "__main__":
    main()
