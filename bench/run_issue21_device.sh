#!/usr/bin/env bash
# Issue 21 (the fastest Z-Image on Hopper) on the lent GPU machine: every figure of the issue in ONE command of
# at most ~9 minutes. Prepare the carried (git-ignored) folders HERE first, once:
#   bash bench/prepare_device.sh            # .device/comfy_src (ComfyUI 0.3.75) and .whl/ (diffusers 0.42.1, ...)
#   .whl-h21/: nvidia-cudnn-frontend 1.14.1 (1.8 MB; the cuDNN fp8 attention backend), see RESULTS.md
#
#   run(command="bash bench/run_issue21_device.sh", carry=[".device/comfy_src", ".whl", ".whl-h21"], timeout_s=600)
#
# Three processes, each with its own time limit, each writing its JSON under $OUT after every stage:
#  A. bench.py (1024², batch 1): kernel correctness (fused kernels, fused fp8 quantisation, fp8 attention),
#     attention backends (time, error vs fp32), CUDA-graph check (replay == eager, recapture on weight swap),
#     step + 8-step times for ours eager / graph / compile in bf16 and fp8 (+ fused activation quantisation),
#     ComfyUI eager / compiled in bf16 and fp8_e4m3fn_fast, the 8-step fp8 error of every fp8 variant against
#     bf16 (same noise, same loop), end to end (encode + 8 steps + decode), profiles.
#  B. bench_nodes.py: 8 steps through ComfyUI's sampler loop on our MODEL vs zimage_core directly, with and
#     without whole-step graphs, the compile node, and where the host waits for the GPU in a node run.
#  C. bench.py warmup: the first image in a fresh process with the default (eager + graphs) path, cold Triton
#     cache.
# Then bench/targets.py prints the issue's table from the JSON files (also $OUT/targets_issue21.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/zbench_issue21_out}"
mkdir -p "$OUT"
T0=$(date +%s)
[ -d .device/comfy_src/comfy ] || { echo "no .device/comfy_src: run bench/prepare_device.sh here and carry .device" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(ls .whl-h21/*.whl 2>/dev/null) || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', torch.backends.cudnn.version())"
python3 -c "import cudnn; print('cudnn-frontend', cudnn.__version__, 'backend', cudnn.backend_version())" 2>&1 | tail -1
left() { echo $(( ${1} - ($(date +%s) - T0) )); }

# A. one process, 1024² batch 1; the most important variants first (a time-out keeps what is done)
IMPLS="ours,ours+graph,ours+fp8,ours+fp8+graph,ours+fp8+fp8q,ours+fp8+fp8q+graph,comfy,comfy+fp8fast"
IMPLS="$IMPLS,ours+compile,ours+fp8+compile,comfy+compile,comfy+fp8fast+compile,ours+attn=cudnn_fp8,ours+fp8+fp8q+attn=cudnn_fp8+graph"
timeout $(left 400) python3 bench/bench.py --out "$OUT" --tag issue21 \
  --only kernels,attn,graphs,fp8err,dit,e2e,profile,e2e_base --impls ours,comfy --impl-list "$IMPLS" \
  --e2e-base-impls ours+graph,comfy \
  --e2e-impls ours,ours+graph,ours+compile,ours+fp8+graph,ours+fp8+fp8q+graph,ours+fp8+compile,comfy,comfy+compile,comfy+fp8fast \
  --profile-impls ours,ours+graph,ours+fp8+graph,ours+fp8+fp8q+graph,comfy+fp8fast+compile,ours+attn=cudnn_fp8 \
  --sizes 1024 --batch 1 --reps 10 2>&1 | tee "$OUT/issue21_a.log" | grep -v "^\s*[0-9.]* ms  x"
echo "== A done after $(( $(date +%s) - T0 )) s"

# B. the node path (graphs are on by default on CUDA; the script also times them off)
ZIMAGE_COMPILE_CACHE=off timeout $(left 500) python3 bench/bench_nodes.py --size 1024 --reps 3 --no-vae --out "$OUT/bench_nodes_issue21.json" \
  2>&1 | tail -40
echo "== B done after $(( $(date +%s) - T0 )) s"

# C. first image in a fresh process, default path (eager + CUDA graphs, plain VAE), cold Triton cache
rm -rf /tmp/ztri_first && TRITON_CACHE_DIR=/tmp/ztri_first timeout $(left 560) python3 bench/bench.py --out "$OUT" \
  --tag first_graph --only warmup --first-image --warmup-impl graph --e2e-vae "" --sizes 1024 2>&1 | tail -4
echo "== C done after $(( $(date +%s) - T0 )) s"

python3 bench/targets.py --issue 21 "$OUT"/bench_issue21.json "$OUT"/bench_first_graph.json \
  "$OUT"/bench_nodes_issue21.json --md "$OUT/targets_issue21.md"
echo "== all done in $(( $(date +%s) - T0 )) s"
