#!/usr/bin/env python3
"""SQLAlchemy (async engine on asyncpg) workload for pgmux (run by tests/drivers.rs).

create_async_engine("postgresql+asyncpg://...", pool_size=20) in its default
configuration (asyncpg's prepared statement cache on), 30 concurrent tasks
running text() queries with bound parameters and Core insert/select in
transactions. Checks every result and prints one JSON summary line; exits
non-zero with a message on stderr on any error or wrong result.
"""

import asyncio
import json
import os
import sys
import time
import traceback

import asyncpg
import sqlalchemy
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

TASKS = 30
ITERATIONS = 25
ROWS_PER_BATCH = 3
TABLE = "sqla_drv_items"
OVERALL_TIMEOUT = 100  # seconds; the Rust harness kills us at 120 s

metadata = MetaData()
items = Table(
    TABLE,
    metadata,
    Column("id", Integer, primary_key=True),
    Column("worker", Integer, nullable=False),
    Column("iter", Integer, nullable=False),
    Column("label", String, nullable=False),
)


class WrongResult(Exception):
    pass


class Failed(Exception):
    """Some workers failed; the details were printed to stderr."""


def check(what, got, want):
    if got != want:
        raise WrongResult(f"{what}: got {got!r}, want {want!r}")


def engine_url(url):
    u = make_url(url)
    return u.set(drivername="postgresql+asyncpg")


async def task(engine, w, stats):
    add = text("select cast(:a as integer) + cast(:b as integer) as s")
    rows_q = text(
        "select g, cast(:prefix as text) || g::text as label "
        "from generate_series(1, cast(:n as integer)) as g order by g"
    )
    for i in range(ITERATIONS):
        a, b = w * 100 + i, 3 * i - w
        # Autobegin/rollback connection: plain text() queries.
        async with engine.connect() as conn:
            got = (await conn.execute(add, {"a": a, "b": b})).scalar_one()
            check(f"t{w} i{i} add", got, a + b)
            n = 2 + (w + i) % 4
            res = (await conn.execute(rows_q, {"prefix": f"w{w}-", "n": n})).all()
            check(f"t{w} i{i} rows", [tuple(r) for r in res],
                  [(g, f"w{w}-{g}") for g in range(1, n + 1)])

        # Core insert (executemany) + select in one transaction.
        async with engine.begin() as conn:
            await conn.execute(
                items.insert(),
                [{"worker": w, "iter": i, "label": f"w{w}-i{i}-k{k}"} for k in range(ROWS_PER_BATCH)],
            )
            cnt = (await conn.execute(
                select(func.count()).select_from(items).where(items.c.worker == w, items.c.iter == i)
            )).scalar_one()
            check(f"t{w} i{i} count in tx", cnt, ROWS_PER_BATCH)
            labels = (await conn.execute(
                select(items.c.label).where(items.c.worker == w, items.c.iter == i).order_by(items.c.label)
            )).scalars().all()
            check(f"t{w} i{i} labels", labels, [f"w{w}-i{i}-k{k}" for k in range(ROWS_PER_BATCH)])
            got = (await conn.execute(add, {"a": i, "b": 1})).scalar_one()
            check(f"t{w} i{i} add in tx", got, i + 1)

        if i % 8 == 4:
            # A failing statement rolls back its transaction; the pool's
            # connections stay usable.
            try:
                async with engine.begin() as conn:
                    await conn.execute(items.insert(), {"worker": w, "iter": -1, "label": "rolled back"})
                    await conn.execute(text("select 1 / cast(:z as integer)"), {"z": 0})
            except sqlalchemy.exc.DBAPIError as e:
                # SQLSTATE 22012 = division_by_zero; the asyncpg exception is the cause.
                if getattr(e.orig, "sqlstate", None) != "22012" or not isinstance(
                    e.orig.__cause__, asyncpg.exceptions.DivisionByZeroError
                ):
                    raise
                stats["expected_errors"] += 1
            else:
                raise WrongResult(f"t{w} i{i}: 1/0 did not raise")
        stats["iterations"] += 1

    async with engine.connect() as conn:
        cnt = (await conn.execute(
            select(func.count()).select_from(items).where(items.c.worker == w)
        )).scalar_one()
        check(f"t{w} final count", cnt, ITERATIONS * ROWS_PER_BATCH)


async def main(url):
    engine = create_async_engine(engine_url(url), pool_size=20)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                f"create table if not exists {TABLE}(id serial primary key, worker int not null, "
                f"iter int not null, label text not null)"
            ))
            await conn.execute(text(f"truncate {TABLE}"))

        stats = {"iterations": 0, "expected_errors": 0}
        started = time.monotonic()
        results = await asyncio.gather(
            *(task(engine, w, stats) for w in range(TASKS)), return_exceptions=True
        )
        errors = [(w, r) for w, r in enumerate(results) if isinstance(r, BaseException)]
        if errors:
            for w, e in errors[:5]:
                print(f"sqlalchemy task {w} failed: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            raise Failed(f"{len(errors)} of {TASKS} SQLAlchemy tasks failed "
                             f"(first: {type(errors[0][1]).__name__}: {errors[0][1]})")

        async with engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(items))).scalar_one()
            rolled_back = (await conn.execute(
                select(func.count()).select_from(items).where(items.c.iter < 0)
            )).scalar_one()
        check("total rows", total, TASKS * ITERATIONS * ROWS_PER_BATCH)
        check("rolled-back rows", rolled_back, 0)
        check("iterations", stats["iterations"], TASKS * ITERATIONS)
        print(json.dumps({
            "driver": "sqlalchemy+asyncpg",
            "version": sqlalchemy.__version__,
            "ok": True,
            "tasks": TASKS,
            "iterations": stats["iterations"],
            "rows": total,
            "expected_errors": stats["expected_errors"],
            "seconds": round(time.monotonic() - started, 2),
        }))
    finally:
        await engine.dispose()


if __name__ == "__main__":
    url = os.environ.get("PGMUX_TEST_URL")
    if not url:
        sys.exit("FAIL: PGMUX_TEST_URL is not set")
    try:
        asyncio.run(asyncio.wait_for(main(url), OVERALL_TIMEOUT))
    except asyncio.TimeoutError:
        sys.exit(f"FAIL: SQLAlchemy workload did not finish within {OVERALL_TIMEOUT} s")
    except WrongResult as e:
        sys.exit(f"FAIL: wrong result: {e}")
    except Failed as e:
        sys.exit(f"FAIL: {e}")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report anything clearly
        traceback.print_exc()
        sys.exit(f"FAIL: {type(e).__name__}: {e}")
