#!/usr/bin/env bash
# Prepares, HERE (not on the GPU machine), the two ignored folders that bench/bench_lowvram.py needs carried
# to the lent GPU machine. Run from anywhere; idempotent. Both folders are in .gitignore.
#
#   .device/comfy_src   ComfyUI 0.3.75's Python source from .comfyui/ComfyUI (or $ZIMAGE_COMFYUI_DIR), without
#                       .git, tests, the API nodes and the tokenizers of other models (ComfyUI's Z-Image path
#                       and this pack only need comfy/text_encoders/qwen25_tokenizer).
#   .whl/               wheels of what ComfyUI imports at start-up and the GPU machine lacks (KINDS.md's list):
#                       torchsde 0.2.6 (comfy.k_diffusion.sampling imports it) and its dependency trampoline.
#                       PyAV (`av`, ~35 MB with FFmpeg) is NOT carried: bench_lowvram.py puts a stand-in on the
#                       path when `import av` fails (only ComfyUI's video/audio helpers use it).
#                       Everything else ComfyUI imports at boot is on the machine (aiohttp, yarl, pyyaml, Pillow,
#                       scipy, tqdm, psutil, safetensors, transformers, tokenizers, sentencepiece, einops,
#                       torchvision, torchaudio); missing optional ones (kornia, spandrel, pydantic, alembic,
#                       SQLAlchemy, the frontend package) only disable some of ComfyUI's extra nodes or are
#                       used by its server, which the headless bench does not start.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SRC="${ZIMAGE_COMFYUI_DIR:-$ROOT/.comfyui/ComfyUI}"
[ -f "$SRC/execution.py" ] || { echo "no ComfyUI at $SRC: run scripts/setup.sh first" >&2; exit 1; }

DST=.device/comfy_src
rm -rf "$DST"
mkdir -p "$DST"
tar -C "$SRC" -cf - \
  --exclude=./.git --exclude=./.github --exclude=./.ci --exclude=./tests --exclude=./tests-unit \
  --exclude=./comfy_api_nodes --exclude=./custom_nodes --exclude=./output --exclude=./input/3d \
  --exclude=./temp --exclude=./user --exclude=./.installed \
  --exclude='__pycache__' --exclude='*.pyc' \
  --exclude=./comfy/text_encoders/llama_tokenizer --exclude=./comfy/text_encoders/t5_tokenizer \
  --exclude=./comfy/text_encoders/t5_pile_tokenizer --exclude=./comfy/text_encoders/ace_lyrics_tokenizer \
  --exclude=./comfy/text_encoders/hydit_clip_tokenizer --exclude=./comfy/text_encoders/byt5_tokenizer \
  . | tar -C "$DST" -xf -
mkdir -p "$DST/custom_nodes"
grep -q '^__version__ = "0.3.75"' "$DST/comfyui_version.py" \
  || echo "warning: $DST is not ComfyUI 0.3.75 ($(cat "$DST/comfyui_version.py" 2>/dev/null | tail -1))" >&2

mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# diffusers (+ importlib_metadata, its one dependency the machine lacks): the reference in bench.py.
for spec in torchsde==0.2.6 trampoline==0.1.2 diffusers==0.42.1 importlib_metadata==10.2.0; do
  name="${spec%%==*}"
  if ! ls .whl/"$name"-"${spec##*==}"-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" -d .whl "$spec"
  fi
done

echo "prepared (carry both: \"carry\": [\".device\", \".whl\"]):"
du -sh .device/comfy_src .whl
ls .whl
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .device .whl | awk '{s+=$1} END {print s}')
untracked=$(git ls-files -z --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$(( tracked + ${untracked:-0} + carried ))
awk -v t="$tracked" -v u="${untracked:-0}" -v c="$carried" -v all="$total" 'BEGIN {
  m = 1048576; printf "working tree that travels: tracked %.1f MiB + untracked %.1f MiB + carried %.1f MiB = %.1f MiB (limit 64 MiB)\n", t/m, u/m, c/m, all/m }'
