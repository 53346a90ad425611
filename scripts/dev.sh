#!/usr/bin/env bash
# prefixd developer entry point. Installs what a fresh machine lacks (UCX from the PyPI wheel
# libucx-cu13 when no UCX_HOME or pkg-config UCX is found), then:
#   scripts/dev.sh run [ARGS...]   build and run prefixd (release) on the embedded defaults
#   scripts/dev.sh test            formatting, clippy -D warnings, every Rust test, the Python
#                                  package (pip) and its tests, the deployment tests (CI runs this)
#   scripts/dev.sh bench-ucx [..]  ucx-bindings throughput against ucx_perftest (BENCHMARKS.md)
#   scripts/dev.sh bench [..]      prefixd against redis-server and ucx_perftest (BENCHMARKS.md),
#                                  then the remote gets of bench-remote (Redis, Mooncake Store)
#   scripts/dev.sh bench-remote [..]  remote gets through Python clients: prefixd (active messages
#                                  over tcp) against Redis and Mooncake Store in the same run
#   scripts/dev.sh faults [N] [..] N random faults (default 1000) against real processes: kill -9,
#                                  SIGSTOP, server restarts, pool exhaustion; every byte checked
#   scripts/dev.sh fuzz [SECONDS]  every cargo-fuzz target (fuzz/) for SECONDS each (default 60);
#                                  installs nightly and cargo-fuzz when missing
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }

ensure_cargo() {
  command -v cargo >/dev/null || { echo "error: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
}

have_ucx() {
  if [[ -n ${UCX_HOME:-} ]]; then
    [[ -e $UCX_HOME/lib/libucp.so || -e $UCX_HOME/lib64/libucp.so ]] && return 0
    echo "error: UCX_HOME=$UCX_HOME has no lib/libucp.so" >&2; exit 1
  fi
  if command -v pkg-config >/dev/null && pkg-config --exists ucx 2>/dev/null; then
    [[ -e "$(pkg-config --variable=libdir ucx)/libucp.so" ]] && return 0
  fi
  python3 -c 'import libucx, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so")) else 1)' 2>/dev/null
}

ensure_ucx() {
  have_ucx && return 0
  say "UCX not found: installing the PyPI wheel libucx-cu13 (CUDA-enabled UCX 1.22)"
  python3 -m pip install --quiet --disable-pip-version-check libucx-cu13 \
    || { echo "error: could not install libucx-cu13; install UCX yourself and set UCX_HOME" >&2; exit 1; }
  have_ucx || { echo "error: libucx-cu13 installed but libucp.so not found" >&2; exit 1; }
}

# Prometheus and promtool (Debian's package) for the observability tests; systemd-analyze for
# the unit's.
ensure_prometheus() {
  local need=()
  command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
  command -v systemd-analyze >/dev/null || need+=(systemd)
  [[ ${#need[@]} -eq 0 ]] && return 0
  say "installing ${need[*]} (Debian packages) for the deployment tests"
  local sudo=; [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { echo "error: could not install ${need[*]}; install them and run again" >&2; exit 1; }
}

cmd=${1:-help}
shift || true
case $cmd in
  run)
    ensure_cargo; ensure_ucx
    say "building prefixd (release)"
    cargo build --release --quiet -p prefixd-server -p prefixd-client --bins
    exec target/release/prefixd "$@"
    ;;
  test)
    ensure_cargo; ensure_ucx
    say "cargo fmt --check"
    cargo fmt --all -- --check
    say "cargo clippy --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets --quiet -- -D warnings
    say "cargo test"
    cargo test --workspace
    say "python package: pip install ./python[test] and vLLM ${VLLM_VERSION:-0.26.0} (the connector's tests), then pytest python/tests"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "./python[test]" \
      "vllm==${VLLM_VERSION:-0.26.0}"
    PREFIXD_REQUIRE_VLLM=1 python3 -m pytest -q python/tests
    say "deployment: Kubernetes manifests and overlays (kubernetes-validate), the systemd unit, install.sh, and the dashboard and alerts against a real Prometheus"
    ensure_prometheus
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pyyaml jsonpatch kubernetes-validate
    python3 -m pytest -q deploy/tests
    ;;
  bench-ucx)
    ensure_cargo; ensure_ucx
    cargo build --release --quiet -p ucx-bindings -p prefixd-bench --bins
    exec target/release/ucx-bench "$@"
    ;;
  bench)
    ensure_cargo; ensure_ucx
    command -v redis-server >/dev/null || { say "installing redis-server (the benchmark's baseline)"; apt-get install -y -qq redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }; }
    cargo build --release --quiet -p prefixd-server -p prefixd-bench --bins
    target/release/prefixd-bench "$@"
    say "remote gets through the Python clients against Redis and Mooncake Store (scripts/dev.sh bench-remote)"
    exec "$0" bench-remote
    ;;
  bench-remote)
    ensure_cargo; ensure_ucx
    command -v redis-server >/dev/null || { say "installing redis-server (a baseline)"; apt-get install -y -qq redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }; }
    ldconfig -p | grep -q libibverbs.so.1 || { say "installing libibverbs1 (Mooncake's binaries link it)"; apt-get install -y -qq libibverbs1 >/dev/null || { apt-get update -qq && apt-get install -y -qq libibverbs1; }; }
    python3 -c 'import redis, hiredis, mooncake.store, msgpack' 2>/dev/null || { say "installing redis, hiredis, msgpack and mooncake-transfer-engine-non-cuda (baselines)"; python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore redis hiredis msgpack aiohttp requests 'mooncake-transfer-engine-non-cuda==0.3.13.post1'; }
    cargo build --release --quiet -p prefixd-server
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --force-reinstall ./python
    exec python3 bench/remote/compare.py "$@"
    ;;
  faults)
    ensure_cargo; ensure_ucx
    n=1000
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then n=$1; shift; fi
    say "building prefixd and prefixd-faults (release)"
    cargo build --release --quiet -p prefixd-server -p prefixd-tests --bins
    exec target/release/prefixd-faults --faults "$n" "$@"
    ;;
  fuzz)
    ensure_cargo; ensure_ucx
    secs=${1:-60}
    rustup toolchain list | grep -q '^nightly' || { say "installing the nightly toolchain (cargo-fuzz needs it)"; rustup toolchain install nightly --profile minimal; }
    cargo fuzz --version >/dev/null 2>&1 || { say "installing cargo-fuzz"; cargo install cargo-fuzz --locked; }
    # The targets link UCX (the config target parses transport lists with it): find its lib/.
    ucx_lib=$(python3 -c 'import libucx, os; print(os.path.join(os.path.dirname(libucx.__file__), "lib"))' 2>/dev/null || true)
    export LD_LIBRARY_PATH=${UCX_HOME:+$UCX_HOME/lib:}${ucx_lib:+$ucx_lib:}${LD_LIBRARY_PATH:-}
    cd fuzz
    cargo +nightly fuzz build -O
    status=0
    for t in $(cargo +nightly fuzz list); do
      say "fuzz $t for ${secs}s"
      if cargo +nightly fuzz run -O "$t" -- -max_total_time="$secs" -print_final_stats=1 2>"target/$t.log"; then
        grep -E '^stat::number_of_executed_units|^Done' "target/$t.log" | tail -2
      else
        status=1; echo "FINDING in $t: see fuzz/artifacts/$t/ and fuzz/target/$t.log" >&2; tail -30 "target/$t.log" >&2
      fi
    done
    exit $status
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    [[ $cmd == help || $cmd == -h || $cmd == --help ]] || exit 2
    ;;
esac
