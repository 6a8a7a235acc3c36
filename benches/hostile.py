#!/usr/bin/env python3
"""What a hostile network costs a running kms-server (issue 22), measured from outside.

Usage: hostile.py PKI_DIR API_PORT PUBLIC_PORT OPS_PORT SERVER_PID [N]

1. RSS before and after N (10 000) requests with made-up HTTP methods on the mTLS API,
   then one /metrics scrape (its size too).
2. Per listener (mTLS API, public, ops): N/2 idle TCP connections and N/2 stalled bodies
   (a request announcing 1 000 bytes and sending 10), from many loopback sources (100 per
   address, each under its per-source share); then a legitimate client from 127.0.0.1:
   how long its request takes (five requests, the slowest), and how many of the junk
   connections the server still holds.
3. Alerts, child processes and audit records per N unauthenticated requests are measured
   by the e2e tests (see RELIABILITY.md); this script reports the server's thread and
   child-process counts after the flood.
"""

import os
import socket
import ssl
import sys
import time

pki, api, public, ops, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n = int(sys.argv[6]) if len(sys.argv) > 6 else 10_000


def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tls_context(cert):
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    if cert:
        ctx.load_cert_chain(f"{pki}/{cert}.pem", f"{pki}/{cert}-key.pem")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def connect(port, source, tls=None):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")
    return s


def read_status(s):
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1") else "none"


# 1. Made-up methods.
app = tls_context("app")
before = rss_kib()
s = connect(api, "127.0.0.1", app)
for i in range(n):
    method = f"JUNK{i:05d}" + "X" * 200
    try:
        s.sendall(f"{method} /v1/unwrap HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        s.recv(65536)
    except OSError:
        s = connect(api, "127.0.0.1", app)
scrape = socket.create_connection(("127.0.0.1", ops))
scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
body = b""
while True:
    chunk = scrape.recv(65536)
    if not chunk:
        break
    body += chunk
after = rss_kib()
print(f"junk methods: {n} requests, RSS {before/1024:.1f} MiB -> {after/1024:.1f} MiB, /metrics {len(body)} bytes")

# 2. Idle connections and stalled bodies, per listener.
def source(i, net):
    return f"127.{net}.{(i // 100) // 256}.{(i // 100) % 256 + 1}"


def held(socks):
    alive = 0
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) == b"":
                continue
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            continue
        alive += 1
    return alive


for name, port, cert, tls in [("mTLS API", api, "app", True), ("public", public, None, True), ("ops", ops, None, False)]:
    ctx = tls_context(cert) if tls else None
    idle, stalled = [], []
    t0 = time.time()
    for i in range(n // 2):
        try:
            idle.append(connect(port, source(i, 10)))
        except OSError:
            pass
    for i in range(n // 2):
        try:
            s = connect(port, source(i, 20), ctx)
            s.sendall(b"POST /v1/unwrap HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"wrapped\":")
            stalled.append(s)
        except OSError:
            pass
    opened = time.time() - t0
    waits, statuses = [], []
    for _ in range(5):
        t = time.time()
        try:
            s = connect(port, "127.0.0.1", tls_context("app") if tls else None)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            statuses.append(read_status(s))
            s.close()
        except OSError as e:
            statuses.append(f"failed ({e.__class__.__name__})")
        waits.append(time.time() - t)
    print(
        f"{name}: {len(idle)} idle + {len(stalled)} stalled opened in {opened:.1f} s; "
        f"legitimate request: slowest of 5 {max(waits)*1000:.1f} ms (answers {', '.join(statuses)}); "
        f"still open (not closed by the server; served, or waiting for a slot within the handshake deadline): {held(idle)} idle, {held(stalled)} stalled; RSS {rss_kib()/1024:.1f} MiB"
    )
    for s in idle + stalled:
        s.close()

threads = len(os.listdir(f"/proc/{pid}/task"))
children = sum(1 for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/stat").read().split()[3] == str(pid))
print(f"after: {threads} threads, {children} child processes, RSS {rss_kib()/1024:.1f} MiB")
