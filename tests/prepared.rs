//! Named prepared statements in transaction mode: statements prepared on one server
//! connection and used on another, through a pool much smaller than the client count.

mod support;

use std::time::Duration;

use futures::future::join_all;
use support::{connect, Pgmux, RawConn, TestDb};
use tokio_postgres::error::SqlState;

fn env() -> TestDb {
    TestDb::new("prep")
}

fn sqlstate(msgs: &[support::Message]) -> Option<String> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| RawConn::error_fields(b)[&'C'].clone())
}

fn tags(msgs: &[support::Message]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    RawConn::frame(b'P', &b)
}

fn bind(stmt: &str, params: &[&str]) -> Vec<u8> {
    let mut b = vec![0u8]; // unnamed portal
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes()); // all params text
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes()); // all results text
    RawConn::frame(b'B', &b)
}

fn describe_stmt(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    RawConn::frame(b'D', &b)
}

fn close_stmt(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    RawConn::frame(b'C', &b)
}

fn execute() -> Vec<u8> {
    RawConn::frame(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    RawConn::frame(b'S', b"")
}

fn first_value(msgs: &[support::Message]) -> String {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&body[6..6 + len]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_statements_move_between_servers() {
    let env = env();
    env.setup("create table kv(k int primary key, v text)");
    let px = env.pgmux(&["--pool-size", "4"]);
    let url = env.url(&px);
    let tasks = (0..50).map(|i: i32| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut c = connect(&url).await;
            // Same names (s0, s1…) on every connection, different texts per client.
            let add = c.prepare("select $1::int + $2::int").await.unwrap();
            let own = c.prepare(&format!("select $1::int * {i}")).await.unwrap();
            let ins = c.prepare("insert into kv values ($1, $2)").await.unwrap();
            for n in 0..20i32 {
                let r: i32 = c.query_one(&add, &[&n, &i]).await.unwrap().get(0);
                assert_eq!(r, n + i);
                let r: i32 = c.query_one(&own, &[&n]).await.unwrap().get(0);
                assert_eq!(r, n * i, "client {i} ran another client's statement");
                if n % 5 == 0 {
                    let tx = c.transaction().await.unwrap();
                    tx.execute(&ins, &[&(i * 1000 + n), &format!("c{i}-{n}")])
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }
            // A dropped statement is closed; preparing it again works.
            drop(own);
            let own = c.prepare(&format!("select $1::int * {i}")).await.unwrap();
            let r: i32 = c.query_one(&own, &[&3]).await.unwrap().get(0);
            assert_eq!(r, 3 * i);
            // Pipelined: several Bind/Execute of prepared statements in flight at once.
            let futs = (0..10i32).map(|n| {
                let (c, add) = (&c, &add);
                async move { c.query_one(add, &[&n, &n]).await.unwrap().get::<_, i32>(0) }
            });
            let got = join_all(futs).await;
            assert_eq!(got, (0..10).map(|n| 2 * n).collect::<Vec<_>>());
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    let n = env
        .cluster
        .primary()
        .psql(&env.db, "select count(*) from kv");
    assert_eq!(n, "200");
    assert!(env.cluster.primary().backend_count(&env.user) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_statement_lifecycle() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "2"]);
    let mut a = env.raw(&px);
    let mut b = env.raw(&px);
    // Both clients use the name "s1" for different queries.
    let mut pkt = parse("s1", "select 'from-a'::text");
    pkt.extend(sync());
    a.send(&pkt);
    assert_eq!(tags(&a.read_until_ready()), "1Z");
    let mut pkt = parse("s1", "select 'from-b'::text");
    pkt.extend(sync());
    b.send(&pkt);
    assert_eq!(tags(&b.read_until_ready()), "1Z");
    // Hold one server in a transaction so the other client's statements must move.
    a.simple_query("begin");
    // b's first message on the other server is a Describe of a statement that server has
    // never seen (libpq's PQdescribePrepared, JDBC's metadata calls): pgmux prepares it
    // there first, and the client sees only the Describe's answer.
    let mut pkt = describe_stmt("s1");
    pkt.extend(sync());
    b.send(&pkt);
    assert_eq!(tags(&b.read_until_ready()), "tTZ");
    for _ in 0..3 {
        let mut pkt = bind("s1", &[]);
        pkt.extend(execute());
        pkt.extend(sync());
        b.send(&pkt);
        let msgs = b.read_until_ready();
        assert_eq!(tags(&msgs), "2DCZ");
        assert_eq!(first_value(&msgs), "from-b");
    }
    let mut pkt = describe_stmt("s1");
    pkt.extend(bind("s1", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    a.send(&pkt);
    let msgs = a.read_until_ready();
    assert_eq!(tags(&msgs), "tT2DCZ");
    assert_eq!(first_value(&msgs), "from-a");
    a.simple_query("commit");

    // Parse of an existing name without Close: PostgreSQL's 42P05, and the rest of the
    // pipeline up to Sync is skipped.
    let mut pkt = parse("s1", "select 2");
    pkt.extend(bind("s1", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    a.send(&pkt);
    let msgs = a.read_until_ready();
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("42P05"));
    // Close, then the name can be reused for a new statement.
    let mut pkt = close_stmt("s1");
    pkt.extend(parse("s1", "select 'new-a'::text"));
    pkt.extend(bind("s1", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    a.send(&pkt);
    let msgs = a.read_until_ready();
    assert_eq!(tags(&msgs), "312DCZ");
    assert_eq!(first_value(&msgs), "new-a");
    // Closing an unknown name is fine, as in PostgreSQL.
    let mut pkt = close_stmt("never-prepared");
    pkt.extend(sync());
    a.send(&pkt);
    assert_eq!(tags(&a.read_until_ready()), "3Z");
    // b still has its own s1.
    let mut pkt = bind("s1", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    b.send(&pkt);
    assert_eq!(first_value(&b.read_until_ready()), "from-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_paths_in_pipelines() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut c = env.raw(&px);
    // Describe / Bind of an unknown statement: 26000, skip to Sync.
    let mut pkt = describe_stmt("nope");
    pkt.extend(bind("nope", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("26000"));
    assert!(RawConn::error_fields(&msgs[0].1)[&'M'].contains("\"nope\""));
    // A syntax error in Parse: the name does not exist afterwards.
    let mut pkt = parse("bad", "selec 1");
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(sqlstate(&msgs).as_deref(), Some("42601"));
    let mut pkt = bind("bad", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(sqlstate(&c.read_until_ready()).as_deref(), Some("26000"));
    // A failing statement in the middle of a pipeline: later messages up to Sync are
    // skipped, the statements prepared before the failure survive, the ones after do not.
    let mut pkt = parse("ok1", "select 1");
    pkt.extend(parse("div", "select 1/$1::int"));
    pkt.extend(bind("div", &["0"]));
    pkt.extend(execute());
    pkt.extend(parse("after", "select 3"));
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    // (PostgreSQL folds 1/0 while planning the Bind, so the error answers the Bind.)
    assert_eq!(tags(&msgs), "11EZ");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("22012"));
    let mut pkt = bind("ok1", &[]);
    pkt.extend(execute());
    pkt.extend(bind("after", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "2DCEZ");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("26000"));
    // A client that disconnects mid-pipeline (no Sync) does not poison the server.
    let mut d = env.raw(&px);
    let mut pkt = parse("p1", "select pg_sleep(0.2)");
    pkt.extend(bind("p1", &[]));
    pkt.extend(execute());
    d.send(&pkt);
    std::thread::sleep(Duration::from_millis(50));
    drop(d);
    let mut pkt = bind("ok1", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "2DCZ");
    assert_eq!(first_value(&msgs), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_and_deallocate_clear_the_clients_statements() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut c = env.raw(&px);
    let mut pkt = parse("a", "select 'a'::text");
    pkt.extend(parse("b", "select 'b'::text"));
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(tags(&c.read_until_ready()), "11Z");
    // SQL-level DEALLOCATE of a protocol-level statement (PHP/PDO does this).
    let msgs = c.simple_query("DEALLOCATE a");
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    let mut pkt = bind("a", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(sqlstate(&c.read_until_ready()).as_deref(), Some("26000"));
    // Another client with the same text is unaffected by a's deallocation.
    let mut other = env.raw(&px);
    let mut pkt = parse("x", "select 'a'::text");
    pkt.extend(bind("x", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    other.send(&pkt);
    assert_eq!(first_value(&other.read_until_ready()), "a");
    // DISCARD ALL drops the client's names; the name can be prepared again.
    assert_eq!(tags(&c.simple_query("DISCARD ALL")), "CZ");
    let mut pkt = bind("b", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(sqlstate(&c.read_until_ready()).as_deref(), Some("26000"));
    let mut pkt = parse("b", "select 'b2'::text");
    pkt.extend(bind("b", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(first_value(&c.read_until_ready()), "b2");
    // The other client's statement on the same (discarded) server is re-prepared.
    let mut pkt = bind("x", &[]);
    pkt.extend(execute());
    pkt.extend(sync());
    other.send(&pkt);
    assert_eq!(first_value(&other.read_until_ready()), "a");
    // DISCARD ALL inside a transaction fails; nothing breaks afterwards.
    c.simple_query("begin");
    assert_eq!(
        sqlstate(&c.simple_query("DISCARD ALL")).as_deref(),
        Some("25001")
    );
    c.simple_query("rollback");
    let mut pkt = parse("b", "select 'b3'::text");
    pkt.extend(bind("b", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(first_value(&msgs), "b3", "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_statement_cache_evicts_and_re_prepares() {
    let env = env();
    let px = env.pgmux_env(
        &["--pool-size", "1"],
        &[("PGMUX_MAX_PREPARED_STATEMENTS", "3")],
    );
    let c = connect(&env.url(&px)).await;
    let stmts: Vec<_> = join_all((0..8).map(|i| {
        let c = &c;
        async move { c.prepare(&format!("select {i}::int")).await.unwrap() }
    }))
    .await;
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[]).await.unwrap().get(0);
            assert_eq!(v, i as i32, "round {round}");
        }
    }
    // The backend never holds more than the limit.
    let n: i64 = c
        .query_one("select count(*) from pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n <= 3, "{n} statements on the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_result_type_after_ddl_is_no_worse_than_direct() {
    let env = env();
    env.setup("create table t(a int); insert into t values (1)");
    let px = env.pgmux(&["--pool-size", "1"]);
    let c = connect(&env.url(&px)).await;
    let s = c.prepare("select * from t").await.unwrap();
    assert_eq!(c.query(&s, &[]).await.unwrap().len(), 1);
    env.setup("alter table t add column b text");
    // Like a direct connection: the old statement fails once with 0A000…
    let err = c.query(&s, &[]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{err:?}"
    );
    // …and preparing it again (what drivers do) works, with the new shape.
    drop(s);
    let s = c.prepare("select * from t").await.unwrap();
    let rows = c.query(&s, &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_with_flush_instead_of_sync() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "2"]);
    let mut a = env.raw(&px);
    let mut b = env.raw(&px);
    // a prepares "q" and keeps its server busy inside a transaction.
    let mut pkt = parse("q", "select $1::text || '!'");
    pkt.extend(sync());
    a.send(&pkt);
    assert_eq!(tags(&a.read_until_ready()), "1Z");
    a.simple_query("begin");
    // b prepares the same text under another name, then Bind/Execute + Flush (no Sync):
    // the answers must arrive before any Sync, on whichever server b got.
    let mut pkt = parse("other", "select $1::text || '!'");
    pkt.extend(bind("other", &["hi"]));
    pkt.extend(execute());
    pkt.extend(RawConn::frame(b'H', b""));
    b.send(&pkt);
    let mut got = Vec::new();
    while got.last().map(|(t, _): &support::Message| *t) != Some(b'C') {
        got.push(b.read_message().expect("message before Sync"));
    }
    assert_eq!(tags(&got), "12DC");
    assert_eq!(first_value(&got), "hi!");
    b.send(&sync());
    assert_eq!(tags(&b.read_until_ready()), "Z");
    a.simple_query("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_validity_is_per_database() {
    let env = env();
    env.setup("create table only_in_a(x int)");
    let db_b = format!("{}_b", env.db);
    env.cluster.create_database(&db_b, &env.user);
    let node = env.cluster.primary();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[databases.a]\nurl = \"{}\"\n[databases.b]\nurl = \"{}\"\n",
            node.url(&env.user, &env.password, &env.db),
            node.url(&env.user, &env.password, &db_b),
        ),
    )
    .unwrap();
    let px = Pgmux::start(&["--config", config.path().to_str().unwrap()], &[]);
    let mut a = RawConn::login(px.port(), &env.user, &env.password, "a");
    let mut pkt = parse("s", "select x from only_in_a");
    pkt.extend(sync());
    a.send(&pkt);
    assert_eq!(tags(&a.read_until_ready()), "1Z");
    // The same text in database b is not known to be valid there: its Parse goes to a
    // server and fails at once, as on a direct connection.
    let mut b = RawConn::login(px.port(), &env.user, &env.password, "b");
    let mut pkt = parse("s", "select x from only_in_a");
    pkt.extend(sync());
    b.send(&pkt);
    let msgs = b.read_until_ready();
    assert_eq!(sqlstate(&msgs).as_deref(), Some("42P01"), "{msgs:?}");
}

/// Regression (found with session_state_action = reject, whose refusals share this path):
/// a response pgmux makes itself for a message pipelined after a Sync was dropped when
/// the error before that Sync had already arrived, as if the server would skip the
/// message; the Sync ends the skip first, so the client was owed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_answers_after_a_pipelined_sync_survive_an_earlier_error() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut c = env.raw(&px);
    let mut pkt = parse("q1", "select 1");
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(tags(&c.read_until_ready()), "1Z");
    for _ in 0..3 {
        // A failing Parse without Sync: the server answers its error and starts skipping.
        c.send(&parse("", "selec 1"));
        let (tag, body) = c.read_message().expect("the error");
        assert_eq!(tag, b'E');
        assert_eq!(RawConn::error_fields(&body)[&'C'], "42601");
        // Then the Sync, and in the same write a Close (answered by pgmux) and a Describe
        // of an unknown statement (refused by pgmux) in the next cycle.
        let mut pkt = sync();
        pkt.extend(close_stmt("q1"));
        pkt.extend(sync());
        pkt.extend(describe_stmt("nope"));
        pkt.extend(sync());
        c.send(&pkt);
        assert_eq!(tags(&c.read_until_ready()), "Z");
        assert_eq!(
            tags(&c.read_until_ready()),
            "3Z",
            "the CloseComplete is owed"
        );
        let msgs = c.read_until_ready();
        assert_eq!(tags(&msgs), "EZ", "the 26000 is owed");
        assert_eq!(sqlstate(&msgs).as_deref(), Some("26000"));
        let mut pkt = parse("q1", "select 1");
        pkt.extend(sync());
        c.send(&pkt);
        assert_eq!(tags(&c.read_until_ready()), "1Z");
    }
}

/// pgmux prepares a client's statement on a server that lacks it by sending a Parse of its
/// own ahead of the client's Bind. When an earlier message of the same pipeline fails,
/// PostgreSQL skips everything up to Sync, that Parse included: the statement is still
/// missing there, and the client's next use must prepare it again rather than get
/// `26000 prepared statement "pgmux_N" does not exist`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_pgmux_prepares_behind_a_failing_message_are_prepared_again() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut c = env.raw(&px);
    let mut pkt = parse("num", "select $1::int");
    pkt.extend(parse("later", "select 'later'::text"));
    pkt.extend(sync());
    c.send(&pkt);
    assert_eq!(tags(&c.read_until_ready()), "11Z");
    // The only server goes (terminated from outside while idle); its replacement has
    // neither statement.
    let killed = env.psql(&format!(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity where usename = '{}' and state = 'idle'",
        env.user
    ));
    assert_eq!(killed.trim(), "1");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // 'abc' is not an int: the Bind fails, and PostgreSQL skips the rest, pgmux's Parse
    // of "later" included.
    let mut pkt = bind("num", &["abc"]);
    pkt.extend(execute());
    pkt.extend(bind("later", &[]));
    pkt.extend(execute());
    pkt.extend(sync());
    c.send(&pkt);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("22P02"));
    // Both statements work on that server afterwards.
    for (stmt, params, want) in [("later", vec![], "later"), ("num", vec!["7"], "7")] {
        let mut pkt = bind(stmt, &params);
        pkt.extend(execute());
        pkt.extend(sync());
        c.send(&pkt);
        let msgs = c.read_until_ready();
        assert_eq!(tags(&msgs), "2DCZ", "{stmt}: {:?}", sqlstate(&msgs));
        assert_eq!(first_value(&msgs), want);
    }
}
