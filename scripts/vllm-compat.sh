#!/usr/bin/env bash
# Runs the connector's CPU tests (python/tests/test_vllm.py, test_proxy.py) against another vLLM
# release in a virtual environment of its own (vLLM pins torch exactly: 0.26.0 wants torch 2.11,
# 0.33.0 torch 2.14). Not part of CI (several GB per version).
#   scripts/vllm-compat.sh 0.33.0        (default: 0.33.0; the venv goes to /tmp/vllm-VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-0.33.0}
venv=${VENV:-/tmp/vllm-$version}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "vllm==$version" pytest numpy
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check libucx-cu13
cargo build --quiet -p prefixd-server -p prefixd-client --bins
echo "vLLM $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)'), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
PREFIXD_REQUIRE_VLLM=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests/test_vllm.py python/tests/test_proxy.py
