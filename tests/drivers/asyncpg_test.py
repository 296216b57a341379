#!/usr/bin/env python3
"""asyncpg workload for pgmux (run by tests/drivers.rs).

Connects to $PGMUX_TEST_URL with many concurrent asyncpg connections in
asyncpg's default configuration (statement cache on, so every query is a
named prepared statement), interleaves plain and prepared queries with
explicit transactions, checks every result and prints one JSON summary
line. Exits non-zero with a message on stderr on any error or wrong result.
"""

import asyncio
import json
import os
import sys
import time
import traceback

import asyncpg

CLIENTS = 50
ITERATIONS = 30
ROWS_PER_BATCH = 4
TABLE = "asyncpg_drv_rows"
OVERALL_TIMEOUT = 100  # seconds; the Rust harness kills us at 120 s


class WrongResult(Exception):
    pass


class Failed(Exception):
    """Some workers failed; the details were printed to stderr."""


def check(what, got, want):
    if got != want:
        raise WrongResult(f"{what}: got {got!r}, want {want!r}")


async def worker(url, w, stats):
    conn = await asyncpg.connect(url, timeout=60)
    try:
        # Prepared once, executed in every iteration (so mostly on a server
        # connection other than the one it was prepared on).
        mul = await conn.prepare("select $1::int * $2::int as p, $3::text || '-' || $1::text as label")
        series = await conn.prepare(
            "select g, g * $1::int as m from generate_series(1, $2::int) as g order by g"
        )
        div = await conn.prepare("select 100 / $1::int")
        for i in range(ITERATIONS):
            a, b = w * 1000 + i, i * 7 - w
            # Cached statement (asyncpg's statement cache names it).
            check(f"w{w} i{i} add", await conn.fetchval("select $1::int + $2::int", a, b), a + b)

            row = await mul.fetchrow(i, w, f"w{w}")
            check(f"w{w} i{i} mul.p", row["p"], i * w)
            check(f"w{w} i{i} mul.label", row["label"], f"w{w}-{i}")

            n = 3 + (i + w) % 5
            rows = await series.fetch(w + 1, n)
            check(f"w{w} i{i} series", [(r["g"], r["m"]) for r in rows],
                  [(g, g * (w + 1)) for g in range(1, n + 1)])

            # conn.fetch with several rows (statement cache again).
            rows = await conn.fetch(
                "select x, x::text || $2::text as s from unnest($1::int[]) as x order by x",
                [i, i + 1, i + 2], "!",
            )
            check(f"w{w} i{i} unnest", [tuple(r) for r in rows],
                  [(x, f"{x}!") for x in (i, i + 1, i + 2)])

            if i % 3 == 0:
                # Explicit transaction: executemany, then read back inside it.
                async with conn.transaction():
                    await conn.executemany(
                        f"insert into {TABLE}(worker, iter, n) values ($1, $2, $3)",
                        [(w, i, k) for k in range(ROWS_PER_BATCH)],
                    )
                    cnt = await conn.fetchval(
                        f"select count(*) from {TABLE} where worker = $1 and iter = $2", w, i
                    )
                    check(f"w{w} i{i} count in tx", cnt, ROWS_PER_BATCH)
                    s = await mul.fetchval(2, 21, "tx")
                    check(f"w{w} i{i} mul in tx", s, 42)
                stats["batches"] += 1

            if i % 10 == 5:
                # A failing prepared statement outside a transaction...
                try:
                    await div.fetchval(0)
                except asyncpg.exceptions.DivisionByZeroError:
                    stats["expected_errors"] += 1
                else:
                    raise WrongResult(f"w{w} i{i}: 100/0 did not raise DivisionByZeroError")
                check(f"w{w} i{i} div after error", await div.fetchval(4), 25)
                # ...and inside a transaction (which is then rolled back).
                try:
                    async with conn.transaction():
                        await conn.execute(
                            f"insert into {TABLE}(worker, iter, n) values ($1, $2, -1)", w, i
                        )
                        await div.fetchval(0)
                except asyncpg.exceptions.DivisionByZeroError:
                    stats["expected_errors"] += 1
                else:
                    raise WrongResult(f"w{w} i{i}: 100/0 in tx did not raise DivisionByZeroError")
                check(f"w{w} i{i} status after rollback",
                      await conn.fetchval("select $1::text", "still usable"), "still usable")
            stats["iterations"] += 1
        # Everything this worker committed, and nothing from rolled-back txs.
        cnt = await conn.fetchval(f"select count(*) from {TABLE} where worker = $1", w)
        check(f"w{w} final count", cnt, ROWS_PER_BATCH * len(range(0, ITERATIONS, 3)))
        neg = await conn.fetchval(f"select count(*) from {TABLE} where worker = $1 and n < 0", w)
        check(f"w{w} rolled-back rows", neg, 0)
    finally:
        await conn.close()


async def main(url):
    setup = await asyncpg.connect(url, timeout=60)
    try:
        await setup.execute(
            f"create table if not exists {TABLE}(id bigserial primary key, worker int not null, "
            f"iter int not null, n int not null)"
        )
        await setup.execute(f"truncate {TABLE}")
    finally:
        await setup.close()

    stats = {"iterations": 0, "batches": 0, "expected_errors": 0}
    started = time.monotonic()
    results = await asyncio.gather(
        *(worker(url, w, stats) for w in range(CLIENTS)), return_exceptions=True
    )
    errors = [(w, r) for w, r in enumerate(results) if isinstance(r, BaseException)]
    if errors:
        for w, e in errors[:5]:
            print(f"asyncpg worker {w} failed: {type(e).__module__}.{type(e).__name__}: {e}",
                  file=sys.stderr)
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        raise Failed(f"{len(errors)} of {CLIENTS} asyncpg workers failed "
                         f"(first: {type(errors[0][1]).__name__}: {errors[0][1]})")

    check_conn = await asyncpg.connect(url, timeout=60)
    try:
        total = await check_conn.fetchval(f"select count(*) from {TABLE}")
    finally:
        await check_conn.close()
    want = CLIENTS * ROWS_PER_BATCH * len(range(0, ITERATIONS, 3))
    check("total rows", total, want)
    check("iterations", stats["iterations"], CLIENTS * ITERATIONS)
    print(json.dumps({
        "driver": "asyncpg",
        "version": asyncpg.__version__,
        "ok": True,
        "clients": CLIENTS,
        "iterations": stats["iterations"],
        "rows": total,
        "expected_errors": stats["expected_errors"],
        "seconds": round(time.monotonic() - started, 2),
    }))


if __name__ == "__main__":
    url = os.environ.get("PGMUX_TEST_URL")
    if not url:
        sys.exit("FAIL: PGMUX_TEST_URL is not set")
    try:
        asyncio.run(asyncio.wait_for(main(url), OVERALL_TIMEOUT))
    except asyncio.TimeoutError:
        sys.exit(f"FAIL: asyncpg workload did not finish within {OVERALL_TIMEOUT} s")
    except WrongResult as e:
        sys.exit(f"FAIL: wrong result: {e}")
    except Failed as e:
        sys.exit(f"FAIL: {e}")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report anything clearly
        traceback.print_exc()
        sys.exit(f"FAIL: {type(e).__name__}: {e}")
