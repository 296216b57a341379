//! The transaction-mode core end to end: the real pgmux binary in front of a real
//! PostgreSQL, driven by tokio-postgres and a raw protocol client.

mod support;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use support::{connect, try_connect, Pgmux, RawConn, TestDb};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

fn env() -> TestDb {
    TestDb::new("core")
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

/// The server's message text (tokio-postgres' Display only says "db error").
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_config_database_url_serves_simple_and_unnamed_extended_queries() {
    let env = env();
    let px = env.pgmux(&[]);
    let c = connect(&env.url(&px)).await;
    let rows = c.simple_query("select 41 + 1 as answer").await.unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
            _ => None,
        })
        .unwrap();
    assert_eq!(row, "42");
    // Unnamed statement + portal, parameters and a binary result.
    let rows = c
        .query_typed(
            "select $1::int8 * 2, $2::text || '!'",
            &[(&21i64, Type::INT8), (&"hi", Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 42);
    assert_eq!(rows[0].get::<_, String>(1), "hi!");
    // The answer came from the real server.
    let rows = c
        .query_typed("select current_database()", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), env.db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_burst_reports_server_parameters_and_a_pgmux_key() {
    let env = env();
    let px = env.pgmux(&[]);
    let mut raw = RawConn::connect(px.port());
    raw.startup(
        &env.user,
        &env.db,
        &[
            ("application_name", "burst-test"),
            ("DateStyle", "ISO, DMY"),
        ],
    );
    let msgs = raw.scram_login(&env.user, &env.password);
    let mut params = std::collections::BTreeMap::new();
    for (tag, body) in &msgs {
        if *tag == b'S' {
            let parts: Vec<&[u8]> = body.split(|b| *b == 0).collect();
            params.insert(
                String::from_utf8_lossy(parts[0]).into_owned(),
                String::from_utf8_lossy(parts[1]).into_owned(),
            );
        }
    }
    for key in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
        "IntervalStyle",
        "application_name",
        "is_superuser",
        "session_authorization",
    ] {
        assert!(
            params.contains_key(key),
            "missing ParameterStatus {key}: {params:?}"
        );
    }
    assert!(params["server_version"].starts_with("15"), "{params:?}");
    assert_eq!(params["application_name"], "burst-test");
    assert_eq!(params["session_authorization"], env.user);
    let key = raw.backend_key.expect("BackendKeyData");
    // The key is pgmux's own, not the backend's.
    let msgs = raw.simple_query("select pg_backend_pid(), current_setting('DateStyle'), current_setting('application_name')");
    let row = data_row(&msgs);
    assert_ne!(row[0].parse::<i32>().unwrap(), key.0);
    assert_eq!(row[1], "ISO, DMY");
    assert_eq!(row[2], "burst-test");
}

/// Text columns of the first DataRow.
fn data_row(msgs: &[support::Message]) -> Vec<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
        pos += 4;
        if len < 0 {
            out.push(String::new());
        } else {
            out.push(String::from_utf8_lossy(&body[pos..pos + len as usize]).into_owned());
            pos += len as usize;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_share_twenty_servers() {
    support::raise_fd_limit();
    let env = env();
    env.setup("create table hits(client int, n int)");
    let px = env.pgmux(&["--pool-size", "20"]);
    let url = env.url(&px);
    let clients = 1000usize;

    // Sample the real backend count while the load runs.
    let stop = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let node_port = env.cluster.primary().port;
        let user = env.user.clone();
        let url = env.cluster.primary().url("postgres", "", "postgres");
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut samples = 0;
            while stop.load(Ordering::Relaxed) == 0 {
                let n: i64 = c
                    .query_one(
                        "select count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend'",
                        &[&user],
                    )
                    .await
                    .unwrap()
                    .get(0);
                peak.fetch_max(n, Ordering::Relaxed);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = node_port;
            samples
        })
    };

    let tasks = (0..clients).map(|i| {
        let url = url.clone();
        tokio::spawn(async move {
            let c = connect(&url).await;
            for n in 0..3 {
                c.batch_execute(&format!(
                    "begin; insert into hits values ({i}, {n}); commit"
                ))
                .await
                .unwrap();
                let r = c.simple_query("select count(*) from hits").await.unwrap();
                assert!(r.len() >= 2);
            }
            c
        })
    });
    let results = join_all(tasks).await;
    let mut conns = Vec::new();
    for r in results {
        conns.push(r.expect("client task"));
    }
    stop.store(1, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    assert!(samples > 0);
    assert_eq!(
        env.psql("select count(*) from hits"),
        (clients * 3).to_string()
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= 20,
        "pg_stat_activity showed {peak} backends for a pool of 20"
    );
    assert!(
        peak >= 2,
        "the load should have used several servers, saw {peak}"
    );
    // All 1000 clients are still connected and usable.
    assert_eq!(conns.len(), clients);
    for c in conns.iter().take(5) {
        c.simple_query("select 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_timezone_follows_the_client_not_the_server() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let a = connect(&env.url(&px)).await;
    let b = connect(&env.url(&px)).await;
    async fn tz(c: &tokio_postgres::Client) -> (String, i32) {
        let r = c
            .query_typed("select current_setting('TimeZone'), pg_backend_pid()", &[])
            .await
            .unwrap();
        (r[0].get::<_, String>(0), r[0].get::<_, i32>(1))
    }
    let (default_tz, _) = tz(&b).await;
    assert_ne!(default_tz, "America/New_York");
    a.batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .unwrap();
    let (tz_a, pid_a) = tz(&a).await;
    let (tz_b, pid_b) = tz(&b).await;
    assert_eq!(
        pid_a, pid_b,
        "pool of one: both clients use the same backend"
    );
    assert_eq!(tz_a, "America/New_York");
    assert_eq!(tz_b, default_tz, "client B must not see client A's SET");
    let (tz_a, _) = tz(&a).await;
    assert_eq!(tz_a, "America/New_York");
    // A SET inside a rolled-back transaction is undone for the client too.
    a.batch_execute("begin; set timezone = 'Asia/Tokyo'; rollback")
        .await
        .unwrap();
    assert_eq!(tz(&a).await.0, "America/New_York");
    // application_name follows the client as well.
    a.batch_execute("set application_name = 'client-a'")
        .await
        .unwrap();
    let r = b
        .query_typed("select current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_ne!(r[0].get::<_, String>(0), "client-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query_and_nothing_else() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "2"]);
    let url = env.url(&px);
    let a = connect(&url).await;
    let token = a.cancel_token();
    let started = Instant::now();
    let running =
        tokio::spawn(async move { a.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = running.await.unwrap().expect_err("query must be cancelled");
    assert_eq!(code(&err), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));

    // A cancel for a client that is not running anything must not hit another client.
    let idle = connect(&url).await;
    idle.simple_query("select 1").await.unwrap();
    let busy = connect(&url).await;
    let t = tokio::spawn(async move { busy.simple_query("select pg_sleep(1.5), 'done'").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let r = t
        .await
        .unwrap()
        .expect("the other client's query must finish");
    assert!(!r.is_empty());
    // A guessed key does nothing either.
    RawConn::cancel(px.port(), (12345, 678));
    idle.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_leaves_no_lock_behind() {
    let env = env();
    env.setup("create table locked(id int primary key); insert into locked values (1)");
    let px = env.pgmux(&["--pool-size", "2"]);
    // Idle in transaction, holding a lock, then the socket vanishes.
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    raw.simple_query("begin");
    raw.simple_query("lock table locked in access exclusive mode");
    drop(raw);
    // Running a query while holding a lock, then the socket vanishes.
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    raw.simple_query("begin");
    raw.simple_query("select * from locked for update");
    raw.send(&RawConn::query_message("select pg_sleep(60)"));
    std::thread::sleep(Duration::from_millis(300));
    drop(raw);

    let c = connect(&env.url(&px)).await;
    let started = Instant::now();
    c.batch_execute("set lock_timeout = '10s'").await.unwrap();
    c.batch_execute("begin; update locked set id = 1; commit")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "lock was held for {:?}",
        started.elapsed()
    );
    let held = env.psql("select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 'locked' and l.granted");
    assert_eq!(held, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_the_pool() {
    use futures::{SinkExt, StreamExt};
    let env = env();
    env.setup("create table items(id int, name text)");
    let px = env.pgmux(&["--pool-size", "1"]);
    let c = connect(&env.url(&px)).await;
    let sink = c.copy_in("copy items from stdin").await.unwrap();
    futures::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname-{i}\n"));
    }
    for chunk in data.as_bytes().chunks(7000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 5000);
    // The only server went back to the pool after the COPY: another client gets it.
    let other = connect(&env.url(&px)).await;
    other.simple_query("select 1").await.unwrap();
    assert_eq!(
        env.psql("select count(*), sum(id) from items"),
        "5000|12497500"
    );

    let stream = c
        .copy_out("copy (select * from items order by id) to stdout")
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // A failing COPY and a COPY the client aborts leave the connection usable.
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    let msgs = raw.simple_query("copy nosuchtable from stdin");
    assert_eq!(RawConn::error_fields(&msgs[0].1)[&'C'], "42P01");
    raw.send(&RawConn::query_message("copy items from stdin"));
    assert_eq!(raw.read_message().unwrap().0, b'G', "CopyInResponse");
    raw.send(&RawConn::frame(b'd', b"1\tone\n"));
    raw.send(&RawConn::frame(b'f', b"client changed its mind\0"));
    let msgs = raw.read_until_ready();
    assert_eq!(RawConn::error_fields(&msgs[0].1)[&'C'], "57014");
    assert_eq!(msgs.last().unwrap().1, b"I");
    assert!(raw.simple_query("select 1").iter().any(|(t, _)| *t == b'D'));
    assert_eq!(env.psql("select count(*) from items"), "5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_from_many_clients() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "2"]);
    let url = env.url(&px);
    let tasks = (0..20).map(|i| {
        let url = url.clone();
        tokio::spawn(async move {
            let c = connect(&url).await;
            for round in 0..5 {
                // Several Parse/Bind/Execute/Sync in flight on one connection.
                let futs = (0..10i64).map(|k| {
                    let c = &c;
                    async move {
                        let r = c
                            .query_typed(
                                "select $1::int8 + $2::int8",
                                &[(&k, Type::INT8), (&(i * 1000 + round), Type::INT8)],
                            )
                            .await
                            .unwrap();
                        r[0].get::<_, i64>(0)
                    }
                });
                let got = join_all(futs).await;
                let want: Vec<i64> = (0..10).map(|k| k + i * 1000 + round).collect();
                assert_eq!(got, want);
            }
        })
    });
    for r in join_all(tasks).await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_without_sync_keeps_the_server_linked() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    // Parse/Bind/Execute + Flush, no Sync: the results must come back and the server must
    // stay with this client until the Sync.
    let mut pkt = Vec::new();
    pkt.extend(RawConn::frame(b'P', b"\0select pg_backend_pid()\0\0\0"));
    pkt.extend(RawConn::frame(b'B', b"\0\0\0\0\0\0\0\0"));
    pkt.extend(RawConn::frame(b'E', b"\0\0\0\0\0"));
    pkt.extend(RawConn::frame(b'H', b""));
    raw.send(&pkt);
    let mut tags = Vec::new();
    while tags.last() != Some(&b'C') {
        tags.push(raw.read_message().expect("message").0);
    }
    assert_eq!(tags, vec![b'1', b'2', b'D', b'C']);
    // Another client wants the only server meanwhile: it has to wait.
    let url = env.url(&px);
    let other = tokio::spawn(async move {
        let c = connect(&url).await;
        c.simple_query("select 1").await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!other.is_finished(), "the server was released before Sync");
    raw.send(&RawConn::frame(b'S', b""));
    let msgs = raw.read_until_ready();
    assert_eq!(msgs.last().unwrap().1, b"I");
    tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_empty_query_notices_and_notifications() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    let msgs = raw.simple_query("select 1; select 2, 3");
    assert_eq!(msgs.iter().filter(|(t, _)| *t == b'D').count(), 2);
    assert_eq!(msgs.iter().filter(|(t, _)| *t == b'C').count(), 2);
    let msgs = raw.simple_query("");
    assert_eq!(msgs[0].0, b'I', "EmptyQueryResponse");
    let msgs = raw.simple_query("do $$ begin raise notice 'hello from %', 'plpgsql'; end $$");
    let notice = msgs
        .iter()
        .find(|(t, _)| *t == b'N')
        .expect("NoticeResponse");
    assert_eq!(RawConn::error_fields(&notice.1)[&'M'], "hello from plpgsql");
    let msgs = raw.simple_query("listen chan; notify chan, 'payload-1'");
    let n = msgs
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("NotificationResponse");
    assert!(n.1.windows(9).any(|w| w == b"payload-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_a_transaction_keep_it_on_one_server() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "3"]);
    let c = connect(&env.url(&px)).await;
    let url = env.url(&px);
    let others: Vec<_> = join_all((0..2).map(|_| connect(&url))).await;
    c.batch_execute("begin").await.unwrap();
    let pid: i32 = c.query_typed("select pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    let err = c.simple_query("select 1/0").await.unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::DIVISION_BY_ZERO));
    // Other clients run meanwhile; the failed transaction keeps its server.
    for o in &others {
        o.simple_query("select 1").await.unwrap();
    }
    let err = c.simple_query("select 1").await.unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    c.batch_execute("rollback").await.unwrap();
    c.batch_execute("begin").await.unwrap();
    let pid2: i32 = c.query_typed("select pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    c.batch_execute("commit").await.unwrap();
    let _ = (pid, pid2);
    // An extended-protocol error does not poison the connection either.
    let err = c
        .query_typed("select 1/$1::int", &[(&0i32, Type::INT4)])
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(
        c.query_typed("select 5", &[]).await.unwrap()[0].get::<_, i32>(0),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_transaction_gives_a_clear_error_and_is_replaced() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "2"]);
    let c = connect(&env.url(&px)).await;
    c.batch_execute("begin").await.unwrap();
    let pid: i32 = c.query_typed("select pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    env.psql(&format!("select pg_terminate_backend({pid})"));
    let err = c.simple_query("select 1").await.unwrap_err();
    let sqlstate = err.code().map(|c| c.code().to_owned());
    assert!(
        matches!(sqlstate.as_deref(), Some("57P01") | Some("08006")) || err.is_closed(),
        "unexpected error {err:?}"
    );
    // The pool replaces it; new clients work.
    let d = connect(&env.url(&px)).await;
    assert_eq!(
        d.query_typed("select 7", &[]).await.unwrap()[0].get::<_, i32>(0),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_servers_killed_from_outside_are_replaced_without_client_errors() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "3"]);
    let c = connect(&env.url(&px)).await;
    // Warm up all three servers.
    let url = env.url(&px);
    let clients: Vec<_> = join_all((0..3).map(|_| connect(&url))).await;
    join_all(
        clients
            .iter()
            .map(|c| c.simple_query("select pg_sleep(0.2)")),
    )
    .await;
    for round in 0..3 {
        let killed = env.psql(&format!(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where usename = '{}' and state = 'idle'",
            env.user
        ));
        assert!(
            killed.parse::<i32>().unwrap() >= 1,
            "round {round}: nothing to kill"
        );
        std::thread::sleep(Duration::from_millis(100));
        let v: i32 = c.query_typed("select 1", &[]).await.unwrap()[0].get(0);
        assert_eq!(v, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_errors_use_postgres_sqlstates() {
    let env = env();
    let px = env.pgmux(&[]);
    let bad = px.url(&env.user, "wrong-password", &env.db);
    let Err(err) = try_connect(&bad).await else {
        panic!("wrong password must fail")
    };
    assert_eq!(code(&err), Some(&SqlState::INVALID_PASSWORD), "{err}");
    assert!(
        message(&err).contains("password authentication failed"),
        "{err:?}"
    );
    let unknown = px.url("nobody", "whatever", &env.db);
    let err = try_connect(&unknown).await.err().unwrap();
    assert_eq!(code(&err), Some(&SqlState::INVALID_PASSWORD));
    let nodb = px.url(&env.user, &env.password, "nosuchdb");
    let err = try_connect(&nodb).await.err().unwrap();
    assert_eq!(code(&err), Some(&SqlState::INVALID_CATALOG_NAME));
    assert!(
        message(&err).contains("database \"nosuchdb\" does not exist"),
        "{err:?}"
    );
    // Passwords never reach the log.
    assert!(!px.log().contains(&env.password));
    assert!(!px.log().contains("wrong-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_trust_client_authentication() {
    let env = env();
    let url = env.database_url();
    let md5 = Pgmux::start(
        &[],
        &[("DATABASE_URL", url.as_str()), ("PGMUX_AUTH_TYPE", "md5")],
    );
    let c = connect(&env.url(&md5)).await;
    c.simple_query("select 1").await.unwrap();
    let err = try_connect(&md5.url(&env.user, "nope", &env.db))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), Some(&SqlState::INVALID_PASSWORD));
    let trust = Pgmux::start(
        &[],
        &[("DATABASE_URL", url.as_str()), ("PGMUX_AUTH_TYPE", "trust")],
    );
    let c = connect(&trust.url(&env.user, "anything", &env.db)).await;
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_answers_53300_and_frees_the_slot() {
    let env = env();
    let px = env.pgmux(&["--max-client-conn", "3"]);
    let url = env.url(&px);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&url).await);
    }
    let Err(err) = try_connect(&url).await else {
        panic!("4th client must be refused")
    };
    assert_eq!(code(&err), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = connect(&url).await;
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_requests_get_n_and_bad_protocol_versions_a_clear_error() {
    use std::io::{Read, Write};
    let env = env();
    let px = env.pgmux(&[]);
    for code in [80_877_103i32, 80_877_104] {
        let mut raw = RawConn::connect(px.port());
        let mut pkt = 8i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&code.to_be_bytes());
        raw.send(&pkt);
        let mut answer = [0u8; 1];
        raw.stream().read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"N");
        raw.startup(&env.user, &env.db, &[]);
        raw.scram_login(&env.user, &env.password);
        assert!(raw.simple_query("select 1").iter().any(|(t, _)| *t == b'D'));
    }
    // Protocol 2.0.
    let mut raw = RawConn::connect(px.port());
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&(2i32 << 16).to_be_bytes());
    pkt.extend_from_slice(b"user\0x\0\0");
    let mut full = ((pkt.len() + 4) as i32).to_be_bytes().to_vec();
    full.extend(pkt);
    raw.stream().write_all(&full).unwrap();
    let (tag, body) = raw.read_message().unwrap();
    assert_eq!(tag, b'E');
    let f = RawConn::error_fields(&body);
    assert_eq!(f[&'C'], "0A000");
    assert!(
        f[&'M'].contains("unsupported frontend protocol 2.0"),
        "{f:?}"
    );
    assert!(raw.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_08p01_and_a_close() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    for len in [0i32, 3, -1, i32::MAX] {
        let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
        let mut pkt = vec![b'Q'];
        pkt.extend_from_slice(&len.to_be_bytes());
        raw.send(&pkt);
        let (tag, body) = raw.read_message().expect("an ErrorResponse");
        assert_eq!(tag, b'E', "len {len}");
        assert_eq!(RawConn::error_fields(&body)[&'C'], "08P01", "len {len}");
        assert!(raw.is_closed(), "len {len}");
    }
    // Unknown message type.
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    raw.send(&RawConn::frame(b'!', b"junk"));
    let (tag, body) = raw.read_message().unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(RawConn::error_fields(&body)[&'C'], "08P01");
    // The pool still works for everyone else.
    let c = connect(&env.url(&px)).await;
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_gives_a_clear_error() {
    let env = env();
    let url = env.database_url();
    let px = Pgmux::start(
        &["--pool-size", "1"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_QUERY_WAIT_TIMEOUT", "1s"),
        ],
    );
    let a = connect(&env.url(&px)).await;
    a.batch_execute("begin").await.unwrap();
    let b = connect(&env.url(&px)).await;
    let c = connect(&env.url(&px)).await;
    // Two waits that start 400 ms apart end 400 ms apart: each has its own deadline.
    let started = Instant::now();
    let first = tokio::spawn(async move {
        let err = b.simple_query("select 1").await.unwrap_err();
        (err, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = c.simple_query("select 1").await.unwrap_err();
    let second_took = started.elapsed();
    let (first_err, first_took) = first.await.unwrap();
    for (e, took, from) in [(&first_err, first_took, 0), (&err, second_took, 400)] {
        assert!(message(e).contains("query_wait_timeout"), "{e:?}");
        let waited = took - Duration::from_millis(from);
        assert!(
            waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
            "waited {waited:?} for a 1 s query_wait_timeout"
        );
    }
    assert!(second_took > first_took + Duration::from_millis(200));
    // The transaction that held the only server is untouched and the pool goes on.
    a.batch_execute("commit").await.unwrap();
    let d = connect(&env.url(&px)).await;
    d.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_idle_clients_57p01_and_exits_zero() {
    let env = env();
    let mut px = env.pgmux(&[]);
    let mut raw = RawConn::login(px.port(), &env.user, &env.password, &env.db);
    raw.simple_query("select 1");
    px.signal(15);
    let (tag, body) = raw.read_message().expect("a goodbye");
    assert_eq!(tag, b'E');
    let f = RawConn::error_fields(&body);
    assert_eq!(f[&'C'], "57P01");
    assert!(f[&'M'].contains("shutting down"));
    let status = px.wait_exit(Duration::from_secs(10)).expect("pgmux exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(env.cluster.primary().backend_count(&env.user), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_login_with_md5_cleartext_and_a_unix_socket() {
    let env = env();
    let node = env.cluster.primary();
    // Roles whose pg_hba lines ask pgmux for MD5 and for a cleartext password.
    node.psql(
        "postgres",
        "set password_encryption = 'md5'; create role md5user login password 'md5-pw'; create role pwuser login password 'clear-pw'",
    );
    node.psql(
        "postgres",
        &format!("grant all on database \"{}\" to md5user, pwuser", env.db),
    );
    let hba = node.data_dir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all md5user 127.0.0.1/32 md5\nhost all pwuser 127.0.0.1/32 password\nlocal all {} scram-sha-256\n{old}", env.user),
    )
    .unwrap();
    node.psql("postgres", "select pg_reload_conf()");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            r#"
[databases.md5db]
url = "postgres://md5user:md5-pw@127.0.0.1:{port}/{db}"
[databases.pwdb]
url = "postgres://pwuser:clear-pw@127.0.0.1:{port}/{db}"
[databases.sockdb]
url = "postgres://{user}:{pw}@{sock}:{port}/{db}"
"#,
            port = node.port,
            db = env.db,
            user = env.user,
            pw = env.password,
            sock = support::percent_encode(&node.socket_dir.display().to_string()),
        ),
    )
    .unwrap();
    let px = Pgmux::start(&["--config", config.path().to_str().unwrap()], &[]);
    for (user, pw, db, method) in [
        ("md5user", "md5-pw", "md5db", "md5"),
        ("pwuser", "clear-pw", "pwdb", "password"),
        (
            env.user.as_str(),
            env.password.as_str(),
            "sockdb",
            "scram-sha-256",
        ),
    ] {
        let c = connect(&px.url(user, pw, db)).await;
        let r = c
            .query_typed("select current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(r[0].get::<_, String>(0), user, "{method}");
        assert_eq!(r[0].get::<_, String>(1), env.db, "{method}");
    }
    let log = node.log();
    assert!(!log.contains("authentication failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_options_apply_per_client_and_are_reset_for_others() {
    let env = env();
    let px = env.pgmux(&["--pool-size", "1"]);
    let mut a = RawConn::connect(px.port());
    a.startup(
        &env.user,
        &env.db,
        &[("options", "-c work_mem=7MB -c statement_timeout=12345")],
    );
    a.scram_login(&env.user, &env.password);
    let b = connect(&env.url(&px)).await;
    for _ in 0..3 {
        let row = data_row(&a.simple_query(
            "select current_setting('work_mem'), current_setting('statement_timeout'), pg_backend_pid()",
        ));
        assert_eq!(row[0], "7MB");
        assert_eq!(row[1], "12345ms");
        let r = b
            .query_typed("select current_setting('work_mem'), current_setting('statement_timeout'), pg_backend_pid()", &[])
            .await
            .unwrap();
        assert_eq!(r[0].get::<_, i32>(2).to_string(), row[2], "pool of one");
        assert_eq!(r[0].get::<_, String>(0), "4MB");
        assert_eq!(r[0].get::<_, String>(1), "0");
    }
    // A bad value is the client's error, reported like PostgreSQL would.
    let mut c = RawConn::connect(px.port());
    c.startup(&env.user, &env.db, &[("options", "-c work_mem=lots")]);
    c.scram_login(&env.user, &env.password);
    c.send(&RawConn::query_message("select 1"));
    let (tag, body) = c.read_message().unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(RawConn::error_fields(&body)[&'C'], "22023");
    // The shared server is fine afterwards.
    b.simple_query("select 1").await.unwrap();
}
