#!/usr/bin/env bash
# Issue 23 on a lent several-GPU machine: Ulysses sequence parallelism and data parallelism of the full
# transformer (bench/bench_parallel.py, torchrun + NCCL), G = 1 (baseline) and G = 2, 4, 8 as the machine
# has GPUs. Nothing to carry (torch only; random weights built on each GPU). One call per G keeps each under
# the 10-minute command limit, all on the same warm machine so the G = 1 baseline is the same card:
#
#   run(kind="nvidia-h100-x8", command="bash bench/run_parallel_device.sh 1", timeout_s=600)
#   run(kind="nvidia-h100-x8", command="bash bench/run_parallel_device.sh 2", timeout_s=600)
#   run(kind="nvidia-h100-x8", command="bash bench/run_parallel_device.sh 4", timeout_s=600)
#   run(kind="nvidia-h100-x8", command="bash bench/run_parallel_device.sh 8", timeout_s=600)
#   run(kind="nvidia-h100-x8", command="bash bench/run_parallel_device.sh summary", timeout_s=120)
#
# (x4 or x2 machines: drop the G they lack.) Results: $OUT/parallel_G<G>.json and $OUT/parallel_summary.md;
# each G's files also stay in /tmp/zbench_parallel_out on the machine, for the summary call.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
G="${1:?usage: run_parallel_device.sh G|summary}"
KEEP=/tmp/zbench_parallel_out
mkdir -p "$KEEP" "${OUT:-/tmp/zbench_parallel_out}"
if [ "$G" = summary ]; then
  python3 bench/bench_parallel.py --summarize "$KEEP"/parallel_G*.json | tee "${OUT:-$KEEP}/parallel_summary.md"
  cp "$KEEP"/parallel_G*.json "${OUT:-$KEEP}/" 2>/dev/null || true
  exit 0
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# NVLink multicast stays off (KINDS.md): set again here in case the environment was reset.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
torchrun --standalone --nproc-per-node="$G" bench/bench_parallel.py --out "$KEEP" --repeats 2
cp "$KEEP/parallel_G$G.json" "${OUT:-$KEEP}/" 2>/dev/null || true
