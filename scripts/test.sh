#!/usr/bin/env bash
# The README's test command: install (cached) and run the test suite against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${EXPORTER_VENV:-}" ] || eval "$(bash scripts/setup.sh)"
# `pytest` (not `python -m pytest`) so the installed package is tested, not the source tree.
exec "$EXPORTER_VENV/bin/pytest" -p no:cacheprovider "$@"
