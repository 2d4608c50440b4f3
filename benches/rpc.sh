#!/usr/bin/env bash
# RPC throughput, as ratios from one run: the gateway (dev mode) and the protected
# example server, with and without its AuthLayer, all pinned to core 0 (only one is
# loaded at a time); the load generator on core 1. Targets alternate within each
# round and the medians over the rounds are reported, twice: calls per second, and
# calls per second of core 0's busy time (the server's capacity, which does not
# depend on whether the load generator kept it saturated). Loopback only.
# usage: benches/rpc.sh [seconds-per-target] [concurrency] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
conc="${2:-50}"
rounds="${3:-5}"
cargo build --release --bins --examples -q
bin=target/release
gw=127.0.0.1:50551
protected=127.0.0.1:50552
open=127.0.0.1:50553
cfg=$(mktemp -u)
out=$(mktemp)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$cfg" "$out"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done; echo "no listener on $1" >&2; return 1; }

taskset -c 0 "$bin/m2m-gateway" dev --listen "$gw" --write-config "$cfg" >/dev/null 2>&1 &
pids+=($!)
wait_port "$gw"
for _ in $(seq 100); do [ -s "$cfg" ] && break; sleep 0.1; done
taskset -c 0 "$bin/examples/protected_server" --config "$cfg" --listen "$protected" --require-scope demo/read >/dev/null 2>&1 &
pids+=($!)
taskset -c 0 "$bin/examples/protected_server" --config "$cfg" --listen "$open" --no-auth >/dev/null 2>&1 &
pids+=($!)
wait_port "$protected"
wait_port "$open"

run() { # name target addr
  local line
  line=$(taskset -c 1 "$bin/examples/loadgen" --gateway "http://$gw" --concurrency "$conc" --duration "$secs" --target "$2" --addr "http://$3" --server-core 0)
  echo "$1 $line" | tee -a "$out"
}
for r in $(seq "$rounds"); do
  echo "== round $r"
  run health health "$gw"
  run get-token get-token "$gw"
  run validate validate "$gw"
  run echo-protected echo "$protected"
  run echo-unprotected echo "$open"
done

echo "== medians over $rounds rounds"
awk '
  {
    name = $1
    for (i = 2; i <= NF; i++) {
      split($i, a, "=")
      if (a[1] == "rps") rps[name, ++n[name]] = a[2]
      if (a[1] == "per_busy_second") cap[name, n[name]] = a[2]
      if (a[1] == "server_busy") { sub("%", "", a[2]); busy[name, n[name]] = a[2] }
    }
  }
  function median(arr, name,   m, i, j, t, v) {
    m = n[name]; for (i = 1; i <= m; i++) v[i] = arr[name, i] + 0
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
  }
  function row(label, name, base) {
    printf "%-18s %8d req/s (%.2fx)   %8d per busy second (%.2fx)   server busy %d%%\n", label,
      median(rps, name), median(rps, name) / median(rps, base),
      median(cap, name), median(cap, name) / median(cap, base), median(busy, name)
  }
  END {
    row("health", "health", "health")
    row("get-token", "get-token", "health")
    row("validate", "validate", "health")
    row("echo unprotected", "echo-unprotected", "echo-unprotected")
    row("echo protected", "echo-protected", "echo-unprotected")
  }' "$out"
