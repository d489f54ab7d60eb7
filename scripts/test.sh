#!/usr/bin/env bash
# The test command (README, CI): set up the environment if needed (idempotent), then run the suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${ZIMAGE_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
