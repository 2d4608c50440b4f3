#!/usr/bin/env bash
# Revocation propagation: RevokeClient on one of three replicas sharing a
# throwaway loopback redis-server, until the three replicas and two services
# with a watching validator all refuse the client's token.
#   benches/kill-switch.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
trials="${1:-50}"
work="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "Ready to accept" "$work/log" && break; sleep 0.05; done
cargo run --release -q --example kill_switch_latency -- "redis://127.0.0.1:$port" "$trials"
