#!/usr/bin/env bash
# One command for a fresh machine: the whole test suite (with doctests) in the TransformerLens 4.x environment
# (.venv), then the both-worlds part (tests/test_worlds.py, tiny models and SmolLM2) in a TransformerLens 3.9
# environment (.venv-tl3), compared number by number with the 4.x run. Extra arguments go to the first pytest run;
# MI_LENSES_SKIP_TL3=1 skips the second environment. circuit-tracer 0.5.0 gets its own environment (.venv-ct, the
# attribution graphs' oracle; MI_LENSES_SKIP_CT=1 skips it). After the suite, the docs site is built with
# `mkdocs build --strict` (a broken link, anchor or API reference fails). The browser test needs Chromium: installed here from Debian's
# `chromium` package when it is missing and this machine can (root with apt-get); with CI=true a missing browser
# fails that test, elsewhere it is skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
refs="${MI_LENSES_WORLD_REFS:-$(mktemp -d)}"
export MI_LENSES_WORLD_REFS="$refs"
bash scripts/setup.sh --test
# circuit-tracer 0.5.0 in its own environment: the attribution graphs' oracle (tests/test_graphs.py)
[ "${MI_LENSES_SKIP_CT:-0}" = "1" ] || bash scripts/setup.sh --ct
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (the browser test opens the report in it)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null \
    || echo "could not install chromium: the browser test will say so"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
echo "docs site: mkdocs build --strict passed"
if [ "${MI_LENSES_SKIP_TL3:-0}" != "1" ]; then
  bash scripts/setup.sh --tl3
  .venv-tl3/bin/python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_worlds.py
fi
