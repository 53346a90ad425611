#!/usr/bin/env bash
# `prefixctl doctor` on the GPU machine, in the situations an operator meets. Staged with
# bench/vllm/stage.sh (or bench/gpu/stage.sh plus prefixctl) into .device/; on the device:
#   bash bench/gpu/doctor.sh            (reports in $OUT: doctor-*.txt and doctor-*.json)
# Cases:
#   gpu0     GPU pool on GPU 0, the engine on GPU 0: the healthy node
#   gpu1     the same server, the engine on GPU 1: the pool is on another GPU (cuda_ipc over NVLink)
#   tcp      the same server, a consumer forced onto tcp (--transports tcp): must WARN or FAIL
#   host     a server with no GPU pool: must WARN, and the GPU rows go to pinned host memory
set -uo pipefail
cd "$(dirname "$0")/../.."
D=${DEV:-$PWD/.device}
OUT=${OUT:-/tmp/prefixd-doctor-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$D/ucx/lib:${LD_LIBRARY_PATH:-} PREFIXD_SYSTEM_UCX=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONHASHSEED=0 UCX_MEMTYPE_CACHE=n
nvidia-smi -L | tee "$OUT/gpus.txt"; nvidia-smi topo -m | head -4 | tee -a "$OUT/gpus.txt"

start_server() { # EXTRA_ARGS...  -> PID, EP
  rm -f "$OUT/srv.line"
  timeout 600 "$D/prefixd" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --host-pool 8GiB \
    --transports cuda_ipc,cuda_copy,sm,tcp "$@" > "$OUT/srv.line" 2>> "$OUT/prefixd.log" &
  PID=$!
  for _ in $(seq 100); do grep -q grpc= "$OUT/srv.line" 2>/dev/null && break; sleep 0.1; done
  EP=http://$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$OUT/srv.line")
}
doctor_text() { # NAME GLOBAL_ARGS... -- DOCTOR_ARGS...
  local name=$1; shift
  local g=() a=()
  while (( $# )) && [[ $1 != -- ]]; do g+=("$1"); shift; done
  (( $# )) && shift
  a=("$@")
  echo "######## doctor $name: prefixctl ${g[*]} doctor ${a[*]}" | tee -a "$OUT/doctor-all.txt"
  timeout 120 "$D/prefixctl" --endpoint "$EP" "${g[@]}" doctor "${a[@]}" 2>&1 | tee "$OUT/doctor-$name.txt" | tee -a "$OUT/doctor-all.txt"
  echo "exit code ${PIPESTATUS[0]}" | tee -a "$OUT/doctor-all.txt"
  timeout 120 "$D/prefixctl" --endpoint "$EP" "${g[@]}" --json doctor "${a[@]}" > "$OUT/doctor-$name.json" 2>> "$OUT/doctor-err.txt"
}

start_server --gpu-pool 16GiB --gpu 0
doctor_text gpu0 -- --device 0 --bench-size 256MiB
doctor_text gpu1 -- --device 1 --bench-size 256MiB
doctor_text tcp --transports tcp -- --device 1 --bench-size 64MiB
kill -TERM $PID; wait $PID 2>/dev/null
start_server
doctor_text host -- --device 1 --bench-size 256MiB
kill -TERM $PID; wait $PID 2>/dev/null
echo "######## done"
