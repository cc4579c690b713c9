#!/usr/bin/env bash
# One command for a fresh machine: set up (with the test oracles), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
