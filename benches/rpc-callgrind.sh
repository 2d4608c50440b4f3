#!/usr/bin/env bash
# Instructions per RPC on the gateway's side, counted by callgrind: the same figure
# on every run of one build, whatever else the machine is doing (h2load's
# req/s moves by ±10% between runs on a shared machine; this does not).
# The gateway (`dev`) runs under valgrind; h2load sends `calls` calls of each target
# (50 connections x 10 streams) after 5,000 unmeasured ones, and only those calls
# are counted (instrumentation switched on and off with callgrind_control). Every
# call is checked as a gRPC success by bytes, as in rpc-h2load.sh.
# Instructions are not time: they miss the kernel (socket reads and writes), cache
# misses and instruction costs. valgrind hides SHA-NI from the program, so aws-lc
# hashes with its AVX code here (about 2,100 instructions per 64-byte block,
# a few hundred cycles with SHA-NI): the SHA-256 block functions are shown apart and
# the ratios are given without them too.
# Needs valgrind and h2load (Debian: valgrind nghttp2-client). Loopback only.
# usage: benches/rpc-callgrind.sh [calls]
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${1:-20000}"
for tool in valgrind callgrind_control callgrind_annotate h2load; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install valgrind nghttp2-client" >&2; exit 1; }
done
cargo build --release --bins --examples -q
bin=target/release
gw=127.0.0.1:50564
dir=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

declare -A path=(
  [health]=/grpc.health.v1.Health/Check
  [get-token]=/m2m.gateway.v1.Gateway/GetToken
  [validate]=/m2m.gateway.v1.Gateway/Validate
)
h2() {
  h2load -t 1 -c 50 -m 10 -n "$2" -d "$dir/$1.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://$gw${path[$1]}"
}
declare -A total sha
for t in health get-token validate; do
  valgrind --tool=callgrind --callgrind-out-file="$dir/$t.out" --dump-instr=no --instr-atstart=no \
    "$bin/m2m-gateway" dev --listen "$gw" --emulator-listen 127.0.0.1:0 \
    --write-config "$dir/dev.toml" >/dev/null 2>"$dir/$t.err" &
  pid=$!
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/${gw%:*}/${gw#*:}") 2>/dev/null && break; sleep 0.2; done
  frame=$("$bin/examples/loadgen" --target "$t" --addr "http://$gw" --gateway "http://$gw" \
    --write-request "$dir/$t.bin" | sed -n 's/^answer_frame_bytes=//p')
  h2 "$t" 5000 >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  out=$(h2 "$t" "$calls")
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
  ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
  data=$(sed -n 's/^traffic: .*(\([0-9]*\)) data$/\1/p' <<<"$out")
  if [ "$ok" != "$calls" ] || [ "$data" != "$((calls * frame))" ]; then
    echo "$t: $ok of $calls succeeded, $data bytes of answers, want $((calls * frame))" >&2
    exit 1
  fi
  annotated=$(callgrind_annotate --auto=no --threshold=100 "$dir/$t.out.1")
  total[$t]=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' <<<"$annotated")
  sha[$t]=$(awk '/sha256_block_data_order/ { gsub(",", "", $1); s += $1 } END { print s + 0 }' <<<"$annotated")
done

echo "== instructions per call on the gateway ($calls calls each, 50 connections x 10 streams)"
for t in health get-token validate; do
  all=$((total[$t] / calls))
  s=$((sha[$t] / calls))
  h_all=$((total[health] / calls))
  h_rest=$(((total[health] - sha[health]) / calls))
  awk -v t="$t" -v all="$all" -v s="$s" -v ha="$h_all" -v hr="$h_rest" 'BEGIN {
    printf "%-10s %7d instructions (%6d in SHA-256 blocks)   health / this: %.2f, without SHA-256: %.2f\n",
      t, all, s, ha / all, hr / (all - s)
  }'
done
