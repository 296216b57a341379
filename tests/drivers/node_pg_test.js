#!/usr/bin/env node
// node-postgres workload for pgmux (run by tests/drivers.rs).
//
// 30 concurrent `new pg.Client` connections to $PGMUX_TEST_URL, each running
// named queries ({name, text, values}: parsed once per connection, then
// executed by name, typically on another server connection behind pgmux)
// many times, inside and outside transactions, plus named queries that fail
// (at execution and at parse time) after which the client must stay usable.
// Checks every result, prints one JSON summary line, and exits non-zero with
// a message on stderr on any error or wrong result.
'use strict';

const pg = require('pg');

const CLIENTS = 30;
const ITERATIONS = 40;
const ROWS_PER_BATCH = 3;
const TABLE = 'node_pg_drv_rows';
const OVERALL_TIMEOUT_MS = 100000; // the Rust harness kills us at 120 s

class WrongResult extends Error {}

function check(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) throw new WrongResult(`${what}: got ${g}, want ${w}`);
}

const ADD = 'select $1::int + $2::int as s';
const SERIES =
  "select g, $1::text || g::text as label from generate_series(1, $2::int) as g order by g";
const INSERT = `insert into ${TABLE}(worker, iter, n) values ($1, $2, $3)`;
const COUNT = `select count(*)::int as c from ${TABLE} where worker = $1 and iter = $2`;

function batches() {
  let n = 0;
  for (let i = 0; i < ITERATIONS; i += 4) n++;
  return n;
}

async function expectError(what, promise, code) {
  try {
    await promise;
  } catch (e) {
    if (e.code !== code) {
      throw new WrongResult(`${what}: expected SQLSTATE ${code}, got ${e.code}: ${e.message}`);
    }
    return;
  }
  throw new WrongResult(`${what}: expected SQLSTATE ${code}, but the query succeeded`);
}

async function worker(url, w, stats) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 60000 });
  await client.connect();
  try {
    for (let i = 0; i < ITERATIONS; i++) {
      const a = w * 1000 + i;
      const b = 3 * i - w;
      let r = await client.query({ name: 'add', text: ADD, values: [a, b] });
      check(`w${w} i${i} add`, r.rows, [{ s: a + b }]);

      const n = 2 + ((w + i) % 5);
      r = await client.query({ name: 'series', text: SERIES, values: [`w${w}-`, n] });
      const want = [];
      for (let g = 1; g <= n; g++) want.push({ g, label: `w${w}-${g}` });
      check(`w${w} i${i} series`, r.rows, want);

      if (i % 4 === 0) {
        await client.query('begin');
        for (let k = 0; k < ROWS_PER_BATCH; k++) {
          await client.query({ name: 'insert', text: INSERT, values: [w, i, k] });
        }
        r = await client.query({ name: 'count', text: COUNT, values: [w, i] });
        check(`w${w} i${i} count in tx`, r.rows, [{ c: ROWS_PER_BATCH }]);
        r = await client.query({ name: 'add', text: ADD, values: [i, 1] });
        check(`w${w} i${i} add in tx`, r.rows, [{ s: i + 1 }]);
        await client.query('commit');
        stats.batches++;
      }

      if (i % 10 === 3) {
        // Fails at execution (Parse succeeds): division by zero.
        await expectError(
          `w${w} i${i} div by zero`,
          client.query({ name: 'div', text: 'select 100 / $1::int as q', values: [0] }),
          '22012'
        );
        r = await client.query({ name: 'div', text: 'select 100 / $1::int as q', values: [4] });
        check(`w${w} i${i} div after error`, r.rows, [{ q: 25 }]);
        // Fails at parse time: syntax error in a named query.
        await expectError(
          `w${w} i${i} syntax error`,
          client.query({ name: 'broken', text: 'selec $1::int', values: [1] }),
          '42601'
        );
        // Fails inside a transaction: the transaction is aborted and rolled back.
        await client.query('begin');
        await client.query({ name: 'insert', text: INSERT, values: [w, -1, -1] });
        await expectError(
          `w${w} i${i} div by zero in tx`,
          client.query({ name: 'div', text: 'select 100 / $1::int as q', values: [0] }),
          '22012'
        );
        await client.query('rollback');
        r = await client.query({ name: 'add', text: ADD, values: [2, 2] });
        check(`w${w} i${i} add after errors`, r.rows, [{ s: 4 }]);
        stats.expectedErrors += 3;
      }
      stats.iterations++;
    }
    const r = await client.query({
      name: 'final',
      text: `select count(*)::int as c, count(*) filter (where n < 0)::int as neg from ${TABLE} where worker = $1`,
      values: [w],
    });
    check(`w${w} final count`, r.rows, [{ c: batches() * ROWS_PER_BATCH, neg: 0 }]);
  } finally {
    await client.end();
  }
}

async function main(url) {
  const setup = new pg.Client({ connectionString: url, connectionTimeoutMillis: 60000 });
  await setup.connect();
  try {
    await setup.query(
      `create table if not exists ${TABLE}(id bigserial primary key, worker int not null, ` +
        'iter int not null, n int not null)'
    );
    await setup.query(`truncate ${TABLE}`);
  } finally {
    await setup.end();
  }

  const stats = { iterations: 0, batches: 0, expectedErrors: 0 };
  const started = Date.now();
  const results = await Promise.allSettled(
    Array.from({ length: CLIENTS }, (_, w) => worker(url, w, stats))
  );
  const failed = results
    .map((r, w) => ({ w, r }))
    .filter(({ r }) => r.status === 'rejected');
  if (failed.length > 0) {
    for (const { w, r } of failed.slice(0, 5)) {
      const e = r.reason;
      console.error(`node-postgres client ${w} failed: ${e && e.code ? `[${e.code}] ` : ''}${e && e.stack ? e.stack : e}`);
    }
    const first = failed[0].r.reason;
    throw new Error(
      `${failed.length} of ${CLIENTS} node-postgres clients failed ` +
        `(first, client ${failed[0].w}: ${first && first.code ? `[${first.code}] ` : ''}${first && first.message ? first.message : first})`
    );
  }

  const check_client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 60000 });
  await check_client.connect();
  let total;
  try {
    total = (await check_client.query(`select count(*)::int as c from ${TABLE}`)).rows[0].c;
  } finally {
    await check_client.end();
  }
  check('total rows', total, CLIENTS * batches() * ROWS_PER_BATCH);
  check('iterations', stats.iterations, CLIENTS * ITERATIONS);
  console.log(
    JSON.stringify({
      driver: 'node-postgres',
      version: require('pg/package.json').version,
      node: process.version,
      ok: true,
      clients: CLIENTS,
      iterations: stats.iterations,
      rows: total,
      expected_errors: stats.expectedErrors,
      seconds: (Date.now() - started) / 1000,
    })
  );
}

const url = process.env.PGMUX_TEST_URL;
if (!url) {
  console.error('FAIL: PGMUX_TEST_URL is not set');
  process.exit(1);
}
const timer = setTimeout(() => {
  console.error(`FAIL: node-postgres workload did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
timer.unref();
main(url).then(
  () => process.exit(0),
  (e) => {
    if (e instanceof WrongResult) console.error(`FAIL: wrong result: ${e.message}`);
    else console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  }
);
