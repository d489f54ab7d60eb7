#!/usr/bin/env bash
# bench/bench_lora.py on the lent GPU machine (LoRA apply/remove on the full-size bf16 model, then fp8_fast).
# Prepare here first, once: `bash bench/prepare_device.sh` (carries .device/comfy_src and .whl).
#   run(command="bash bench/run_lora_device.sh", carry=[".device", ".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/zbench_lora_out}"
mkdir -p "$OUT"
[ -f .device/comfy_src/execution.py ] || { echo "no .device/comfy_src: run bench/prepare_device.sh here and carry .device" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/bench_lora.py --out "$OUT" "$@" 2>&1 | tee "$OUT/console_bf16.log"
python3 bench/bench_lora.py --out "$OUT" --weight-dtype fp8_e4m3fn_fast --reps 2 "$@" 2>&1 | tee "$OUT/console_fp8.log"
