#!/usr/bin/env bash
# Prepares, HERE (not on the GPU machine), the two ignored folders that bench/bench_lowvram.py needs carried
# to the lent GPU machine. Run from anywhere; idempotent. All these folders are in .gitignore.
#
#   bash bench/prepare_device.sh            ComfyUI 0.3.75 (the default ComfyUI of the benches):
#   .device/comfy_src   ComfyUI 0.3.75's Python source from .comfyui/ComfyUI (or $ZIMAGE_COMFYUI_DIR), without
#                       .git, tests, the API nodes and the tokenizers of other models (ComfyUI's Z-Image path
#                       and this pack only need comfy/text_encoders/qwen25_tokenizer).
#   .whl/               wheels of what ComfyUI imports at start-up and the GPU machine lacks (KINDS.md's list):
#                       torchsde 0.2.6 (comfy.k_diffusion.sampling imports it) and its dependency trampoline;
#                       gguf 0.19.0 (the GGUF reader of zimage_core; pure Python, needs numpy and pyyaml).
#                       PyAV (`av`, ~35 MB with FFmpeg) is NOT carried: bench_lowvram.py puts a stand-in on the
#                       path when `import av` fails (only ComfyUI's video/audio helpers use it).
#                       Everything else ComfyUI imports at boot is on the machine (aiohttp, yarl, pyyaml, Pillow,
#                       scipy, tqdm, psutil, safetensors, transformers, tokenizers, sentencepiece, einops,
#                       torchvision, torchaudio); missing optional ones (kornia, spandrel, pydantic, alembic,
#                       SQLAlchemy, the frontend package) only disable some of ComfyUI's extra nodes or are
#                       used by its server, which the headless bench does not start.
#
#   bash bench/prepare_device.sh 0.28.0     ComfyUI 0.28.0 (dynamic VRAM), beside the above:
#   .device/comfy_src-0.28.0   from .comfyui/ComfyUI-0.28.0 (scripts/setup.sh 0.28.0), the same files left out
#   .whl-0.28.0/        torchsde + trampoline as above, comfy-aimdo 0.4.10 (dynamic VRAM; comfy.model_management
#                       imports it), comfy-kitchen 0.2.22 (its quantised layers; ~29 MB), and the small packages
#                       0.28 imports at start-up that the machine lacks: simpleeval, blake3, SQLAlchemy and
#                       pydantic (+ pydantic_core, annotated_types, typing_inspection and typing_extensions
#                       >= 4.16, newer than the machine may have) for its asset code, which the server imports
#                       (found with the CPU smoke run, which hides what KINDS.md's list lacks). Not carried:
#                       alembic (database migrations: main.py only), kornia/spandrel/PyOpenGL (extra nodes).
#   Carry: ".device/comfy_src-0.28.0" and ".whl-0.28.0" (about 52 MiB with the checkout; the limit is 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VERSION="${1:-0.3.75}"
case "$VERSION" in
  0.3.75) SRC="${ZIMAGE_COMFYUI_DIR:-$ROOT/.comfyui/ComfyUI}"; DST=.device/comfy_src; WHL=.whl
          WHEELS=(torchsde==0.2.6 trampoline==0.1.2 diffusers==0.42.1 importlib_metadata==10.2.0 gguf==0.19.0) ;;
  0.28.0) SRC="${ZIMAGE_COMFYUI_DIR:-$ROOT/.comfyui/ComfyUI-0.28.0}"; DST=.device/comfy_src-0.28.0; WHL=.whl-0.28.0
          WHEELS=(torchsde==0.2.6 trampoline==0.1.2 comfy-aimdo==0.4.10 comfy-kitchen==0.2.22 simpleeval==1.0.8
                  blake3==1.0.11 SQLAlchemy==2.1.9 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
                  typing_inspection==0.4.5 typing_extensions==4.16.0 gguf==0.19.0) ;;
  *) echo "prepare_device.sh: unknown ComfyUI version '$VERSION' (0.3.75 or 0.28.0)" >&2; exit 2 ;;
esac
[ -f "$SRC/execution.py" ] || { echo "no ComfyUI at $SRC: run scripts/setup.sh $VERSION first" >&2; exit 1; }

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
  --exclude=./comfy/text_encoders/qwen35_tokenizer --exclude=./blueprints \
  . | tar -C "$DST" -xf -
mkdir -p "$DST/custom_nodes"
grep -q "^__version__ = \"$VERSION\"" "$DST/comfyui_version.py" \
  || echo "warning: $DST is not ComfyUI $VERSION ($(cat "$DST/comfyui_version.py" 2>/dev/null | tail -1))" >&2

mkdir -p "$WHL"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# 0.3.75: diffusers (+ importlib_metadata, its one dependency the machine lacks): the reference in bench.py.
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; file="${name//-/_}"
  if ! ls "$WHL"/{"$name","$file","${file,,}"}-"${spec##*==}"-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" --platform manylinux_2_24_x86_64 --platform manylinux_2_12_x86_64 -d "$WHL" "$spec"
  fi
done

echo "prepared (carry both: \"carry\": [\"$DST\", \"$WHL\"]):"
du -sh "$DST" "$WHL"
ls "$WHL"
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb "$DST" "$WHL" | awk '{s+=$1} END {print s}')
untracked=$(git ls-files -z --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$(( tracked + ${untracked:-0} + carried ))
awk -v t="$tracked" -v u="${untracked:-0}" -v c="$carried" -v all="$total" 'BEGIN {
  m = 1048576; printf "working tree that travels: tracked %.1f MiB + untracked %.1f MiB + carried %.1f MiB = %.1f MiB (limit 64 MiB)\n", t/m, u/m, c/m, all/m }'
