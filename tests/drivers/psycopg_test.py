#!/usr/bin/env python3
"""psycopg 3 workload for pgmux (run by tests/drivers.rs).

30 threads, each with its own psycopg.connect($PGMUX_TEST_URL,
prepare_threshold=0), so every query is prepared server-side at once under a
psycopg-chosen name and executed again later (typically on another server
connection behind pgmux). Repeated parameterised queries, transactions,
executemany, pipeline mode and a failing statement; checks every result and
prints one JSON summary line. Exits non-zero with a message on stderr on any
error or wrong result.
"""

import json
import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

THREADS = 30
ITERATIONS = 30
ROWS_PER_BATCH = 4
TABLE = "psycopg_drv_rows"
OVERALL_TIMEOUT = 100  # seconds; the Rust harness kills us at 120 s

ADD = "select %s::int + %s::int"
SERIES = "select g, %s::text || g::text from generate_series(1, %s::int) as g order by g"
INSERT = f"insert into {TABLE}(worker, iter, n) values (%s, %s, %s)"
COUNT = f"select count(*) from {TABLE} where worker = %s and iter = %s"
DIV = "select 100 / %s::int"


class WrongResult(Exception):
    pass


def check(what, got, want):
    if got != want:
        raise WrongResult(f"{what}: got {got!r}, want {want!r}")


def expected_rows_per_worker():
    batches = len(range(0, ITERATIONS, 3))
    pipelines = len(range(1, ITERATIONS, 5))
    return batches * ROWS_PER_BATCH + pipelines


def worker(url, w, stats, lock):
    with psycopg.connect(url, prepare_threshold=0, connect_timeout=60) as conn:
        for i in range(ITERATIONS):
            a, b = w * 1000 + i, 5 * i - w
            with conn.cursor() as cur:
                cur.execute(ADD, (a, b))
                check(f"w{w} i{i} add", cur.fetchone(), (a + b,))
                n = 2 + (w + i) % 5
                cur.execute(SERIES, (f"w{w}-", n))
                check(f"w{w} i{i} series", cur.fetchall(), [(g, f"w{w}-{g}") for g in range(1, n + 1)])
            # Implicit transaction (autocommit off) ends here: the next
            # statement may run on another server connection.
            conn.commit()

            if i % 3 == 0:
                with conn.transaction():
                    with conn.cursor() as cur:
                        cur.executemany(INSERT, [(w, i, k) for k in range(ROWS_PER_BATCH)])
                        cur.execute(COUNT, (w, i))
                        check(f"w{w} i{i} count in tx", cur.fetchone(), (ROWS_PER_BATCH,))

            if i % 5 == 1:
                # Pipeline mode: several statements sent before any result is read.
                with conn.pipeline():
                    c1 = conn.execute(ADD, (i, 100))
                    c2 = conn.execute(SERIES, ("p", 3))
                    conn.execute(INSERT, (w, 1000 + i, -5))
                    c4 = conn.execute(COUNT, (w, 1000 + i))
                    c5 = conn.execute(ADD, (w, w))
                check(f"w{w} i{i} pipeline add", c1.fetchone(), (i + 100,))
                check(f"w{w} i{i} pipeline series", c2.fetchall(), [(1, "p1"), (2, "p2"), (3, "p3")])
                check(f"w{w} i{i} pipeline count", c4.fetchone(), (1,))
                check(f"w{w} i{i} pipeline add2", c5.fetchone(), (2 * w,))
                conn.commit()
                with lock:
                    stats["pipelines"] += 1

            if i % 10 == 7:
                try:
                    conn.execute(DIV, (0,))
                except errors.DivisionByZero:
                    with lock:
                        stats["expected_errors"] += 1
                else:
                    raise WrongResult(f"w{w} i{i}: 100/0 did not raise DivisionByZero")
                conn.rollback()
                check(f"w{w} i{i} div after error", conn.execute(DIV, (4,)).fetchone(), (25,))
                conn.commit()
            with lock:
                stats["iterations"] += 1

        cur = conn.execute(f"select count(*) from {TABLE} where worker = %s", (w,))
        check(f"w{w} final count", cur.fetchone(), (expected_rows_per_worker(),))
        conn.commit()


def main(url):
    if not psycopg.Pipeline.is_supported():
        sys.exit(f"FAIL: this libpq ({psycopg.pq.version()}) does not support pipeline mode")
    with psycopg.connect(url, prepare_threshold=0, autocommit=True, connect_timeout=60) as conn:
        conn.execute(
            f"create table if not exists {TABLE}(id bigserial primary key, worker int not null, "
            f"iter int not null, n int not null)"
        )
        conn.execute(f"truncate {TABLE}")

    stats = {"iterations": 0, "pipelines": 0, "expected_errors": 0}
    lock = threading.Lock()
    failures = {}

    def run(w):
        try:
            worker(url, w, stats, lock)
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            failures[w] = (e, traceback.format_exc())

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(THREADS)]
    for t in threads:
        t.start()
    deadline = started + OVERALL_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [w for w, t in enumerate(threads) if t.is_alive()]
    if hung:
        sys.exit(f"FAIL: {len(hung)} psycopg threads still running after {OVERALL_TIMEOUT} s "
                 f"(workers {hung[:10]}); failures so far: "
                 f"{[f'{type(e).__name__}: {e}' for e, _ in list(failures.values())[:3]]}")
    if failures:
        for w, (e, tb) in sorted(failures.items())[:5]:
            print(f"psycopg worker {w} failed:\n{tb}", file=sys.stderr)
        w, (e, _) = sorted(failures.items())[0]
        sys.exit(f"FAIL: {len(failures)} of {THREADS} psycopg workers failed "
                 f"(first, worker {w}: {type(e).__module__}.{type(e).__name__}: {e})")

    with psycopg.connect(url, prepare_threshold=0, autocommit=True, connect_timeout=60) as conn:
        total = conn.execute(f"select count(*) from {TABLE}").fetchone()[0]
    check("total rows", total, THREADS * expected_rows_per_worker())
    check("iterations", stats["iterations"], THREADS * ITERATIONS)
    print(json.dumps({
        "driver": "psycopg",
        "version": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "ok": True,
        "threads": THREADS,
        "iterations": stats["iterations"],
        "pipelines": stats["pipelines"],
        "rows": total,
        "expected_errors": stats["expected_errors"],
        "seconds": round(time.monotonic() - started, 2),
    }))


if __name__ == "__main__":
    url = os.environ.get("PGMUX_TEST_URL")
    if not url:
        sys.exit("FAIL: PGMUX_TEST_URL is not set")
    try:
        main(url)
    except WrongResult as e:
        sys.exit(f"FAIL: wrong result: {e}")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report anything clearly
        traceback.print_exc()
        sys.exit(f"FAIL: {type(e).__name__}: {e}")
