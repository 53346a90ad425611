#!/usr/bin/env bash
# Stages what bench/vllm/gpu.sh needs on the GPU machine (no Rust, no registry there), all in
# folders git ignores: .device (release prefixd and prefixctl, the prefixd wheel, a CUDA UCX,
# pytest, the model writer), .device-vllm/p1..p3 (vLLM 0.26.0, ../shared/device/stage-vllm.sh)
# and .device-nixl (NIXL 1.5.1, for vLLM's own P/D baseline). Each call may carry 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in .device .device-vllm .device-nixl; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
cargo build --release --quiet -p prefixd-server -p prefixd-client --bins
mkdir -p .device/wheel .device/whl .device-nixl
[[ -x .device/ucx/bin/ucx_perftest ]] || ../shared/device/stage-ucx.sh .device/ucx
cp target/release/prefixd target/release/prefixctl .device/
strip .device/prefixd .device/prefixctl 2>/dev/null || true
cp ../shared/device/mkmodel.py .device/
rm -f .device/wheel/*.whl
python3 -m pip wheel --quiet --no-deps ./python -w .device/wheel
ls .device/whl/pytest-*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps -d .device/whl \
  pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0
[[ -d .device-vllm/p1 ]] || ../shared/device/stage-vllm.sh .device-vllm
ls .device-nixl/nixl*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps -d .device-nixl \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any nixl-cu13==1.5.1 nixl==1.5.1
du -sh .device .device-vllm/p* .device-nixl
