#!/usr/bin/env bash
# RPC throughput with h2load (Debian: nghttp2-client) as the load generator: it
# costs far less CPU per call than a tonic client, so the gateway (dev mode, pinned
# to core 0) is saturated for every target and the ratios compare the server alone.
# h2load sees HTTP status only, so every run is checked by bytes: N calls must
# bring back exactly N times the answer's gRPC frame (a gRPC error carries no
# message). Targets alternate within each round; medians over the rounds.
# Loopback only.
# The same run measures a plain tonic server (Health only, default settings, also
# on core 0) as the yardstick, and then p50/p99 latency with the project's load
# generator at one caller (1 connection, 1 call in flight) and at 50 x 10.
# usage: benches/rpc-h2load.sh [calls-per-run] [rounds] [connections] [streams-per-connection]
# LATENCY=0 skips the latency part.
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${1:-400000}"
rounds="${2:-5}"
conns="${3:-4}"
streams="${4:-16}"
command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release --bins --examples -q
bin=target/release
gw=127.0.0.1:50554
plain=127.0.0.1:50558
dir=$(mktemp -d)
pid=
plain_pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$plain_pid" ] && kill "$plain_pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

taskset -c 0 "$bin/m2m-gateway" dev --listen "$gw" --write-config "$dir/dev.toml" >/dev/null 2>&1 &
pid=$!
taskset -c 0 "$bin/examples/plain_health" "$plain" >/dev/null 2>&1 &
plain_pid=$!
for a in "$gw" "$plain"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null && break; sleep 0.1; done
done

declare -A path=(
  [plain-health]=/grpc.health.v1.Health/Check
  [health]=/grpc.health.v1.Health/Check
  [get-token]=/m2m.gateway.v1.Gateway/GetToken
  [validate]=/m2m.gateway.v1.Gateway/Validate
)
declare -A frame
for t in health get-token validate; do
  frame[$t]=$("$bin/examples/loadgen" --target "$t" --addr "http://$gw" --gateway "http://$gw" \
    --write-request "$dir/$t.bin" | sed -n 's/^answer_frame_bytes=//p')
done
cp "$dir/health.bin" "$dir/plain-health.bin"
frame[plain-health]=${frame[health]}
declare -A addr=([plain-health]=$plain [health]=$gw [get-token]=$gw [validate]=$gw)

core0() { awk '$1 == "cpu0" { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat; }
order="plain-health health get-token validate"
for r in $(seq "$rounds"); do
  echo "== round $r"
  # Every other round runs the targets in reverse: a machine getting busier or
  # quieter during a round then favours no target.
  targets=$order
  [ $((r % 2)) -eq 0 ] && targets=$(tr ' ' '\n' <<<"$order" | tac | tr '\n' ' ')
  for t in $targets; do
    read -r b0 a0 <<<"$(core0)"
    out=$(taskset -c 1 h2load -t 1 -c "$conns" -m "$streams" -n "$calls" -d "$dir/$t.bin" \
      -H 'content-type: application/grpc' -H 'te: trailers' "http://${addr[$t]}${path[$t]}")
    read -r b1 a1 <<<"$(core0)"
    rps=$(sed -n 's/^finished in [0-9.]*m\{0,1\}s, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
    ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
    data=$(sed -n 's/^traffic: .*(\([0-9]*\)) data$/\1/p' <<<"$out")
    want=$((calls * frame[$t]))
    if [ "$ok" != "$calls" ] || [ "$data" != "$want" ]; then
      echo "$t: $ok of $calls succeeded, $data bytes of answers, want $want" >&2
      exit 1
    fi
    echo "$t rps=${rps%.*} server_busy=$((100 * (b1 - b0) / (a1 - a0)))%" | tee -a "$dir/out"
  done
done

echo "== medians over $rounds rounds ($calls calls each, $conns connections x $streams streams)"
awk '
  { split($2, a, "="); v[$1, ++n[$1]] = a[2]; split($3, b, "="); sub("%", "", b[2]); busy[$1, n[$1]] = b[2] }
  function median(arr, name,   m, i, j, t, x) {
    m = n[name]; for (i = 1; i <= m; i++) x[i] = arr[name, i] + 0
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
    return (m % 2) ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
  }
  function quartile(arr, name, q,   m, i, j, t, x) {
    m = n[name]; for (i = 1; i <= m; i++) x[i] = arr[name, i] + 0
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
    return x[int((m - 1) * q / 4 + 0.5) + 1]
  }
  END {
    split("plain-health health get-token validate", names, " ")
    # Ratios within each round (the targets ran back to back), then their median.
    for (k = 3; k <= 4; k++) for (i = 1; i <= n["health"]; i++) ratio[names[k], i] = v[names[k], i] / v["health", i]
    n["ratio-get-token"] = n["health"]; n["ratio-validate"] = n["health"]
    for (i = 1; i <= n["health"]; i++) { r1["ratio-get-token", i] = ratio["get-token", i]; r1["ratio-validate", i] = ratio["validate", i] }
    for (k = 1; k <= 4; k++) {
      printf "%-12s %8d req/s   server busy %d%%", names[k], median(v, names[k]), median(busy, names[k])
      if (k > 2) printf "   %.2fx health (median of per-round ratios; quartiles %.2f-%.2f)", median(r1, "ratio-" names[k]), quartile(r1, "ratio-" names[k], 1), quartile(r1, "ratio-" names[k], 3)
      printf "\n"
    }
  }' "$dir/out"

[ "${LATENCY:-1}" = 0 ] && exit 0
echo "== latency (project load generator on core 1, 5 s per run after 1 s of warm-up)"
for shape in "1 1" "500 50"; do
  read -r conc conns <<<"$shape"
  for t in health get-token validate; do
    line=$(taskset -c 1 "$bin/examples/loadgen" --target "$t" --addr "http://$gw" --gateway "http://$gw" \
      --concurrency "$conc" --connections "$conns" --duration 5)
    p50=$(sed -n 's/.* p50=\([0-9]*\)us.*/\1/p' <<<"$line")
    p99=$(sed -n 's/.* p99=\([0-9]*\)us.*/\1/p' <<<"$line")
    rps=$(sed -n 's/.* rps=\([0-9]*\).*/\1/p' <<<"$line")
    printf "%-10s %3d connections x %3d in flight   p50 %5d us   p99 %5d us   %6d req/s\n" "$t" "$conns" "$((conc / conns))" "$p50" "$p99" "$rps"
  done
done
