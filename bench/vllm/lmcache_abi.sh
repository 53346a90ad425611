#!/usr/bin/env bash
# Can LMCache's compiled ops load next to the torch that vLLM 0.26.0 pins (2.11)? Downloads the
# LMCache wheel (no dependencies) and checks every torch/c10 symbol its extension modules need
# against what the installed torch's libraries export. No GPU needed; run where torch 2.11 is
# installed (scripts/dev.sh test installs it with vLLM).
#   bench/vllm/lmcache_abi.sh [VERSION]      (default 0.5.6)
set -euo pipefail
version=${1:-0.5.6}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work" "lmcache==$version"
unzip -q -o "$work"/lmcache-*.whl 'lmcache/*.so' -d "$work/x"
lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
echo "torch $(python3 -c 'import torch; print(torch.__version__)') ($lib), LMCache $version"
for l in "$lib"/libc10*.so "$lib"/libtorch*.so; do nm -D --defined-only "$l" | awk '{print $NF}'; done | sort -u > "$work/have"
status=0
for so in "$work"/x/lmcache/*.so; do
  nm -D --undefined-only "$so" | awk '{print $NF}' | grep -E '^_ZN(K)?(3c10|5torch|2at)' | sort -u > "$work/need" || true
  missing=$(comm -23 "$work/need" "$work/have")
  echo "$(basename "$so"): $(wc -l < "$work/need") torch symbols, $(printf '%s' "$missing" | grep -c . || true) missing"
  if [[ -n $missing ]]; then
    status=1
    printf '%s\n' "$missing" | c++filt | sed 's/^/    /'
  fi
done
exit $status
