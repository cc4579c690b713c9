#!/usr/bin/env bash
# Drift check (not part of CI's gate): the whole suite in .venv-drift, with the newest versions pyproject.toml allows
# instead of the lock (torch stays at the 2.13.0 CPU wheel). Prints every package whose version differs from
# requirements/lock.txt, then the suite's result. Extra arguments go to pytest (e.g. -m "not slow").
# If it passes, `bash scripts/lock.sh` moves the lock forward; if not, the lock keeps CI on the versions that pass.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MI_LENSES_LOCK=off MI_LENSES_VENV=.venv-drift bash scripts/setup.sh --test
.venv-drift/bin/pip freeze --exclude-editable | sed -e 's/+cpu$//' | .venv-drift/bin/python -c '
import sys
lock = dict(l.strip().split("==", 1) for l in open("requirements/lock.txt") if "==" in l and not l.startswith("#"))
now = dict(l.strip().split("==", 1) for l in sys.stdin if "==" in l)
moved = sorted((n, lock.get(n, "-"), v) for n, v in now.items() if lock.get(n) != v)
gone = sorted(set(lock) - set(now))
print(f"drift: {len(moved)} packages differ from requirements/lock.txt" + (":" if moved or gone else ""))
for n, old, new in moved:
    print(f"  {n}: {old} -> {new}")
for n in gone:
    print(f"  {n}: {lock[n]} -> (not installed)")
'
status=0
.venv-drift/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
echo "drift: the suite on the newest versions exited with status $status ($( [ $status = 0 ] && echo passed || echo FAILED))"
exit $status
