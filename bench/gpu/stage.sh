#!/usr/bin/env bash
# Builds the release binaries here and stages them with a CUDA-enabled UCX into .device/ (ignored
# by git), for `run` with carry [".device"] and the command `bash bench/gpu/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
cargo build --release --quiet -p prefixd-server -p prefixd-bench --bins
mkdir -p .device
[[ -x .device/ucx/bin/ucx_perftest ]] || ../shared/device/stage-ucx.sh .device/ucx
cp target/release/prefixd target/release/gpu-demo .device/
strip .device/prefixd .device/gpu-demo 2>/dev/null || true
du -sh .device
