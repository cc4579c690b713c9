#!/usr/bin/env bash
# One command for a fresh machine: set up, then run the logit lens of a prompt on the embedded SmolLM2,
# print it as a table and write out/logit_lens.html (offline) and out/logit_lens.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
mkdir -p out
mi-lenses logit-lens "${1:-The capital of France is}" --target "${2:- Paris}" \
  --html out/logit_lens.html --json out/logit_lens.json
