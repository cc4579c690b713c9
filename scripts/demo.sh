#!/usr/bin/env bash
# One command for a fresh machine: set up, then the report of a prompt on the embedded SmolLM2: every lens, the
# direct logit attribution and the attention views on one offline page (out/report.html, plus out/report.json),
# and its summary in the terminal.
#   bash scripts/demo.sh ["PROMPT" [" ANSWER" [" WRONG"]]]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
mkdir -p out
args=("${1:-The capital of France is}" --out out/report.html --json out/report.json)
[ -n "${2:-}" ] && args+=(--answer "$2")
[ -n "${3:-}" ] && args+=(--wrong "$3")
mi-lenses report "${args[@]}"
echo "open $(pwd)/out/report.html in a browser (it works offline)"
