#!/usr/bin/env bash
# prefixd inside real `vllm serve` on the 2-GPU machine: correctness, then `vllm bench serve`
# side by side. Run from the repo root after bench/vllm/stage.sh here and the vLLM parts there
# (../shared/device/README.md). Phases, one or several per call (servers started with setsid
# survive between calls on the same machine):
#   bash bench/vllm/gpu.sh setup          install the prefixd wheel, write the model, GPU tests
#   bash bench/vllm/gpu.sh pd             start prefixd P/D (sidecar, prefill GPU0, decode GPU1, proxy)
#                                         for `correct`: no prefix cache on the decode, debug hashes
#   bash bench/vllm/gpu.sh pd-bench       restart prefixd P/D as a user runs it (the same flags as
#                                         the NIXL baseline: prefix caching on both, no debug hook)
#   bash bench/vllm/gpu.sh correct        50 prompts: tokens vs reference, external hits, KV hashes
#   bash bench/vllm/gpu.sh bench NAME [WORKLOADS]   vllm bench serve against the proxy (or :7300)
#   bash bench/vllm/gpu.sh pd-remote      restart P/D with the decode pulling from the prefill's
#                                         sidecar over the remote path (a second sidecar, forced)
#   bash bench/vllm/gpu.sh pd-remote-bench  the same, as pd-bench runs it (for `bench prefixd-remote`)
#   bash bench/vllm/gpu.sh nixl-wheels    install NIXL from .device-nixl (carried on this call)
#   bash bench/vllm/gpu.sh nixl           start vLLM's own P/D (NixlConnector) behind the same proxy
#   bash bench/vllm/gpu.sh nixl-tcp       the same with NIXL's UCX on tcp (the cross-node baseline here)
#   bash bench/vllm/gpu.sh single         start one plain instance (GPU0, port 7300)
#   bash bench/vllm/gpu.sh stop           stop everything
# Results and logs accumulate in /tmp/vllm-out on the machine; at the end of every call all of it
# goes back as one tarball, $OUT/vllm-out-HHMMSS.tgz (a call may return 8 files at most).
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
out=/tmp/vllm-out
mkdir -p "$out" /tmp/vpd
pack() {
  [[ -n ${OUT:-} ]] || return 0
  cp /tmp/vpd/*.out "$out/" 2>/dev/null
  tar -czf "$OUT/vllm-out-$(date +%H%M%S).tgz" -C /tmp vllm-out
}
trap pack EXIT
export PYTHONPATH=/tmp/site:/tmp/vllm-site PATH=/tmp/vllm-site/bin:$PATH HF_HUB_OFFLINE=1
# Carried folders last one call only; setup copies .device to /tmp/dev for the later calls.
dev=/tmp/dev
export LD_LIBRARY_PATH=$dev/ucx/lib:${LD_LIBRARY_PATH:-} PREFIXD_SYSTEM_UCX=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONHASHSEED=123 UCX_MEMTYPE_CACHE=n UCX_RNDV_PIPELINE_ERROR_HANDLING=y
export VLLM_USE_FLASHINFER_SAMPLER=0 PREFIXD_BIN=$dev/prefixd
model=/tmp/model
serve_flags=(--load-format dummy --seed 0 --max-model-len 10240)

stop_all() {
  LOG_DIR=/tmp/vpd bash deploy/vllm/stop.sh > /dev/null 2>&1
  pkill -f "vllm serve" 2>/dev/null; pkill -f prefixd.vllm.proxy 2>/dev/null; pkill -x prefixd 2>/dev/null
  for _ in $(seq 30); do pgrep -f "vllm serve|prefixd" > /dev/null || break; sleep 1; done
  pkill -9 -f "vllm serve" 2>/dev/null; pkill -9 -x prefixd 2>/dev/null
  return 0
}

save_logs() { # NAME
  tar -czf "$out/logs-$1.tgz" -C /tmp vpd 2>/dev/null
}

start_pd() { # extra env for start.sh is taken from the caller's environment
  pkill -f "vllm serve" 2>/dev/null; pkill -f prefixd.vllm.proxy 2>/dev/null
  LOG_DIR=/tmp/vpd bash deploy/vllm/stop.sh > /dev/null 2>&1
  rm -rf /tmp/vpd/prefill.log /tmp/vpd/decode.log /tmp/vpd/debug
  PREFIXD_GPU_POOL=${PREFIXD_GPU_POOL:-24GiB} PREFIXD_HOST_POOL=${PREFIXD_HOST_POOL:-32GiB} \
    PREFILL_MEM=0.75 DECODE_MEM=0.75 LOG_DIR=/tmp/vpd \
    setsid bash deploy/vllm/start.sh "$model" -- "${serve_flags[@]}" "$@" > /tmp/vpd/start.out 2>&1 < /dev/null &
  local pid=$!
  wait $pid
  local rc=$?
  cat /tmp/vpd/start.out
  return $rc
}

bench() { # NAME PORT WORKLOADS...
  local name=$1 port=$2
  shift 2
  local common=(--backend vllm --model "$model" --port "$port" --ignore-eos --save-result --result-dir "$out"
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --dataset-name random --save-detailed)
  for w in "$@"; do
    local args
    case $w in
      seed) args=(--random-input-len 128 --random-output-len 128 --num-prompts 1000 --max-concurrency 100) ;;
      long) args=(--random-input-len 8192 --random-output-len 128 --num-prompts 200 --max-concurrency 16) ;;
      long-rate) args=(--random-input-len 8192 --random-output-len 128 --num-prompts 200 --request-rate 4) ;;
      prefix) args=(--random-prefix-len 4096 --random-input-len 512 --random-output-len 128 --num-prompts 200
                    --max-concurrency 16) ;;
      long-small) args=(--random-input-len 8192 --random-output-len 128 --num-prompts 40 --max-concurrency 16) ;;
      *) echo "unknown workload $w"; return 2 ;;
    esac
    echo "== $name $w"
    timeout 500 python3 -m vllm.entrypoints.cli.main bench serve "${common[@]}" "${args[@]}" \
      --result-filename "$name-$w.json" > "$out/$name-$w.txt" 2>&1
    grep -E "Request throughput|Mean TTFT|Median TTFT|P99 TTFT|Mean TPOT|Median TPOT|Failed" "$out/$name-$w.txt"
  done
}

status=0
while (( $# )); do
  phase=$1
  shift
  echo "######## $phase $(date +%T)"
  case $phase in
    setup)
      # .device travels with this call, or an earlier call on this machine left it in $dev.
      if [[ -d .device ]]; then rm -rf "$dev" && cp -r .device "$dev"; fi
      [[ -x $dev/prefixd ]] || { echo "no .device here and none in $dev: carry .device"; exit 2; }
      rm -rf /tmp/site
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dev"/wheel/*.whl
      python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site "$dev"/whl/*.whl
      python3 "$dev/mkmodel.py" "$model" 4b
      nvidia-smi -L; nvidia-smi topo -m | head -4
      # vLLM arrives with the later calls (.device-vllm/p1..p3): not required yet.
      python3 -c 'import prefixd, torch; print("prefixd", prefixd.__version__, "torch", torch.__version__)' || status=1
      PREFIXD_BIN=$dev/prefixd timeout 300 python3 -m pytest -q -p no:cacheprovider python/tests/test_torch.py \
        > "$out/pytest-gpu.log" 2>&1 || status=1
      tail -3 "$out/pytest-gpu.log"
      ;;
    pd)
      # The decode instance keeps no prefix cache of its own: every prompt's KV comes through
      # prefixd (a local hit would hide the path under test).
      # The checked run hashes every block on both sides (slow): give announced chunks time.
      echo local > /tmp/vpd/mode
      PREFIXD_VLLM_DEBUG_DIR=/tmp/vpd/debug DECODE_FLAGS=--no-enable-prefix-caching \
        CONNECTOR_EXTRA='"pd_wait_ms": 10000' start_pd
      ;;
    pd-bench)
      # What an operator runs (deploy/vllm/start.sh's defaults), with the flags the NIXL baseline
      # gets: prefix caching on both instances (the decode's cascade attention over a shared
      # prefix needs it), no debug hook.
      echo bench > /tmp/vpd/mode
      start_pd
      ;;
    nixl-wheels)
      python3 -c 'import nixl' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/vllm-site .device-nixl/*.whl
      python3 -c 'import nixl; print("nixl", nixl.__file__)' || status=1
      ;;
    correct)
      timeout 580 python3 bench/vllm/check.py --proxy http://127.0.0.1:9100 --prefill http://127.0.0.1:7100 \
        --decode http://127.0.0.1:7200 --model "$model" --debug-dir /tmp/vpd/debug --out "$out" \
        --tag "$(cat /tmp/vpd/mode)" > "$out/correctness-$(cat /tmp/vpd/mode).txt" 2>&1 || status=1
      tail -4 "$out/correctness-$(cat /tmp/vpd/mode).txt"
      grep -h "KV Transfer metrics" /tmp/vpd/prefill.log | tail -2
      save_logs "correct-$(cat /tmp/vpd/mode)"
      grep -h "KV Transfer metrics" /tmp/vpd/decode.log | tail -2
      ;;
    bench)
      name=$1
      shift
      port=9100
      [[ $name == single* ]] && port=7300
      ws=()
      while (( $# )) && [[ $1 != --* ]] && [[ $1 =~ ^(seed|long|long-rate|prefix|long-small)$ ]]; do ws+=("$1"); shift; done
      bench "$name" "$port" "${ws[@]}"
      grep -h "KV Transfer metrics" /tmp/vpd/decode.log 2>/dev/null | tail -1
      save_logs "$name"
      ;;
    pd-remote)
      # A second sidecar for the decode side; the prefill's sidecar is named in kv_transfer_params
      # and pulled from over active messages (tcp), forced even though it is on this host. The
      # checked run's debug hook slows the prefill's stores: the same 10 s P/D wait as `pd`
      # (2026-11-30 ran it with the 2 s default: 22 of 50 prompts gave up waiting).
      stop_all
      echo remote > /tmp/vpd/mode
      setsid "$PREFIXD_BIN" --listen 127.0.0.1:50061 --metrics-listen 127.0.0.1:51061 --host-pool 8GiB \
        > /tmp/vpd/prefixd-b.out 2> /tmp/vpd/prefixd-b.log < /dev/null &
      PREFIXD_VLLM_DEBUG_DIR=/tmp/vpd/debug DECODE_FLAGS=--no-enable-prefix-caching \
        DECODE_ENDPOINT=http://127.0.0.1:50061 CONNECTOR_EXTRA='"force_remote": true, "pd_wait_ms": 10000' start_pd
      ;;
    pd-remote-bench)
      # The cross-node path as an operator runs it (pd-bench's flags, no debug hook), the decode's
      # sidecar pulling from the prefill's over active messages, forced (tcp: no RDMA NIC here).
      stop_all
      echo remote-bench > /tmp/vpd/mode
      setsid "$PREFIXD_BIN" --listen 127.0.0.1:50061 --metrics-listen 127.0.0.1:51061 --host-pool 32GiB \
        > /tmp/vpd/prefixd-b.out 2> /tmp/vpd/prefixd-b.log < /dev/null &
      DECODE_ENDPOINT=http://127.0.0.1:50061 CONNECTOR_EXTRA='"force_remote": true' start_pd
      ;;
    nixl|nixl-tcp)
      stop_all
      python3 -c 'import nixl' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/vllm-site .device-nixl/*.whl
      kv='{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
      # nixl-tcp: the cross-node baseline on this one host, NIXL's UCX held to what prefixd's
      # forced remote path uses (tcp, with cuda_copy to stage device memory).
      tls=()
      [[ $phase == nixl-tcp ]] && tls=(env UCX_TLS=tcp,cuda_copy)
      CUDA_VISIBLE_DEVICES=0 VLLM_NIXL_SIDE_CHANNEL_PORT=5600 setsid "${tls[@]}" vllm serve "$model" --port 7100 \
        --gpu-memory-utilization 0.75 --kv-transfer-config "$kv" "${serve_flags[@]}" > /tmp/vpd/prefill.log 2>&1 < /dev/null &
      CUDA_VISIBLE_DEVICES=1 VLLM_NIXL_SIDE_CHANNEL_PORT=5601 setsid "${tls[@]}" vllm serve "$model" --port 7200 \
        --gpu-memory-utilization 0.75 --kv-transfer-config "$kv" "${serve_flags[@]}" > /tmp/vpd/decode.log 2>&1 < /dev/null &
      setsid python3 -m prefixd.vllm.proxy --port 9100 --prefill http://127.0.0.1:7100 --decode http://127.0.0.1:7200 \
        > /tmp/vpd/proxy.log 2>&1 < /dev/null &
      for p in 7100 7200; do
        for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$p/health" && break; sleep 2; done
      done
      curl -sf -o /dev/null http://127.0.0.1:7200/health && echo "nixl P/D ready" || { echo "nixl P/D not ready"; tail -5 /tmp/vpd/decode.log; status=1; }
      ;;
    single)
      stop_all
      CUDA_VISIBLE_DEVICES=0 setsid vllm serve "$model" --port 7300 "${serve_flags[@]}" > /tmp/vpd/single.log 2>&1 < /dev/null &
      for _ in $(seq 300); do curl -sf -o /dev/null http://127.0.0.1:7300/health && break; sleep 2; done
      curl -sf -o /dev/null http://127.0.0.1:7300/health && echo "single ready" || { echo "single not ready"; status=1; }
      ;;
    stop) stop_all ;;
    *) echo "unknown phase $phase"; status=2 ;;
  esac
done
exit $status
