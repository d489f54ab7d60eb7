#!/usr/bin/env bash
# The main job (README's first command): set up if needed, then run the text-to-image workflow headless
# in a real ComfyUI and print the saved PNG's path. Arguments go to scripts/run_workflow.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "${ZIMAGE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/run_workflow.py" "$@"
