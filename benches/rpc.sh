#!/usr/bin/env bash
# RPC throughput, as ratios from one run: the gateway (dev mode) and the protected
# example server, with and without its AuthLayer, all pinned to core 0 (only one is
# loaded at a time); the load generator on core 1. Targets alternate within each
# round and the medians over the rounds are reported. Loopback only.
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
  line=$(taskset -c 1 "$bin/examples/loadgen" --gateway "http://$gw" --concurrency "$conc" --duration "$secs" --target "$2" --addr "http://$3")
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
  { name = $1; for (i = 2; i <= NF; i++) if ($i ~ /^rps=/) { split($i, a, "="); v[name, ++n[name]] = a[2] } }
  function median(name,   k, m, i, j, t, arr) {
    m = n[name]; for (i = 1; i <= m; i++) arr[i] = v[name, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (arr[j] < arr[i]) { t = arr[i]; arr[i] = arr[j]; arr[j] = t }
    return (m % 2) ? arr[(m + 1) / 2] : (arr[m / 2] + arr[m / 2 + 1]) / 2
  }
  END {
    h = median("health"); g = median("get-token"); va = median("validate")
    p = median("echo-protected"); u = median("echo-unprotected")
    printf "health %d req/s\nget-token %d req/s (%.2fx health)\nvalidate %d req/s (%.2fx health)\n", h, g, g / h, va, va / h
    printf "echo protected %d req/s, unprotected %d req/s (%.2fx)\n", p, u, p / u
  }' "$out"
