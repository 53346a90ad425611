#!/usr/bin/env bash
# The seed's disaggregated prefill/decode system with prefixd in place of LMCache + NIXL: the
# prefixd sidecar, a prefill instance (kv_producer) on one GPU, a decode instance (kv_consumer)
# on another, and the P/D proxy in front. Returns once all four answer; stop with stop.sh.
#
#   deploy/vllm/start.sh MODEL [-- more `vllm serve` flags for both instances]
#
# Settings (environment; defaults in brackets):
#   PREFILL_GPU [0]  DECODE_GPU [1]  PREFILL_PORT [7100]  DECODE_PORT [7200]  PROXY_PORT [9100]
#   PREFIXD_ENDPOINT   a sidecar already running; unset: start one here, with
#     PREFIXD_BIN [prefixd on PATH, else target/release/prefixd]  PREFIXD_PORT [50051]
#     PREFIXD_GPU_POOL [16GiB]  PREFIXD_POOL_GPU [DECODE_GPU: the decode side then reads from
#     its own HBM]  PREFIXD_HOST_POOL [16GiB]
#   PREFILL_MEM [0.8]  DECODE_MEM [0.8]   --gpu-memory-utilization of each instance (the GPU
#     pool lives beside them)
#   PYTHONHASHSEED [123]  both instances must hash blocks alike (vLLM's NONE_HASH)
#   UCX_TLS [cuda_ipc,cuda_copy,sm,tcp]   UCX_MEMTYPE_CACHE [n]
#   CONNECTOR_EXTRA   more kv_connector_extra_config JSON members, e.g. '"force_remote": true'
#   DECODE_ENDPOINT   the decode instance's own sidecar (another node's, or a second one here)
#   PREFILL_FLAGS, DECODE_FLAGS   more `vllm serve` flags for one instance only (e.g.
#     DECODE_FLAGS=--no-enable-prefix-caching: every prompt's KV then comes through prefixd)
#   LOG_DIR [./vllm-pd]   logs and the pids file
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:?usage: deploy/vllm/start.sh MODEL [-- vllm serve flags]}
shift
[[ ${1:-} == -- ]] && shift
extra_flags=("$@")
log=${LOG_DIR:-./vllm-pd}
mkdir -p "$log"
: > "$log/pids"
export PYTHONHASHSEED=${PYTHONHASHSEED:-123}
export UCX_TLS=${UCX_TLS:-cuda_ipc,cuda_copy,sm,tcp} UCX_MEMTYPE_CACHE=${UCX_MEMTYPE_CACHE:-n}
pg=${PREFILL_GPU:-0} dg=${DECODE_GPU:-1}
pp=${PREFILL_PORT:-7100} dp=${DECODE_PORT:-7200} xp=${PROXY_PORT:-9100}

wait_http() { # URL NAME SECONDS
  local t0=$SECONDS
  until curl -sf -o /dev/null "$1"; do
    (( SECONDS - t0 < $3 )) || { echo "error: $2 not ready after $3 s; see $log" >&2; return 1; }
    sleep 2
  done
  echo "$2 ready after $((SECONDS - t0)) s"
}

endpoint=${PREFIXD_ENDPOINT:-}
if [[ -z $endpoint ]]; then
  bin=${PREFIXD_BIN:-$(command -v prefixd || echo "$here/../../target/release/prefixd")}
  port=${PREFIXD_PORT:-50051}
  "$bin" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1000))" \
    --gpu-pool "${PREFIXD_GPU_POOL:-16GiB}" --gpu "${PREFIXD_POOL_GPU:-$dg}" --host-pool "${PREFIXD_HOST_POOL:-16GiB}" \
    > "$log/prefixd.out" 2> "$log/prefixd.log" &
  echo "prefixd $!" >> "$log/pids"
  endpoint=http://127.0.0.1:$port
  wait_http "http://127.0.0.1:$((port + 1000))/readyz" prefixd 60
fi

kv_config() { # ROLE ENDPOINT
  printf '{"kv_connector":"PrefixdConnector","kv_connector_module_path":"prefixd.vllm","kv_role":"%s","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"endpoint":"%s"%s}}' \
    "$1" "$2" "${CONNECTOR_EXTRA:+,$CONNECTOR_EXTRA}"
}

CUDA_VISIBLE_DEVICES=$pg vllm serve "$model" --port "$pp" --gpu-memory-utilization "${PREFILL_MEM:-0.8}" \
  --kv-transfer-config "$(kv_config kv_producer "$endpoint")" "${extra_flags[@]}" ${PREFILL_FLAGS:-} \
  > "$log/prefill.log" 2>&1 &
echo "prefill $!" >> "$log/pids"
CUDA_VISIBLE_DEVICES=$dg vllm serve "$model" --port "$dp" --gpu-memory-utilization "${DECODE_MEM:-0.8}" \
  --kv-transfer-config "$(kv_config kv_consumer "${DECODE_ENDPOINT:-$endpoint}")" "${extra_flags[@]}" \
  ${DECODE_FLAGS:-} > "$log/decode.log" 2>&1 &
echo "decode $!" >> "$log/pids"
python3 -m prefixd.vllm.proxy --port "$xp" --prefill "http://127.0.0.1:$pp" --decode "http://127.0.0.1:$dp" \
  > "$log/proxy.log" 2>&1 &
echo "proxy $!" >> "$log/pids"
wait_http "http://127.0.0.1:$pp/health" prefill "${READY_TIMEOUT:-600}"
wait_http "http://127.0.0.1:$dp/health" decode "${READY_TIMEOUT:-600}"
wait_http "http://127.0.0.1:$xp/v1/models" proxy 60
echo "serving on http://127.0.0.1:$xp (prefill :$pp, decode :$dp, prefixd $endpoint); logs in $log"
