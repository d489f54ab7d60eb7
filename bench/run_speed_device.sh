#!/usr/bin/env bash
# Issue 12 (speed) on the lent GPU machine, in two commands of about 5-6 minutes each. Prepare the carried
# (git-ignored) folders HERE first, once: `bash bench/prepare_device.sh` (ComfyUI 0.3.75 source in .device/,
# wheels of torchsde, trampoline, diffusers 0.42.1 and importlib_metadata in .whl/).
#
#   run(command="bash bench/run_speed_device.sh 1", carry=[".device", ".whl"], timeout_s=540)
#   run(command="bash bench/run_speed_device.sh 2", carry=[".device", ".whl"], timeout_s=540)
#
# Part 1, 1024² batch 1, one process: the kernel check first (fused vs torch path vs float64 on the GPU,
#   fp8 attention vs cuDNN), then ours eager with and without the fused kernels, ours compiled, ComfyUI eager
#   and compiled, diffusers eager, fp8 weights (+ fp8 attention) compiled: steps and 8-step denoise, accuracy
#   (fp32 reference, fp8 vs bf16 over 8 steps), profiles, end to end.
# Part 2: batch/size scaling (512²..2048², batch 1 and 4, MFU), the first image in a fresh process with the
#   compile cache cold then warm (each run with its own empty inductor/Triton caches, so only the saved
#   artifacts help the warm one), and the node path against zimage_core (bench_nodes.py).
# Each part ends with bench/targets.py's tables (also $OUT/targets_<part>.md); feed both parts' JSON files to
# `python3 bench/targets.py <files>` for one table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART="${1:-1}"
OUT="${OUT:-/tmp/zbench_speed_out}"
mkdir -p "$OUT"
[ -d .device/comfy_src/comfy ] || { echo "no .device/comfy_src: run bench/prepare_device.sh here and carry .device" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
B="python3 bench/bench.py --out $OUT"
T0=$(date +%s)
if [ "$PART" = 1 ]; then
  $B --only kernels,env,dit,parity,profile,e2e --impls ours,comfy,diffusers --compile ours,comfy --nofuse \
     --fp8 --fp8-attn --sizes 1024 --batch 1 --tag speed1 2>&1 | tee "$OUT/speed1.log"
  python3 bench/targets.py "$OUT"/bench_speed1.json --md "$OUT/targets_1.md"
else
  $B --only dit --impls ours,comfy --compile ours --sizes 512,1024,1536,2048 --batch 1,4 --big --steps 0 \
     --reps 6 --tag scaling 2>&1 | tee "$OUT/scaling.log"
  echo "== part 2 scaling done after $(( $(date +%s) - T0 )) s"
  rm -rf /tmp/zcc /tmp/zind_cold /tmp/zind_warm /tmp/ztri_cold /tmp/ztri_warm
  TORCHINDUCTOR_CACHE_DIR=/tmp/zind_cold TRITON_CACHE_DIR=/tmp/ztri_cold \
    $B --only warmup --first-image --compile-cache /tmp/zcc --sizes 1024 --tag first_cold 2>&1 | tee "$OUT/first_cold.log"
  ls -la /tmp/zcc || true
  TORCHINDUCTOR_CACHE_DIR=/tmp/zind_warm TRITON_CACHE_DIR=/tmp/ztri_warm \
    $B --only warmup --first-image --compile-cache /tmp/zcc --sizes 1024 --tag first_warm 2>&1 | tee "$OUT/first_warm.log"
  echo "== part 2 first images done after $(( $(date +%s) - T0 )) s"
  ZIMAGE_COMPILE_CACHE=off python3 bench/bench_nodes.py --size 1024 --out "$OUT/bench_nodes_1024.json" 2>&1 | tail -30
  python3 bench/targets.py "$OUT"/bench_scaling.json "$OUT"/bench_first_*.json "$OUT"/bench_nodes_1024.json \
    --md "$OUT/targets_2.md"
fi
echo "== part $PART done in $(( $(date +%s) - T0 )) s"
