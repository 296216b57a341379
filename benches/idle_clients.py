#!/usr/bin/env python3
"""Opens N idle, authenticated client connections to a pooler and reports the pooler's RSS.

Usage: benches/idle_clients.py --port 6432 --pid PID --clients 10000
                               [--user bench --db bench] [--password PW] [--timeout 60]

Without --password the pooler must accept the user without a password (trust), so that the
measurement is about connection state, not the client's own SCRAM cost. With --password the
clients log in with SCRAM-SHA-256 (benches/scram_logins.py; the client caches its PBKDF2
result per salt, so this is only fast against a pooler that keeps one salt per user).

One warm-up client logs in first, so the pool's first server login is not counted per
client; the baseline is the pooler's RSS after it, before the N clients connect. Prints one
line:
  clients=N ok=N failed=N connect_s=S rss_before_kib=K rss_after_kib=K per_client_kib=K
  [first_error=...]
per_client_kib is (after - before) / ok. Exit status 1 only if the warm-up client fails.
The clients stay connected (idle) for --hold seconds after the measurement, then disconnect.
"""
import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scram_logins import login  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one(a, sem):
    async with sem:
        return await asyncio.wait_for(login(a.port, a.user, a.password, a.db), a.timeout)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--db", default="bench")
    ap.add_argument("--password", default=None, help="log in with SCRAM-SHA-256 (default: trust)")
    ap.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds after which one unfinished login counts as failed")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to stay connected afterwards")
    a = ap.parse_args()
    try:
        warm = await asyncio.wait_for(login(a.port, a.user, a.password, a.db), a.timeout)
    except Exception as e:  # noqa: BLE001
        print(f"warm-up login failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    await asyncio.sleep(0.5)
    before = rss_kib(a.pid)
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(a, sem) for _ in range(a.clients)), return_exceptions=True)
    connect_s = time.monotonic() - t0
    conns = [x for x in results if not isinstance(x, BaseException)]
    errors = [x for x in results if isinstance(x, BaseException)]
    await asyncio.sleep(a.settle)
    after = rss_kib(a.pid)
    n = len(conns)
    per = f"{(after - before) / n:.2f}" if n else "-"
    line = (f"clients={a.clients} ok={n} failed={len(errors)} connect_s={connect_s:.2f} "
            f"rss_before_kib={before} rss_after_kib={after} per_client_kib={per}")
    if errors:
        e = errors[0]
        line += f" first_error={type(e).__name__}:{str(e)[:120]!r}"
    print(line, flush=True)
    if a.hold > 0:
        await asyncio.sleep(a.hold)
    for _, w in conns + [warm]:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
