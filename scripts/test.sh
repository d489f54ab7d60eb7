#!/usr/bin/env bash
# The test command (README, CI). Sets up the environment if needed (scripts/setup.sh and, for the browser
# tests, scripts/setup_browser.sh; both idempotent), then:
#   1. the whole suite under ComfyUI 0.3.75  (.venv, .comfyui/ComfyUI)
#   2. the tests that use ComfyUI (tests/test_comfy_*.py and those reaching ComfyUI through
#      tests/comfyui_reference.py; pytest's --comfyui-only, see tests/comfy_pytest_plugin.py) again under
#      ComfyUI 0.18.1  (.venv-comfyui-0.18.1, .comfyui/ComfyUI-0.18.1)
#   3. and again under ComfyUI 0.28.0  (.venv-comfyui-0.28.0, .comfyui/ComfyUI-0.28.0)
# Extra arguments go to every pytest run. Exits non-zero if any run fails or runs no test at all.
# ZIMAGE_COMFYUI_VERSIONS="0.3.75 0.28.0" (any of the three) runs those only. CI (CI=true) runs CI_VERSIONS:
# 0.3.75 and today's 0.28.0; 0.18.1 is left to local runs: a third ComfyUI run would take CI to an estimated
# 24-30 minutes on the 2-core machine (README, "Tests"). The summary at the end gives each run's time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CI_VERSIONS="0.3.75 0.28.0"
VERSIONS="${ZIMAGE_COMFYUI_VERSIONS:-0.3.75 0.18.1 0.28.0}"
if [ -n "${CI:-}" ]; then VERSIONS="$CI_VERSIONS"; fi
t_setup=$SECONDS
# shellcheck disable=SC2086  # word splitting of the version list is intended
"$ROOT/scripts/setup.sh" $VERSIONS
# Chromium, node and puppeteer-core for the browser tests (tests only: the main job never needs them).
"$ROOT/scripts/setup_browser.sh"
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
summary=("setup (ComfyUI versions, browser tools, Triton): $((SECONDS - t_setup)) s")

# run_pytest LABEL PYTHON COMFYUI_DIR [pytest args...]
run_pytest() {
  local label="$1" python="$2" comfyui="$3"; shift 3
  log "ComfyUI $label: $python -m pytest -q $*  (ZIMAGE_COMFYUI_DIR=$comfyui)"
  local rc=0 t0=$SECONDS
  ZIMAGE_COMFYUI_DIR="$comfyui" "$python" -m pytest -q "$@" || rc=$?
  local took="$((SECONDS - t0)) s"
  if [ "$rc" -eq 5 ]; then  # pytest's "no tests collected/selected"
    if [ "$label" != 0.3.75 ] && [ "$user_args" -gt 0 ] && [ "$ran_0375" = yes ]; then
      summary+=("ComfyUI $label: no test that uses ComfyUI is among the selected tests (pytest exit 5, $took)")
      return
    fi
    summary+=("ComfyUI $label: FAILED: pytest ran no test (exit 5, $took)")
    status=1
    return
  fi
  if [ "$rc" -ne 0 ]; then
    summary+=("ComfyUI $label: FAILED (pytest exit $rc, $took)")
    status=1
  else
    summary+=("ComfyUI $label: ok ($took)")
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
    0.28.0)
      run_pytest 0.28.0 "$ROOT/.venv-comfyui-0.28.0/bin/python" "$ROOT/.comfyui/ComfyUI-0.28.0" --comfyui-only "$@" ;;
  esac
done
for line in "${summary[@]}"; do log "$line"; done
exit "$status"
