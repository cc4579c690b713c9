#!/usr/bin/env bash
# One command: regenerate the gallery (docs/*.png, docs/terminal.svg: docs/report.md and the README's tour) from a
# report on the embedded SmolLM2, rendered offline in headless Chromium. Extra arguments go to scripts/screenshots.py
# (e.g. --lens DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh --test   # websocket-client drives the browser
.venv/bin/python scripts/screenshots.py "$@"
