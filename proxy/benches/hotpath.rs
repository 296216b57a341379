//! Micro-benchmarks for the per-message hot path: framing, the client → server pump,
//! the server → client scan, statement lookups, the per-checkout parameter check, and the
//! pool's checkout and check-in (alone and contended). None of them needs PostgreSQL: the
//! pool's servers log in to a stand-in that answers the startup packet and nothing else.
//!
//! Run: `cargo bench -p pgmux-proxy --bench hotpath -- --warm-up-time 1 --measurement-time 3`

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgmux_config::{ServerAddr, SessionStateAction};
use pgmux_proxy::backend::{Expect, Server, ServerStream};
use pgmux_proxy::params::{ClientParams, ServerParams};
use pgmux_proxy::pool::PoolStats;
use pgmux_proxy::prepared::{ClientStatements, Registry, ServerStatements};
use pgmux_proxy::protocol::frame::{complete_frame_len, split_frame};
use pgmux_proxy::relay::{pump_client, scan_server, Pump, StateCheck};

const MAX: usize = 1 << 20;
const PGBENCH_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
const PREPARED_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// Parameter types of the Parse body: one parameter, int4.
const PARAM_TYPES: &[u8] = &[0, 1, 0, 0, 0, 23];

#[path = "standin.rs"]
mod standin;

use standin::message as msg;

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

fn query(out: &mut BytesMut, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(out, b'Q', &b);
}

fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(PARAM_TYPES);
    msg(out, b'P', &b);
}

/// Bind of `stmt` to the unnamed portal, one text parameter "12345", default formats.
fn bind(out: &mut BytesMut, stmt: &str) {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter format codes
    b.extend_from_slice(&1i16.to_be_bytes()); // parameters
    b.extend_from_slice(&5i32.to_be_bytes());
    b.extend_from_slice(b"12345");
    b.extend_from_slice(&0i16.to_be_bytes()); // result format codes
    msg(out, b'B', &b);
}

fn describe_portal(out: &mut BytesMut) {
    msg(out, b'D', b"P\0");
}

fn execute(out: &mut BytesMut) {
    let mut b = Vec::new();
    cstr(&mut b, "");
    b.extend_from_slice(&0i32.to_be_bytes());
    msg(out, b'E', &b);
}

fn sync(out: &mut BytesMut) {
    msg(out, b'S', b"");
}

/// 1,000 messages: pgbench simple-protocol queries and unnamed Bind/Execute/Sync groups.
fn pgbench_wire() -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let mut n = 0;
    while n < 1000 {
        query(&mut out, PGBENCH_SQL);
        bind(&mut out, "");
        execute(&mut out);
        sync(&mut out);
        n += 4;
    }
    (out, n)
}

