#!/usr/bin/env bash
# Stages what examples/disagg/gpu.sh needs on the GPU machine (no Rust, no registry there) into
# .device/ (ignored by git): release prefixd, the prefixd wheel (abi3: Python 3.11 here, 3.12
# there), a CUDA-enabled UCX, and pytest's wheels for the package's own tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
cargo build --release --quiet -p prefixd-server
mkdir -p .device/wheel .device/whl
[[ -x .device/ucx/bin/ucx_perftest ]] || ../shared/device/stage-ucx.sh .device/ucx
cp target/release/prefixd .device/
strip .device/prefixd 2>/dev/null || true
rm -f .device/wheel/*.whl
python3 -m pip wheel --quiet --no-deps ./python -w .device/wheel
ls .device/whl/pytest-*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps -d .device/whl \
  pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0
du -sh .device
