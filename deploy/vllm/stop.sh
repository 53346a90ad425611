#!/usr/bin/env bash
# Stops what deploy/vllm/start.sh started (SIGTERM: vLLM and prefixd drain), then waits.
set -uo pipefail
log=${LOG_DIR:-./vllm-pd}
[[ -f $log/pids ]] || { echo "no $log/pids: nothing started" >&2; exit 0; }
tac "$log/pids" | while read -r name pid; do kill -TERM "$pid" 2>/dev/null && echo "stopping $name ($pid)"; done
for _ in $(seq 60); do
  alive=0
  while read -r _ pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$log/pids"
  [[ $alive == 0 ]] && break
  sleep 1
done
while read -r name pid; do kill -KILL "$pid" 2>/dev/null && echo "killed $name ($pid)"; done < "$log/pids"
: > "$log/pids"
