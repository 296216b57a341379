#!/usr/bin/env python3
"""Opens N idle, authenticated client connections to a pooler and reports the pooler's RSS.

Usage: benches/idle_clients.py --port 6432 --pid PID --clients 10000 [--user bench --db bench]

The pooler must accept the user without a password (trust), so that the measurement is
about connection state, not the client's own SCRAM cost. Prints RSS before, after, and the
cost per client in KiB.
"""
import argparse
import asyncio
import struct


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def startup(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def one(port, user, db, conns, sem):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(startup(user, db))
        await writer.drain()
        while True:
            tag = await reader.readexactly(1)
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if tag == b"E":
                raise RuntimeError(body)
            if tag == b"Z":
                break
        conns.append((reader, writer))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--db", default="bench")
    a = ap.parse_args()
    conns = []
    # Warm up: one client so the pool's first server login is not counted per client.
    await one(a.port, a.user, a.db, conns, asyncio.Semaphore(1))
    await asyncio.sleep(0.5)
    before = rss_kib(a.pid)
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(one(a.port, a.user, a.db, conns, sem) for _ in range(a.clients)))
    await asyncio.sleep(1.0)
    after = rss_kib(a.pid)
    n = len(conns) - 1
    print(f"clients={n} rss_before_kib={before} rss_after_kib={after} "
          f"per_client_kib={(after - before) / n:.2f}")
    for _, w in conns:
        w.close()


asyncio.run(main())
