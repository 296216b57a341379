#!/usr/bin/env python3
"""Connects N clients at once with SCRAM-SHA-256 and reports how long until all are ready,
plus the pooler's CPU time for those logins.

Usage: benches/scram_logins.py --port 6432 --pid PID --user bench --password pw --db bench
                              [--clients 1000]

The client side derives SaltedPassword once per (salt, iterations) and caches it, so the
measurement is the pooler's cost, not the benchmark client's: a pooler that keeps one salt
per user (pgmux) lets every login after the first skip PBKDF2; one that draws a new salt
per login (PgBouncer with a plain-text auth_file) makes the client derive every time, and
the client's time is included in the wall clock as it would be for real clients.
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import struct
import time

CACHE = {}


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


async def read_msg(reader):
    tag = await reader.readexactly(1)
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    return tag, await reader.readexactly(length - 4)


async def login(port, user, password, db):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    writer.write(struct.pack("!i", len(body) + 5) + body + b"\0")
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    auth_message = None
    salted = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            raise RuntimeError(body)
        if tag == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 10:
                first = ("n,," + first_bare).encode()
                payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
                writer.write(msg(b"p", payload))
            elif code == 11:
                server_first = body[4:].decode()
                attrs = dict(a.split("=", 1) for a in server_first.split(","))
                salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
                key = (salt, iters)
                if key not in CACHE:
                    CACHE[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
                salted = CACHE[key]
                final_wo_proof = f"c=biws,r={attrs['r']}"
                auth_message = f"{first_bare},{server_first},{final_wo_proof}".encode()
                client_key = hmac.new(salted, b"Client Key", "sha256").digest()
                stored = hashlib.sha256(client_key).digest()
                sig = hmac.new(stored, auth_message, "sha256").digest()
                proof = bytes(a ^ b for a, b in zip(client_key, sig))
                final = f"{final_wo_proof},p={base64.b64encode(proof).decode()}"
                writer.write(msg(b"p", final.encode()))
        if tag == b"Z":
            return reader, writer


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--db", required=True)
    a = ap.parse_args()
    # Warm-up login: the pool's first server connection is not part of the measurement.
    r, w = await login(a.port, a.user, a.password, a.db)
    w.close()
    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    conns = await asyncio.gather(*(login(a.port, a.user, a.password, a.db) for _ in range(a.clients)))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(a.pid) - cpu0
    print(f"clients={len(conns)} all_ready_s={wall:.3f} pooler_cpu_s={cpu:.3f} "
          f"pooler_cpu_per_login_us={cpu / len(conns) * 1e6:.0f} distinct_salts={len(CACHE)}")
    for _, w in conns:
        w.close()


asyncio.run(main())
