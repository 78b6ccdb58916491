#!/usr/bin/env bash
# Drift check: the test suite on the newest releases our dependencies' compatibility ranges allow
# (scripts/latest_requirements.py: same major, same minor for 0.x; torch and triton stay at the
# lock), in a fresh venv, so a breaking release is found here before a user installs it.
#
#   scripts/check_latest.sh [VENV_DIR] [pytest args...]     (default /tmp/quasar-latest)
#
# Prints which packages resolve newer than requirements.lock, runs the suite, and leaves the
# resolved versions in VENV_DIR/latest.lock: a candidate lock (README, "Updating the tested stack").
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/quasar-latest}
shift || true
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
python scripts/latest_requirements.py > "$venv/latest.txt"
pip install -q torch==2.13.0 -r "$venv/latest.txt"
pip install -q --no-deps -e ".[dev]"
pip check
pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' > "$venv/latest.lock"
echo "== newer than requirements.lock:"
python - "$venv/latest.lock" <<'PY'
import sys
from eval.stack import read_lock
locked, latest = read_lock("requirements.lock"), read_lock(sys.argv[1])
moved = [f"  {n}: {locked.get(n, '(new)')} -> {v}" for n, v in sorted(latest.items()) if locked.get(n) != v]
print("\n".join(moved) if moved else "  nothing: the lock is the newest stack")
PY
python -m pytest -q -m "slow or not slow" "$@"
TRITON_INTERPRET=1 python -m pytest -q tests/interpret
