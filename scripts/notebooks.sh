#!/usr/bin/env bash
# One command: (re)generate the tutorial notebooks tutorials/NN_*.ipynb from their sources tutorials/NN_*.py, each
# executed in a fresh Jupyter kernel on the embedded SmolLM2, outputs and views saved (scripts/notebooks.py).
#   bash scripts/notebooks.sh            # every tutorial (a few minutes on 2 cores)
#   bash scripts/notebooks.sh 07         # only tutorials/07_*.py
#   bash scripts/notebooks.sh --check    # execute and compare with the saved notebooks; writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh --test
.venv/bin/python scripts/notebooks.py "$@"
