#!/usr/bin/env bash
# On the GPU machine (2 GPUs), from the repo root after examples/disagg/stage.sh here:
#   bash examples/disagg/gpu.sh [MODEL...]     (default: qwen3-small qwen3-4b)
# Runs the Python package's tests (CUDA cases included), then examples/disagg/run.py for each
# model: correctness, TTFT pulled vs recomputed, concurrent throughput. Results land in
# ${OUT:-/tmp/disagg}; set STEPS to run fewer steps, PYTEST=0 to skip the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/disagg}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device/ucx/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheel/*.whl
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 -c 'import prefixd, torch, transformers; print("prefixd", prefixd.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'
status=0
if [[ ${PYTEST:-1} != 0 ]]; then
  PREFIXD_BIN=$PWD/.device/prefixd python3 -m pytest -q -p no:cacheprovider python/tests > "$out/pytest.log" 2>&1 || status=1
  tail -5 "$out/pytest.log"
fi
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(qwen3-small qwen3-4b)
for m in "${models[@]}"; do
  echo "== $m"
  python3 examples/disagg/run.py --model "$m" --out "/tmp/disagg-$m" --prefixd-bin .device/prefixd \
    --steps "${STEPS:-correctness,ttft,concurrent}" ${RUN_ARGS:-} || status=1
  cp "/tmp/disagg-$m/results.md" "$out/$m.md" 2>/dev/null || true
  cp "/tmp/disagg-$m/results.json" "$out/$m.json" 2>/dev/null || true
  tar -czf "$out/$m-logs.tgz" -C /tmp "disagg-$m" --exclude reference_input.json 2>/dev/null || true
done
exit $status
