#!/usr/bin/env python3
"""One address opening many connections (issue: "one stranger flips readiness").

Loopback only. Start the release gateway with an admin listener, then:
    target/release/m2m-gateway dev --listen 127.0.0.1:56051 \
        --emulator-listen 127.0.0.1:0 --admin-listen 127.0.0.1:59464 &
    python3 benches/one-address-connections.py 56051 127.0.0.1:59464 10000
It opens N connections from 127.0.0.1 (HTTP/2 preface + SETTINGS), then says how
many the gateway kept, what /readyz answers, and whether a connection from
127.0.0.2 is still kept.
"""
import socket, sys, time, urllib.request
gw = ("127.0.0.1", int(sys.argv[1])); admin = sys.argv[2]; n = int(sys.argv[3])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
socks = []
t0 = time.time()
for i in range(n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.connect(gw); s.sendall(PREFACE); socks.append(s)
elapsed = time.time() - t0
time.sleep(1.0)
kept = 0
for s in socks:
    s.setblocking(False)
    try:
        d = s.recv(65536)
        kept += 1 if d else 0
    except BlockingIOError:
        kept += 1
    except OSError:
        pass
try:
    ready = urllib.request.urlopen(f"http://{admin}/readyz").status
except Exception as e:
    ready = getattr(e, "code", str(e))
o = socket.socket(); o.bind(("127.0.0.2", 0)); o.connect(gw); o.sendall(PREFACE); time.sleep(0.5)
o.setblocking(False)
try:
    other = "kept" if o.recv(65536) else "closed"
except BlockingIOError:
    other = "kept"
except OSError:
    other = "closed"
print(f"{n} connections from 127.0.0.1 opened in {elapsed:.1f} s; kept by the gateway: {kept}; /readyz: {ready}; a connection from 127.0.0.2: {other}")
