#!/usr/bin/env bash
# The main job (README's first command): set up if needed, then run the text-to-image workflow headless
# in a real ComfyUI and print the saved PNG's path. Arguments go to scripts/run_workflow.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# --help, argument errors and a bad workflow file answer before any setup: that check needs only the
# standard library of the python that setup uses (exit 99: it printed --help, nothing more to do).
rc=0
ZIMAGE_RUN_CHECK_ONLY=1 "${PYTHON:-python3}" "$ROOT/scripts/run_workflow.py" "$@" || rc=$?
case "$rc" in
  0) ;;
  99) exit 0 ;;
  *) exit "$rc" ;;
esac
"$ROOT/scripts/setup.sh"
exec "${ZIMAGE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/run_workflow.py" "$@"
