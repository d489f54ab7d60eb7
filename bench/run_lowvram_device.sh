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
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/zbench_lowvram_out}"
mkdir -p "$OUT"
[ -f .device/comfy_src/execution.py ] || { echo "no .device/comfy_src: run bench/prepare_device.sh here and carry .device" >&2; exit 2; }
ls .whl/torchsde-*.whl >/dev/null 2>&1 || { echo "no .whl/torchsde wheel: run bench/prepare_device.sh and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, '| transformers', transformers.__version__, '| safetensors', safetensors.__version__)"
df -h /tmp | tail -1
free -g | head -2
python3 bench/bench_lowvram.py --out "$OUT" "$@" 2>&1 | tee "$OUT/console.log"
