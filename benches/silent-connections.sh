#!/usr/bin/env bash
# Resident memory of the gateway (dev mode) before, during and after N TCP
# connections that never send the HTTP/2 preface (the gateway closes them after
# server.handshake_timeout_ms, 5 s by default). Loopback only.
# Two waves: the memory of the first is reused by the second (RSS after the
# second wave stays where the first left it).
# usage: benches/silent-connections.sh [connections] [waves]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
waves="${2:-2}"
cargo build --release --bins -q
gw=127.0.0.1:50555
target/release/m2m-gateway dev --listen "$gw" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/${gw%:*}/${gw#*:}") 2>/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$pid/status"; }
echo "before: $(rss)"
for wave in $(seq "$waves"); do
echo "wave $wave"
python3 - "$gw" "$n" "$pid" <<'PY'
import socket, sys, time
host, port = sys.argv[1].split(":")
n, pid = int(sys.argv[2]), sys.argv[3]
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return line.split()[1] + " kB"
socks = [socket.create_connection((host, int(port))) for _ in range(n)]
time.sleep(1)
print(f"during ({n} silent connections): {rss()}")
closed, start = 0, time.time()
for s in socks:
    # The server's SETTINGS frame may come first; closed = EOF or reset.
    s.settimeout(max(0.1, 15 - (time.time() - start)))
    try:
        while s.recv(4096):
            pass
        closed += 1
    except socket.timeout:
        pass
    except OSError:
        closed += 1
print(f"closed by the gateway: {closed}/{n} after {time.time() - start:.1f} s")
PY
sleep 1
echo "after: $(rss)"
done
