#!/usr/bin/env bash
# The GPU scenario and benchmark, in one run on the GPU machine (2 GPUs). Staged by
# bench/gpu/stage.sh here; on the device: bash bench/gpu/run.sh  (logs and the table go to $OUT).
#
# Scenario (every byte checked on the consumer's device buffer, poisoned first):
#   A. GPU pool on GPU 0; producer on GPU 0, consumer on GPU 1   (cuda_ipc both ways)
#   B. GPU pool on GPU 1 = the consumer's GPU; producer on GPU 0
#   C. host tier only; producer on GPU 0, consumer on GPU 1     (cuda_copy + shared memory)
#   D. GPU pressure: 4 single-chunk puts of 36 MiB into a 64 MiB GPU pool -> >= 3 demotions to host,
#      every chunk still verified
# Benchmark: gpu-demo bench (pool GPU 0, client GPU 1) for 4, 36, 256 MiB chunks, and 36 MiB
# chunks as 1152 x 32 KiB fragments (gpu-demo paged); host tier alone; baselines in
# the same run: ucx_perftest cuda_ipc put/get, torch peer copy, NCCL send/recv.
set -uo pipefail
cd "$(dirname "$0")/../.."
D=$PWD/.device
OUT=${OUT:-/tmp/prefixd-gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$D/ucx/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export UCX_TLS=cuda_ipc,cuda_copy,sm,tcp UCX_MEMTYPE_CACHE=n
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi -L | tee "$OUT/gpus.txt"

start_server() { # GPU_ORDINAL_OR_NONE POOL  -> sets SERVER_PID, EP
  local gpu=$1 pool=$2 args=(--listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --host-pool 4GiB --transports cuda_ipc,cuda_copy,sm,tcp)
  if [[ $gpu != none ]]; then args+=(--gpu-pool "$pool" --gpu 0); export CUDA_VISIBLE_DEVICES=$gpu; else unset CUDA_VISIBLE_DEVICES; fi
  rm -f "$OUT/srv.line"
  timeout 900 "$D/prefixd" "${args[@]}" > "$OUT/srv.line" 2>> "$OUT/prefixd.log" &
  SERVER_PID=$!
  unset CUDA_VISIBLE_DEVICES
  for _ in $(seq 100); do grep -q grpc= "$OUT/srv.line" 2>/dev/null && break; sleep 0.1; done
  EP=http://$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$OUT/srv.line")
  log "prefixd (pool gpu=$gpu $pool) at $EP"
}
stop_server() { kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }
demo() { # GPU MODE ARGS...
  local gpu=$1; shift
  CUDA_VISIBLE_DEVICES=$gpu timeout 300 "$D/gpu-demo" "$@" --endpoint "$EP" 2>&1 | tee -a "$OUT/summary.txt"
  return "${PIPESTATUS[0]}"
}
FAIL=0
if [[ ${PAGED_ONLY:-0} == 1 ]]; then # a quick run of the paged path alone
  start_server 0 12GiB
  demo 1 bench --size 36M --chunks 16 --reps 5 || FAIL=1
  demo 1 paged --size 36M --chunks 16 --fragments 1152 --reps 5 || FAIL=1
  demo 1 paged --size 36M --chunks 1 --fragments 1152 --reps 5 || FAIL=1
  stop_server
  start_server none -
  demo 1 paged --size 36M --chunks 16 --fragments 1152 --reps 5 || FAIL=1
  stop_server
  exit $FAIL
fi
scenario() { # NAME SERVER_GPU POOL PRODUCER_GPU CONSUMER_GPU SIZE CHUNKS
  log "scenario $1"
  start_server "$2" "$3"
  demo "$4" put --size "$6" --chunks "$7" --seed 11 || FAIL=1
  demo "$5" get --size "$6" --chunks "$7" --seed 11 || FAIL=1
  curl -s "$(sed -n 's/.*metrics=\([^ ]*\).*/\1/p' "$OUT/srv.line")/metrics" | grep -E '^prefixd_(transfer_bytes|demotions|pool_used)' | tee -a "$OUT/summary.txt"
  stop_server
}
scenario "A: pool GPU0, producer GPU0, consumer GPU1" 0 8GiB 0 1 36M 8
scenario "B: pool on the consumer's GPU1" 1 8GiB 0 1 36M 8
scenario "C: host tier only" none - 0 1 36M 8
log "scenario D: demotion: four single-chunk puts of 36 MiB into a 64 MiB GPU pool"
start_server 0 64MiB
for seed in 21 22 23 24; do demo 0 put --size 36M --chunks 1 --seed $seed || FAIL=1; done
for seed in 21 22 23 24; do demo 1 get --size 36M --chunks 1 --seed $seed || FAIL=1; done
DEMOTED=$(curl -s "$(sed -n 's/.*metrics=\([^ ]*\).*/\1/p' "$OUT/srv.line")/metrics" | sed -n 's/^prefixd_demotions_total //p')
log "demotions: ${DEMOTED:-none}"; [[ ${DEMOTED:-0} -ge 3 ]] || FAIL=1
stop_server
log "scenario result: $([[ $FAIL == 0 ]] && echo PASS || echo FAIL)"

log "benchmark: pool on GPU0, client on GPU1"
start_server 0 12GiB
for spec in "4M 32" "36M 16" "256M 4"; do
  set -- $spec
  demo 1 bench --size "$1" --chunks "$2" --reps 5 || FAIL=1
done
log "paged chunks: 36 MiB as 1152 x 32 KiB fragments (pool GPU0, client GPU1), vs contiguous above"
demo 1 paged --size 36M --chunks 16 --fragments 1152 --reps 5 || FAIL=1
demo 1 paged --size 36M --chunks 1 --fragments 1152 --reps 5 || FAIL=1
stop_server
log "benchmark: host tier only (direct copies through the mapped pool), client on GPU1"
start_server none -
for spec in "4M 32" "36M 16" "256M 4"; do
  set -- $spec
  demo 1 bench --size "$1" --chunks "$2" --reps 5 || FAIL=1
done
demo 1 paged --size 36M --chunks 16 --fragments 1152 --reps 5 || FAIL=1
stop_server
log "baselines"
pt() { # TEST SIZE PORT
  CUDA_VISIBLE_DEVICES=0 timeout 120 "$D/ucx/bin/ucx_perftest" -p "$3" >/dev/null 2>&1 &
  sleep 1
  CUDA_VISIBLE_DEVICES=1 timeout 120 "$D/ucx/bin/ucx_perftest" 127.0.0.1 -p "$3" -t "$1" -m cuda -s "$2" -n 200 -w 10 2>&1 | grep Final | sed "s/^/perftest $1 size=$2 /" | tee -a "$OUT/summary.txt"
  wait
}
port=13600
for s in 4194304 37748736 268435456; do
  pt ucp_put_bw $s $((port++)); pt ucp_get $s $((port++))
done
timeout 300 python3 bench/gpu/baselines.py 4194304 37748736 268435456 2>&1 | tee -a "$OUT/summary.txt"
log "done: $([[ $FAIL == 0 ]] && echo ALL PASS || echo SOME FAILED)"
exit $FAIL
