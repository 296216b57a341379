#!/usr/bin/env python3
"""Connects N clients at once with SCRAM-SHA-256 and reports how long until all are ready,
how many were refused, plus the pooler's CPU time for those logins.

Usage: benches/scram_logins.py --port 6432 --pid PID --user bench --password pw --db bench
                              [--clients 1000] [--procs 2] [--timeout 120]

Prints one line:
  clients=N ok=N failed=N all_ready_s=S pooler_cpu_s=S pooler_cpu_per_login_us=US
  distinct_salts=N [first_error=...]
all_ready_s is the time from the first connect until every login has finished (succeeded,
been refused or timed out). Exit status 0 when the measurement ran (even with refused
logins: see failed=), 1 when the warm-up login already fails.

The client side derives SaltedPassword once per (salt, iterations) and caches it, so the
measurement is the pooler's cost, not the benchmark client's: a pooler that keeps one salt
per user (pgmux) lets every login after the first skip PBKDF2; one that draws a new salt
per login (PgBouncer with a plain-text auth_file) makes the client derive every time, and
the client's time is included in the wall clock as it would be for real clients.

The logins are spread over --procs client processes (forked after the warm-up, started
together at a barrier; default 2): one Python process spends about 0.4 ms of CPU per login
on its own side, so with one process the client, not the pooler, set the wall clock.

`login()` is also used by benches/idle_clients.py (--password).
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import multiprocessing
import os
import struct
import sys
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


def startup(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def error_text(body):
    """Human-readable ErrorResponse: severity, SQLSTATE and message fields."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return " ".join(v for v in (fields.get("S"), fields.get("C"), fields.get("M")) if v)


async def login(port, user, password, db, host="127.0.0.1"):
    """Logs in (trust, or SCRAM-SHA-256 when password is not None); returns (reader, writer)
    once ReadyForQuery arrived. Raises RuntimeError on an ErrorResponse or another method."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(startup(user, db))
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        while True:
            tag, body = await read_msg(reader)
            if tag == b"E":
                raise RuntimeError(error_text(body))
            if tag == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 0:
                    continue
                if password is None:
                    raise RuntimeError(f"server asked for authentication (code {code}); pass --password")
                if code == 10:
                    if b"SCRAM-SHA-256\0" not in body[4:]:
                        raise RuntimeError(f"no SCRAM-SHA-256 among {body[4:]!r}")
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
                elif code == 12:
                    continue  # SASLFinal: server signature (not verified: benchmark only)
                else:
                    raise RuntimeError(f"unsupported authentication request {code}")
            if tag == b"Z":
                return reader, writer
    except BaseException:
        writer.close()
        raise


async def connect_all(a, n):
    """n logins at once; returns (connections, errors, time the last one ended)."""
    results = await asyncio.gather(
        *(asyncio.wait_for(login(a.port, a.user, a.password, a.db), a.timeout) for _ in range(n)),
        return_exceptions=True)
    end = time.monotonic()
    conns = [x for x in results if not isinstance(x, BaseException)]
    errors = [x for x in results if isinstance(x, BaseException)]
    return conns, errors, end


def worker(a, n, barrier, out, release):
    """One client process: waits at the barrier, logs n clients in, reports, and keeps
    the connections open until the parent has read every report."""
    barrier.wait()
    loop = asyncio.new_event_loop()
    conns, errors, end = loop.run_until_complete(connect_all(a, n))
    first = f"{type(errors[0]).__name__}:{str(errors[0])[:120]!r}" if errors else ""
    out.put((len(conns), len(errors), end, sorted(CACHE), first))
    release.wait()
    for _, w in conns:
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2,
                    help="client processes the logins are spread over")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds after which an unfinished login counts as failed")
    a = ap.parse_args()
    procs = max(1, min(a.procs, a.clients))
    # Warm-up login: the pool's first server connection is not part of the measurement
    # (and the workers inherit the PBKDF2 cache it filled).
    async def warm_up():
        r, w = await asyncio.wait_for(login(a.port, a.user, a.password, a.db), a.timeout)
        w.close()
    try:
        asyncio.run(warm_up())
    except Exception as e:  # noqa: BLE001
        print(f"warm-up login failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    ctx = multiprocessing.get_context("fork")
    barrier, out, release = ctx.Barrier(procs + 1), ctx.Queue(), ctx.Event()
    shares = [a.clients // procs + (1 if i < a.clients % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=worker, args=(a, n, barrier, out, release)) for n in shares]
    for p in workers:
        p.start()
    cpu0 = cpu_seconds(a.pid)
    barrier.wait()
    t0 = time.monotonic()
    reports = [out.get(timeout=a.timeout + 60) for _ in workers]
    cpu = cpu_seconds(a.pid) - cpu0
    release.set()
    for p in workers:
        p.join()
    ok = sum(r[0] for r in reports)
    failed = sum(r[1] for r in reports)
    wall = max(r[2] for r in reports) - t0
    salts = set()
    for r in reports:
        salts.update(r[3])
    line = (f"clients={a.clients} ok={ok} failed={failed} all_ready_s={wall:.3f} "
            f"pooler_cpu_s={cpu:.3f} pooler_cpu_per_login_us={cpu / max(ok, 1) * 1e6:.0f} "
            f"distinct_salts={len(salts)} procs={procs}")
    first = next((r[4] for r in reports if r[4]), "")
    if first:
        line += f" first_error={first}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