fn bench_frame(c: &mut Criterion) {
    let (wire, count) = pgbench_wire();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("split", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                let mut n = 0;
                while let Some(f) = split_frame(&mut buf, MAX).unwrap() {
                    black_box(&f);
                    n += 1;
                }
                assert_eq!(n, count);
                buf
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("complete_frame_len", |b| {
        b.iter(|| {
            let buf = black_box(&wire[..]);
            let mut pos = 0;
            let mut n = 0;
            while let Some((tag, len)) = complete_frame_len(&buf[pos..], MAX).unwrap() {
                black_box(tag);
                pos += len;
                n += 1;
            }
            assert_eq!(n, count);
            pos
        })
    });
    g.finish();
}

fn server_addr() -> Arc<ServerAddr> {
    Arc::new(ServerAddr {
        host: "/tmp".into(),
        port: 5432,
        dbname: "x".into(),
        params: Default::default(),
        tls: Default::default(),
    })
}

/// A server without PostgreSQL behind it: the relay functions never touch the stream.
fn detached_server() -> (Server, tokio::net::UnixStream) {
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    (Server::detached(ServerStream::Unix(a), server_addr()), b)
}

fn bench_pump_client(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let (mut server, _peer) = detached_server();
    let registry = Registry::default();
    let stats = PoolStats::default();
    let mut statements = ClientStatements::default();
    let stmt = registry.get_or_create(
        Bytes::from_static(PREPARED_SQL.as_bytes()),
        Bytes::from_static(PARAM_TYPES),
    );
    statements.insert("s1".into(), stmt.clone());
    server.statements.prepare(&stmt, 500);

    // Per round: a simple query, an unnamed P/B/D/E/S group, and a Bind/Execute/Sync of
    // the named statement the server already has (the rewrite path).
    const ROUNDS: usize = 100;
    let mut wire = BytesMut::new();
    for _ in 0..ROUNDS {
        query(&mut wire, PGBENCH_SQL);
        parse(&mut wire, "", PREPARED_SQL);
        bind(&mut wire, "");
        describe_portal(&mut wire);
        execute(&mut wire);
        sync(&mut wire);
        bind(&mut wire, "s1");
        execute(&mut wire);
        sync(&mut wire);
    }
    let msgs = ROUNDS * 9;

    let mut out = BytesMut::new();
    let mut client_out = BytesMut::new();
    let mut skip_to_sync = false;

    // Sanity check: everything is consumed, nothing answered locally.
    {
        let mut rbuf = wire.clone();
        let mut p = Pump {
            server: &mut server,
            out: &mut out,
            client_out: &mut client_out,
            statements: &mut statements,
            registry: &registry,
            stats: &stats,
            max_prepared: 500,
            skip_to_sync: &mut skip_to_sync,
            one_unit: false,
            unit_ended: false,
            // Session-state detection on, as by default.
            state: StateCheck::new(Some(SessionStateAction::Pin)),
            track: &[],
        };
        assert!(!pump_client(&mut rbuf, &mut p, MAX).unwrap());
        assert!(rbuf.is_empty());
        assert!(client_out.is_empty() && !skip_to_sync);
        // Q, P, B, D, E, S, B, E, S: every message expects an answer.
        assert_eq!(server.expect.len(), msgs);
        server.expect.clear();
        out.clear();
    }

    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("pump_client", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut rbuf| {
                let mut p = Pump {
                    server: &mut server,
                    out: &mut out,
                    client_out: &mut client_out,
                    statements: &mut statements,
                    registry: &registry,
                    stats: &stats,
                    max_prepared: 500,
                    skip_to_sync: &mut skip_to_sync,
                    one_unit: false,
                    unit_ended: false,
                    state: StateCheck::new(Some(SessionStateAction::Pin)),
                    track: &[],
                };
                let terminate = pump_client(&mut rbuf, &mut p, MAX).unwrap();
                black_box(terminate);
                server.expect.clear();
                out.clear();
                client_out.clear();
                rbuf
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One response to `SELECT abalance …`: RowDescription, DataRow, CommandComplete,
/// ReadyForQuery.
fn select_response(out: &mut BytesMut) {
    let mut t = Vec::new();
    t.extend_from_slice(&1i16.to_be_bytes());
    cstr(&mut t, "abalance");
    t.extend_from_slice(&16_396i32.to_be_bytes()); // table oid
    t.extend_from_slice(&3i16.to_be_bytes()); // column number
    t.extend_from_slice(&23i32.to_be_bytes()); // int4
    t.extend_from_slice(&4i16.to_be_bytes());
    t.extend_from_slice(&(-1i32).to_be_bytes());
    t.extend_from_slice(&0i16.to_be_bytes());
    msg(out, b'T', &t);
    let mut d = Vec::new();
    d.extend_from_slice(&1i16.to_be_bytes());
    d.extend_from_slice(&4i32.to_be_bytes());
    d.extend_from_slice(b"-123");
    msg(out, b'D', &d);
    msg(out, b'C', b"SELECT 1\0");
    msg(out, b'Z', b"I");
}

fn bench_scan_server(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let (mut server, _peer) = detached_server();
    let mut params = ClientParams::default();
    let mut statements = ClientStatements::default();

    const SETS: usize = 100;
    let mut wire = BytesMut::new();
    for _ in 0..SETS {
        select_response(&mut wire);
    }
    let expect = || -> VecDeque<Expect> { (0..SETS).map(|_| Expect::Query).collect() };
    let mut out = BytesMut::new();

    // Sanity check: every byte goes to the client and every Query is answered.
    server.buf = wire.clone();
    server.expect = expect();
    scan_server(&mut server, &mut out, &mut params, &mut statements).unwrap();
    assert!(server.buf.is_empty() && server.expect.is_empty());
    assert_eq!(out.len(), wire.len());
    out.clear();

    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("scan_server", |b| {
        b.iter_batched(
            || (wire.clone(), expect()),
            |(buf, exp)| {
                server.buf = buf;
                server.expect = exp;
                scan_server(&mut server, &mut out, &mut params, &mut statements).unwrap();
                black_box(out.len());
                std::mem::take(&mut out)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_prepared(c: &mut Criterion) {
    let registry = Registry::default();
    // Some unrelated statements so the map is not trivially small.
    let others: Vec<_> = (0..100)
        .map(|i| {
            registry.get_or_create(
                Bytes::from(format!("SELECT * FROM t{i} WHERE id = $1")),
                Bytes::from_static(PARAM_TYPES),
            )
        })
        .collect();
    let query = Bytes::from_static(PREPARED_SQL.as_bytes());
    let types = Bytes::from_static(PARAM_TYPES);
    let stmt = registry.get_or_create(query.clone(), types.clone());
    let mut server = ServerStatements::default();
    for s in &others {
        server.prepare(s, 500);
    }
    server.prepare(&stmt, 500);

    let mut g = c.benchmark_group("prepared");
    g.throughput(Throughput::Elements(1));
    g.bench_function("registry/get_or_create_hit", |b| {
        b.iter(|| {
            let s = registry.get_or_create(black_box(query.clone()), black_box(types.clone()));
            assert_eq!(s.id, stmt.id);
            s
        })
    });
    g.bench_function("registry/get_hit", |b| {
        b.iter(|| {
            registry
                .get(black_box(PREPARED_SQL.as_bytes()), black_box(PARAM_TYPES))
                .expect("alive")
        })
    });
    g.bench_function("server_statements/touch_hit", |b| {
        b.iter(|| assert!(server.touch(black_box(&stmt))))
    });
    g.finish();
}

fn bench_params(c: &mut Criterion) {
    let startup: Vec<(String, String)> = [
        ("application_name", "pgbench"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("TimeZone", "Etc/UTC"),
        ("standard_conforming_strings", "on"),
        ("default_transaction_read_only", "off"),
        ("server_version", "15.18"),
        ("integer_datetimes", "on"),
        ("is_superuser", "off"),
        ("session_authorization", "app"),
        ("server_encoding", "UTF8"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let server = ServerParams::from_startup(startup);
    let requested = vec![
        ("application_name".to_owned(), "pgbench".to_owned()),
        ("client_encoding".to_owned(), "UTF8".to_owned()),
    ];
    let client = ClientParams::new(&server, &requested).expect("valid params");
    assert_eq!(client.sync_sql(&server), None);

    let mut g = c.benchmark_group("params");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sync_sql_equal", |b| {
        b.iter(|| black_box(&client).sync_sql(black_box(&server)))
    });
    g.finish();
}

/// Read/write classification per transaction: the parser's raw cost, a cached text, a new
/// text every time (parse + walk + cache insert), and a write the keyword pre-filter answers.
fn bench_router(c: &mut Criterion) {
    use pgmux_proxy::router::{Class, Router, WhyPrimary};
    const UPDATE_SQL: &str =
        "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 12345;";
    let router = Router::new(&[]);
    assert_eq!(router.classify(PGBENCH_SQL).class, Class::Read);

    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pg_query_parse_select", |b| {
        b.iter(|| pg_query::parse(black_box(PGBENCH_SQL), 0).expect("parses"))
    });
    g.bench_function("pg_query_parse_update", |b| {
        b.iter(|| pg_query::parse(black_box(UPDATE_SQL), 0).expect("parses"))
    });
    g.bench_function("classify_select_cached", |b| {
        b.iter(|| assert_eq!(router.classify(black_box(PGBENCH_SQL)).class, Class::Read))
    });
    let mut aid = 0u64;
    g.bench_function("classify_select_uncached", |b| {
        b.iter_batched(
            || {
                aid += 1;
                format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
            },
            |sql| assert_eq!(router.classify(&sql).class, Class::Read),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("classify_update_prefilter", |b| {
        b.iter(|| {
            assert_eq!(
                router.classify(black_box(UPDATE_SQL)).class,
                Class::Primary(WhyPrimary::Write)
            )
        })
    });
    g.finish();
}

/// Session-state detection, run on every Query and Parse text.
fn bench_session_state(c: &mut Criterion) {
    use pgmux_proxy::sessionstate::{detect, Feature};
    const UPDATE_SQL: &str =
        "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 12345;";
    const INSERT_SQL: &str = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
                              VALUES (7, 1, 12345, -1234, CURRENT_TIMESTAMP);";
    let mut g = c.benchmark_group("session_state");
    g.throughput(Throughput::Elements(1));
    for (name, sql, want) in [
        ("select", PGBENCH_SQL, None),
        ("update", UPDATE_SQL, None),
        ("insert", INSERT_SQL, None),
        (
            "set_search_path",
            "SET search_path = tenant_a, public",
            Some(Feature::Set),
        ),
    ] {
        assert_eq!(detect(sql.as_bytes()), want);
        g.bench_function(name, |b| b.iter(|| detect(black_box(sql.as_bytes()))));
    }
    g.finish();
}

fn bench_pool(c: &mut Criterion) {
    use std::time::{Duration, Instant};
    const SERVERS: usize = 8;
    const TASKS: u64 = 32;
    const WAIT: Duration = Duration::from_secs(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let at = rt.block_on(standin::login_only_server());
    let pool = standin::pool(at, SERVERS);
    // Open every server once, so that the measured checkouts only take idle ones.
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..SERVERS {
            held.push(
                pool.checkout(WAIT)
                    .await
                    .expect("the stand-in logs servers in"),
            );
        }
    });
    assert_eq!(pool.counts().idle, SERVERS);
    let mut g = c.benchmark_group("pool");
    // One client: take an idle server and give it back.
    g.bench_function("checkout_checkin", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    drop(pool.checkout(WAIT).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    // 32 clients on 8 servers, each holding its server across a yield: most checkouts
    // wait and get a server handed over by the one releasing it. Per checkout.
    g.bench_function("contended_32_clients_8_servers", |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(TASKS);
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let pool = pool.clone();
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                let server = pool.checkout(WAIT).await.unwrap();
                                tokio::task::yield_now().await;
                                drop(server);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * TASKS) as f64)
            })
        })
    });
    g.finish();
    assert_eq!(pool.counts().idle, SERVERS, "every server came back clean");
}

criterion_group!(
    benches,
    bench_pool,
    bench_session_state,
    bench_frame,
    bench_pump_client,
    bench_scan_server,
    bench_prepared,
    bench_params,
    bench_router
);
criterion_main!(benches);
