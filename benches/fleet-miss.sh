#!/usr/bin/env bash
# The GetToken miss path on a Redis fleet, single node vs 3-master cluster, both
# with TLS on loopback (a throwaway CA), plus a plain single node:
#   benches/fleet-miss.sh [MISSES]
# Needs redis-server, redis-cli and openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
misses="${1:-2000}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=bench CA" \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=redis" -keyout "$work/redis.key" \
  -out "$work/redis.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > "$work/ext"
openssl x509 -req -in "$work/redis.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/ext" -out "$work/redis.crt" 2>/dev/null

tls=(--tls-cert-file "$work/redis.crt" --tls-key-file "$work/redis.key"
     --tls-ca-cert-file "$work/ca.crt" --tls-auth-clients no --save "" --appendonly no --bind 127.0.0.1)
start() { # port dir args...
  local port=$1 dir=$2; shift 2
  mkdir -p "$dir"
  redis-server --dir "$dir" "$@" >"$dir/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q "Ready to accept" "$dir/log" && return; sleep 0.05; done
  echo "redis-server on $port did not start" >&2; cat "$dir/log" >&2; exit 1
}
start 16379 "$work/plain" --port 16379 --save "" --appendonly no --bind 127.0.0.1
start 16380 "$work/single" --port 0 --tls-port 16380 "${tls[@]}"
for p in 17001 17002 17003; do
  start "$p" "$work/c$p" --port 0 --tls-port "$p" "${tls[@]}" --cluster-enabled yes \
    --tls-cluster yes --cluster-config-file "$work/c$p/nodes.conf"
done
redis-cli --tls --cacert "$work/ca.crt" -h 127.0.0.1 -p 17001 --cluster create \
  127.0.0.1:17001 127.0.0.1:17002 127.0.0.1:17003 --cluster-replicas 0 --cluster-yes >/dev/null
for p in 17001 17002 17003; do
  for _ in $(seq 200); do
    redis-cli --tls --cacert "$work/ca.crt" -h 127.0.0.1 -p "$p" CLUSTER INFO | grep -q cluster_state:ok && break
    sleep 0.05
  done
done

cargo build --release --example fleet_miss -q
bin=target/release/examples/fleet_miss
for round in 1 2 3; do
  echo "round $round"
  "$bin" redis://127.0.0.1:16379 "" "$misses" | sed 's/^/  plain TCP, /'
  "$bin" rediss://localhost:16380 "$work/ca.crt" "$misses" | sed 's/^/  TLS, /'
  "$bin" rediss://127.0.0.1:17001 "$work/ca.crt" "$misses" | sed 's/^/  TLS, /'
done
