#!/usr/bin/env bash
# bench/bench_lowvram.py on the lent GPU machine. The device tool runs this in the repo root of a copy of the
# working tree, with $OUT as the folder that comes back. Prepare the two carried (git-ignored) folders HERE
# first, once: `bash bench/prepare_device.sh` (.device/comfy_src ≈ 11 MB, .whl ≈ 0.1 MB).
#
# Full matrix (2 impls × 2 modes × 4 limits = 16 configs) in two commands of ≤ 10 min each:
#   run(command="bash bench/run_lowvram_device.sh --impls ours",   carry=[".device", ".whl"], timeout_s=600)
#   run(command="bash bench/run_lowvram_device.sh --impls native", carry=[".device", ".whl"], timeout_s=600)
# One command instead (8 configs: both impls, both modes, 8 GiB and resident):
#   run(command="bash bench/run_lowvram_device.sh --limits 8,resident", carry=[".device", ".whl"], timeout_s=600)
# Any bench_lowvram.py option can follow (--configs ours:default:8,native:lowvram:8 --reps 2 ...).
# Each command writes its own random model files (~20.7 GB, into /tmp/zbench_models) unless a warm machine
# still has them; the bench stops starting configs when its --budget (570 s) runs out and prints the table.
#
# ComfyUI 0.28.0 (dynamic VRAM on, as its main.py does by default on NVIDIA): `bash bench/prepare_device.sh
# 0.28.0` here first, then e.g.
#   run(command="ZBENCH_COMFY=0.28.0 bash bench/run_lowvram_device.sh --modes default --limits resident,8",
#       carry=[".device/comfy_src-0.28.0", ".whl-0.28.0"], timeout_s=600)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/zbench_lowvram_out}"
mkdir -p "$OUT"
case "${ZBENCH_COMFY:-0.3.75}" in
  0.3.75) SRC=.device/comfy_src; WHL=.whl ;;
  0.28.0) SRC=.device/comfy_src-0.28.0; WHL=.whl-0.28.0 ;;
  *) echo "ZBENCH_COMFY: 0.3.75 or 0.28.0" >&2; exit 2 ;;
esac
[ -f "$SRC/execution.py" ] || { echo "no $SRC: run bench/prepare_device.sh ${ZBENCH_COMFY:-} here and carry $SRC" >&2; exit 2; }
ls "$WHL"/torchsde-*.whl >/dev/null 2>&1 || { echo "no $WHL/torchsde wheel: run bench/prepare_device.sh ${ZBENCH_COMFY:-} and carry $WHL" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, '| transformers', transformers.__version__, '| safetensors', safetensors.__version__)"
df -h /tmp | tail -1
free -g | head -2
python3 bench/bench_lowvram.py --out "$OUT" --comfyui-dir "$SRC" --wheel-dir "$WHL" "$@" 2>&1 | tee "$OUT/console.log"
