#!/usr/bin/env bash
# RPC throughput in one run: the gateway (dev mode) and the protected example
# server pinned to core 0, the load generator to core 1. Loopback only.
# usage: benches/rpc.sh [seconds-per-target] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conc="${2:-50}"
cargo build --release --bins --examples -q
bin=target/release
gw=127.0.0.1:50551
ps=127.0.0.1:50552
cfg=$(mktemp)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$cfg"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done; echo "no listener on $1" >&2; return 1; }
load() { taskset -c 1 "$bin/examples/loadgen" --gateway "http://$gw" --concurrency "$conc" --duration "$secs" "$@"; }

taskset -c 0 "$bin/m2m-gateway" dev --listen "$gw" --write-config "$cfg" >/dev/null 2>&1 &
pids+=($!)
wait_port "$gw"
echo "== gateway (server on core 0)"
load --target health --addr "http://$gw"
load --target validate --addr "http://$gw"
load --target get-token --addr "http://$gw"

echo "== protected example server (server on core 0)"
taskset -c 0 "$bin/examples/protected_server" --config "$cfg" --listen "$ps" --require-scope demo/read >/dev/null 2>&1 &
pids+=($!)
wait_port "$ps"
load --target echo --addr "http://$ps"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
taskset -c 0 "$bin/examples/protected_server" --config "$cfg" --listen "$ps" --no-auth >/dev/null 2>&1 &
pids[1]=$!
wait_port "$ps"
load --target echo --addr "http://$ps"
