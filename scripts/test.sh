#!/usr/bin/env bash
# The test command (README, CI). Sets up the environment if needed (scripts/setup.sh, idempotent), then:
#   1. the whole suite under ComfyUI 0.3.75  (.venv, .comfyui/ComfyUI)
#   2. the tests that use ComfyUI (tests/test_comfy_*.py and those reaching ComfyUI through
#      tests/comfyui_reference.py; pytest's --comfyui-only, see tests/comfy_pytest_plugin.py) again under
#      ComfyUI 0.18.1  (.venv-comfyui-0.18.1, .comfyui/ComfyUI-0.18.1)
# Extra arguments go to both pytest runs. Exits non-zero if either run fails or runs no test at all.
# ZIMAGE_COMFYUI_VERSIONS="0.3.75" (or "0.18.1") runs one of the two (not in CI: it always runs both).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSIONS="${ZIMAGE_COMFYUI_VERSIONS:-0.3.75 0.18.1}"
if [ -n "${CI:-}" ]; then VERSIONS="0.3.75 0.18.1"; fi
# shellcheck disable=SC2086  # word splitting of the version list is intended
"$ROOT/scripts/setup.sh" $VERSIONS
cd "$ROOT"

# Triton, for the fused-kernel tests through its CPU interpreter (tests/test_kernels.py runs them in a child
# process with this folder on its path; the CPU torch wheel has no Triton, and Triton 3.6's interpreter needs
# numpy < 2.4). Tests only: the main job never needs it.
TRITON_DIR="$ROOT/.triton"
if [ ! -f "$TRITON_DIR/.installed-3.6.0" ]; then
  printf '[test] installing Triton 3.6.0 (CPU interpreter) into %s\n' "$TRITON_DIR" >&2
  rm -rf "$TRITON_DIR"
  "${ZIMAGE_VENV:-$ROOT/.venv}/bin/python" -m pip -q --disable-pip-version-check install --no-deps \
    --target "$TRITON_DIR" triton==3.6.0 numpy==2.3.5
  touch "$TRITON_DIR/.installed-3.6.0"
fi
export ZIMAGE_TRITON_PATH="${ZIMAGE_TRITON_PATH:-$TRITON_DIR}"

log() { printf '[test] %s\n' "$*" >&2; }
status=0
summary=()

# run_pytest LABEL PYTHON COMFYUI_DIR [pytest args...]
run_pytest() {
  local label="$1" python="$2" comfyui="$3"; shift 3
  log "ComfyUI $label: $python -m pytest -q $*  (ZIMAGE_COMFYUI_DIR=$comfyui)"
  local rc=0
  ZIMAGE_COMFYUI_DIR="$comfyui" "$python" -m pytest -q "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then  # pytest's "no tests collected/selected"
    if [ "$label" = 0.18.1 ] && [ "$user_args" -gt 0 ] && [ "$ran_0375" = yes ]; then
      summary+=("ComfyUI $label: no test that uses ComfyUI is among the selected tests (pytest exit 5)")
      return
    fi
    summary+=("ComfyUI $label: FAILED: pytest ran no test (exit 5)")
    status=1
    return
  fi
  if [ "$rc" -ne 0 ]; then
    summary+=("ComfyUI $label: FAILED (pytest exit $rc)")
    status=1
  else
    summary+=("ComfyUI $label: ok")
  fi
}

user_args=$#
ran_0375=no
for version in $VERSIONS; do
  case "$version" in
    0.3.75)
      run_pytest 0.3.75 "${ZIMAGE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/.comfyui/ComfyUI" "$@"
      [[ "${summary[-1]}" == *"ran no test"* ]] || ran_0375=yes ;;
    0.18.1)
      run_pytest 0.18.1 "$ROOT/.venv-comfyui-0.18.1/bin/python" "$ROOT/.comfyui/ComfyUI-0.18.1" --comfyui-only "$@" ;;
  esac
done
for line in "${summary[@]}"; do log "$line"; done
exit "$status"
