//! Reaping and dead backends (issue 7), against real PostgreSQL: idle servers above
//! min_pool_size are closed, backends terminated from outside cost clients nothing,
//! servers idle past server_check_delay are checked before use, query_timeout cancels.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{first_value, pg_tool, run_with_timeout, Pgmux, RawConn, TestDb};

/// Backends of the test user on the primary.
fn backends(db: &TestDb) -> i64 {
    db.cluster.primary().backend_count(&db.user)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The sum of a Prometheus counter over the series whose labels contain `label`.
fn metric(px: &Pgmux, name: &str, label: &str) -> u64 {
    let text = ureq::get(format!("{}/metrics", px.admin_url()))
        .call()
        .expect("GET /metrics")
        .into_body()
        .read_to_string()
        .expect("metrics body");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `n` clients in transactions at once, so that pgmux opens `n` servers; then they
/// commit, and the servers stay open and idle. The clients are returned.
fn open_servers(db: &TestDb, px: &Pgmux, n: usize) -> Vec<RawConn> {
    let mut conns: Vec<RawConn> = (0..n).map(|_| db.raw(px)).collect();
    for c in &mut conns {
        assert!(c.simple_query("BEGIN").iter().all(|(t, _)| *t != b'E'));
    }
    assert_eq!(backends(db), n as i64);
    for c in &mut conns {
        assert!(c.simple_query("COMMIT").iter().all(|(t, _)| *t != b'E'));
    }
    conns
}

#[test]
fn idle_servers_are_reaped_down_to_min_pool_size() {
    let db = TestDb::new("reap_idle");
    let px = db.pgmux_env(
        &["--pool-size", "6"],
        &[
            ("PGMUX_SERVER_IDLE_TIMEOUT", "1s"),
            ("PGMUX_MIN_POOL_SIZE", "2"),
        ],
    );
    let mut conns = open_servers(&db, &px, 6);
    // After the idle timeout the surplus goes, down to the minimum and no further.
    wait_until(
        "reaping to min_pool_size",
        Duration::from_secs(10),
        || match backends(&db) {
            2 => Ok(()),
            n => Err(format!("{n} backends")),
        },
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(backends(&db), 2, "min_pool_size servers stay");
    assert!(metric(&px, "pgmux_server_closes_total", "reason=\"idle_timeout\"") >= 4);
    // The clients never noticed.
    for c in &mut conns {
        assert_eq!(first_value(&c.simple_query("SELECT 5")), "5");
    }
}

/// Autocommit statements, pgbench-style: every statement is its own transaction.
const AUTOCOMMIT_SCRIPT: &str = "\\set aid random(1, 100000)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);
";

/// The runbook: an operator's script terminates idle backends of the application user
/// every 100 ms while pgbench runs through pgmux. pgbench aborts a client at its first
/// error, so a clean exit with every transaction done means no client saw one.
/// `runbook_filter` narrows the operator's query; `script`: None = pgbench's TPC-B.
fn runbook_under_pgbench(
    name: &str,
    mode: &str,
    script: Option<&str>,
    runbook_filter: &str,
    pool_env: &[(&str, &str)],
) {
    let db = TestDb::new(name);
    let node = db.cluster.primary();
    let mut init = pg_tool("pgbench");
    init.args(["-i", "-s", "1", "-q"])
        .arg(db.database_url())
        .env("PGPASSWORD", &db.password);
    let out = run_with_timeout(&mut init, Duration::from_secs(120));
    assert!(out.status.success(), "pgbench -i: {out:?}");

    let px = db.pgmux_env(&[], pool_env);
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicU64::new(0));
    let killer = {
        let (stop, killed) = (stop.clone(), killed.clone());
        let url = node.url("postgres", "", "postgres");
        let sql = format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE state = 'idle' AND usename = '{}' {runbook_filter}",
            db.user
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c = support::connect(&url).await;
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = c.query_one(&sql, &[]).await.expect("runbook query").get(0);
                    killed.fetch_add(n as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
    };
    let script_file = script.map(|text| {
        let path = std::env::temp_dir().join(format!("{name}-{}.sql", std::process::id()));
        std::fs::write(&path, text).expect("write pgbench script");
        path
    });
    let mut bench = pg_tool("pgbench");
    bench.args(["-c", "8", "-j", "2", "-T", "5", "-M", mode, "-n"]);
    if let Some(path) = &script_file {
        bench.arg("-f").arg(path);
    }
    bench.arg(db.url(&px)).env("PGPASSWORD", &db.password);
    let out = run_with_timeout(&mut bench, Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    killer.join().expect("killer thread");
    if let Some(path) = script_file {
        let _ = std::fs::remove_file(path);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("aborted") && !stderr.contains("error"),
        "pgbench saw an error:\n{stdout}\n{stderr}\n{}",
        px.log()
    );
    let done: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{stdout}"));
    assert!(done > 100, "{stdout}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    // The operator's script really killed pgmux's servers, and pgmux saw them go.
    let killed = killed.load(Ordering::Relaxed);
    assert!(killed > 0, "the runbook terminated nothing");
    let seen = metric(
        &px,
        "pgmux_server_closes_total",
        "reason=\"killed_by_server\"",
    );
    assert!(
        seen > 0,
        "killed {killed}, pgmux counted {seen} killed_by_server"
    );
    // Each script run inserts one history row: nothing ran twice, nothing was lost.
    let history = db.psql("SELECT count(*) FROM pgbench_history");
    assert_eq!(history.trim().parse::<u64>().unwrap(), done, "{stdout}");
}

/// The issue's runbook as written: every idle backend, every 100 ms. Its snapshot of
/// pg_stat_activity is older than its kill, so a backend it saw idle may be the one a
/// statement just reached: that statement's backend says goodbye before answering and
/// pgmux runs it on another server.
#[test]
fn runbook_terminating_idle_backends_costs_autocommit_clients_nothing() {
    runbook_under_pgbench(
        "runbook_ac",
        "simple",
        Some(AUTOCOMMIT_SCRIPT),
        "",
        &[("PGMUX_POOL_SIZE", "4")],
    );
}

/// The usual runbook ("idle for a while") under multi-statement transactions (pgbench
/// TPC-B with prepared statements): the pool's spare servers sit idle, are killed, are
/// noticed and replaced (min_pool_size); the busy ones are never touched.
#[test]
fn runbook_terminating_long_idle_backends_costs_transactions_nothing() {
    runbook_under_pgbench(
        "runbook_tx",
        "prepared",
        None,
        "AND state_change < now() - interval '300 milliseconds'",
        &[("PGMUX_POOL_SIZE", "12"), ("PGMUX_MIN_POOL_SIZE", "12")],
    );
}

/// Sends `sig` (e.g. "STOP", "CONT") to a PostgreSQL backend.
fn signal_backend(pid: &str, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid)
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Waits until one statement of the test user runs on the primary.
fn wait_for_one_active_query(db: &TestDb) {
    wait_until("the query to run", Duration::from_secs(10), || {
        let n = db.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND state = 'active'",
            db.user
        ));
        if n.trim() == "1" {
            Ok(())
        } else {
            Err(n)
        }
    });
}

/// The first ErrorResponse's fields among `msgs`, if any.
fn error_of(msgs: &[(u8, Vec<u8>)]) -> Option<std::collections::BTreeMap<char, String>> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| RawConn::error_fields(b))
}

#[test]
fn query_timeout_cancels_the_query_and_the_session_goes_on() {
    let db = TestDb::new("qtimeout");
    db.setup("CREATE TABLE t (v int)");
    let px = db.pgmux_env(&["--pool-size", "1"], &[("PGMUX_QUERY_TIMEOUT", "500ms")]);
    let mut raw = db.raw(&px);
    // Within the limit: untouched.
    assert_eq!(
        first_value(&raw.simple_query("SELECT pg_sleep(0.1)::text || 'ok'")),
        "ok"
    );

    let msgs = raw.simple_query("SELECT pg_sleep(30)");
    let e = error_of(&msgs).unwrap_or_else(|| panic!("{}", support::describe(&msgs)));
    assert_eq!(e[&'C'], "57014", "{e:?}");
    assert_eq!(e[&'S'], "ERROR", "the session survives: {e:?}");
    // The statement really stopped on the server, and the session goes on.
    assert_eq!(first_value(&raw.simple_query("SELECT 1")), "1");
    let active = db.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND query LIKE '%pg_sleep(30)%' AND state = 'active'",
        db.user
    ));
    assert_eq!(active.trim(), "0");

    // Inside a transaction: the transaction is aborted, as with statement_timeout.
    assert!(error_of(&raw.simple_query("BEGIN; INSERT INTO t VALUES (1)")).is_none());
    let e = error_of(&raw.simple_query("SELECT pg_sleep(30)")).expect("an error");
    assert_eq!(e[&'C'], "57014");
    let e = error_of(&raw.simple_query("SELECT 1")).expect("aborted transaction");
    assert_eq!(e[&'C'], "25P02");
    assert!(error_of(&raw.simple_query("ROLLBACK")).is_none());
    assert_eq!(
        first_value(&raw.simple_query("SELECT count(*) FROM t")),
        "0"
    );
    assert_eq!(metric(&px, "pgmux_query_timeouts_total", ""), 2);

    // A server that does not answer the cancel either (its backend is stopped, as a
    // hung host would be): after the grace period the client gets a FATAL 57014 and
    // the next client gets a working server.
    let pid = first_value(&raw.simple_query("SELECT pg_backend_pid()"));
    signal_backend(&pid, "STOP");
    raw.send(&RawConn::query_message("SELECT 2"));
    let fatal = raw.next_error();
    signal_backend(&pid, "CONT");
    let fatal = fatal.expect("an ErrorResponse");
    assert_eq!(fatal[&'C'], "57014", "{fatal:?}");
    assert_eq!(fatal[&'S'], "FATAL", "{fatal:?}");
    assert!(fatal[&'M'].contains("query_timeout"), "{fatal:?}");
    assert!(raw.is_closed());
    let mut next = db.raw(&px);
    assert_eq!(first_value(&next.simple_query("SELECT 3")), "3");
    assert!(
        metric(
            &px,
            "pgmux_client_disconnects_total",
            "reason=\"query_timeout\""
        ) >= 1,
        "counted"
    );
}

#[test]
fn server_check_delay_replaces_a_silent_server() {
    let db = TestDb::new("checkdelay");
    let px = db.pgmux_env(
        &["--pool-size", "2"],
        &[
            ("PGMUX_SERVER_CHECK_DELAY", "200ms"),
            ("PGMUX_SERVER_CONNECT_TIMEOUT", "1s"),
        ],
    );
    let mut raw = db.raw(&px);
    let pid = first_value(&raw.simple_query("SELECT pg_backend_pid()"));
    std::thread::sleep(Duration::from_millis(400));
    // The idle server's backend stops answering without closing anything: only a round
    // trip can tell. The check times out, the server is replaced, the query runs.
    signal_backend(&pid, "STOP");
    let msgs = raw.simple_query("SELECT pg_backend_pid()");
    signal_backend(&pid, "CONT");
    let other = first_value(&msgs);
    assert_ne!(other, pid, "{}", support::describe(&msgs));
    assert_eq!(
        metric(&px, "pgmux_server_closes_total", "reason=\"check_failed\""),
        1
    );
    // A server used within the delay is not checked (same backend, no new close).
    let again = first_value(&raw.simple_query("SELECT pg_backend_pid()"));
    assert_eq!(again, other);
    // One idle past the delay and alive passes the check and is reused.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        first_value(&raw.simple_query("SELECT pg_backend_pid()")),
        other
    );
    assert_eq!(
        metric(&px, "pgmux_server_closes_total", "reason=\"check_failed\""),
        1
    );
}

#[test]
fn shutdown_timeout_cancels_what_still_runs() {
    let db = TestDb::new("shut_cancel");
    let mut px = db.pgmux_env(&[], &[("PGMUX_SHUTDOWN_TIMEOUT", "1s")]);
    let mut raw = db.raw(&px);
    raw.send(&RawConn::query_message("SELECT pg_sleep(60)"));
    wait_for_one_active_query(&db);
    px.signal(15);
    // The transaction may finish for shutdown_timeout; then the client is told.
    let fatal = raw.next_error();
    let fatal = fatal.expect("an ErrorResponse before the close");
    assert_eq!(fatal[&'C'], "57P01", "{fatal:?}");
    assert!(fatal[&'M'].contains("shutdown_timeout"), "{fatal:?}");
    let status = px.wait_exit(Duration::from_secs(15)).expect("pgmux exits");
    assert!(status.success(), "{status:?}\n{}", px.log());
    // The statement did not outlive pgmux on the server.
    wait_until(
        "no backend left",
        Duration::from_secs(5),
        || match backends(&db) {
            0 => Ok(()),
            n => Err(format!("{n} backends")),
        },
    );
}

/// PostgreSQL stops (fast shutdown) under a running statement: the statement was
/// visibly running, so its client gets PostgreSQL's error instead of a silent re-run.
#[test]
fn a_restart_under_a_running_statement_reports_it() {
    let db = TestDb::new("inflight");
    let px = db.pgmux_env(
        &[],
        &[
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
            ("PGMUX_QUERY_WAIT_TIMEOUT", "30s"),
        ],
    );
    let mut raw = db.raw(&px);
    // No RowDescription before it ends: the server's FATAL is its first answer.
    raw.send(&RawConn::query_message(
        "DO $$ BEGIN PERFORM pg_sleep(30); END $$",
    ));
    std::thread::sleep(Duration::from_millis(1500));
    let node = db.cluster.primary();
    node.stop();
    let first_error = raw.next_error();
    let e = first_error.expect("an error, not a silent close or a hang");
    assert_eq!(e[&'C'], "57P01", "{e:?}");
    node.start();
    // A new client works once the server is back.
    let mut next = db.raw(&px);
    assert_eq!(first_value(&next.simple_query("SELECT 9")), "9");
    assert_eq!(metric(&px, "pgmux_units_retried_total", ""), 0);
}

#[test]
fn client_login_timeout_ends_a_stalled_login() {
    let db = TestDb::new("logintimeout");
    let px = db.pgmux_env(&[], &[("PGMUX_CLIENT_LOGIN_TIMEOUT", "500ms")]);
    // The client starts a login and never answers the password request.
    let mut raw = RawConn::connect(px.port());
    raw.startup(&db.user, &db.db, &[]);
    let error = raw.next_error();
    let e = error.expect("an ErrorResponse");
    assert_eq!(e[&'C'], "08000", "{e:?}");
    assert_eq!(e[&'S'], "FATAL", "{e:?}");
    assert!(e[&'M'].contains("client_login_timeout"), "{e:?}");
    assert!(raw.is_closed());
    // A client that logs in promptly is unaffected.
    let mut ok = db.raw(&px);
    assert_eq!(first_value(&ok.simple_query("SELECT 1")), "1");
}

#[test]
fn server_connect_timeout_fires_on_a_silent_server() {
    // A "server" on loopback that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let url = support::pg_url(port, "app", "secret", "app");
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_SERVER_CONNECT_TIMEOUT", "60s"),
            ("PGMUX_SERVER_LOGIN_RETRY", "0"),
        ],
    );
    let attempt = |port: u16| {
        let mut raw = RawConn::connect(port);
        raw.startup("app", "app", &[]);
        // pgmux authenticates the client itself, then needs a server (the first login
        // also learns the server's parameters): the error comes during or right after.
        match raw.try_scram_login("app", "secret") {
            Err(fields) => Some(fields),
            Ok(_) => {
                raw.send(&RawConn::query_message("SELECT 1"));
                error_of(&raw.read_until_ready())
            }
        }
    };
    // A first client waits on a connect that has 60s (its pool now exists).
    let pgmux_port = px.port();
    let waiting = std::thread::spawn(move || attempt(pgmux_port));
    std::thread::sleep(Duration::from_millis(500));
    // The timeout is lowered live: it applies to the pool's next connect.
    let r = ureq::patch(format!("{}/api/v1/config", px.admin_url()))
        .header("content-type", "application/json")
        .send(r#"{"server_connect_timeout": "500ms"}"#)
        .expect("PATCH /api/v1/config");
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let e = attempt(px.port()).unwrap_or_else(|| panic!("an ErrorResponse\n{}", px.log()));
    assert_eq!(e[&'C'], "08006", "{e:?}");
    assert!(e[&'M'].contains("timed out"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the lowered server_connect_timeout did not apply"
    );
    assert!(!waiting.is_finished(), "the first connect keeps its 60s");
    drop(held);
}

/// SIGINT is the fast drain: transactions are not waited for (shutdown_timeout is the
/// default 30s here); running queries are cancelled, open transactions rolled back,
/// every client told 57P01, exit 0.
#[test]
fn sigint_is_the_fast_shutdown() {
    let db = TestDb::new("fast_stop");
    db.setup("CREATE TABLE t (v int)");
    let mut px = db.pgmux(&[]);
    let mut in_tx = db.raw(&px);
    assert!(error_of(&in_tx.simple_query("BEGIN; INSERT INTO t VALUES (1)")).is_none());
    let mut running = db.raw(&px);
    running.send(&RawConn::query_message("SELECT pg_sleep(60)"));
    let mut idle = db.raw(&px);
    assert_eq!(first_value(&idle.simple_query("SELECT 1")), "1");
    wait_for_one_active_query(&db);
    let started = Instant::now();
    px.signal(2);
    for (name, conn) in [
        ("in_tx", &mut in_tx),
        ("running", &mut running),
        ("idle", &mut idle),
    ] {
        let fatal = conn
            .next_error()
            .unwrap_or_else(|| panic!("{name}: no ErrorResponse"));
        assert_eq!(fatal[&'C'], "57P01", "{name}: {fatal:?}");
        assert!(fatal[&'M'].contains("shutting down"), "{name}: {fatal:?}");
    }
    let status = px.wait_exit(Duration::from_secs(15)).expect("pgmux exits");
    assert!(status.success(), "{status:?}\n{}", px.log());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait for shutdown_timeout"
    );
    assert_eq!(db.psql("SELECT count(*) FROM t").trim(), "0", "rolled back");
    wait_until(
        "no backend left",
        Duration::from_secs(5),
        || match backends(&db) {
            0 => Ok(()),
            n => Err(format!("{n} backends")),
        },
    );
}

/// A backend terminated while its client sits idle inside a transaction: the client gets
/// PostgreSQL's FATAL and then the end of the connection, nothing after the FATAL (pgmux
/// used to add its own "server closed the connection unexpectedly").
#[test]
fn a_backend_terminated_under_an_idle_transaction_gives_one_fatal() {
    let db = TestDb::new("reap_one_fatal");
    let px = db.pgmux(&["--pool-size", "2"]);
    let mut c = db.raw(&px);
    assert!(c.simple_query("BEGIN").iter().all(|(t, _)| *t != b'E'));
    let pid = first_value(&c.simple_query("SELECT pg_backend_pid()"));
    db.psql(&format!("SELECT pg_terminate_backend({pid})"));
    let (tag, body) = c.read_message().expect("PostgreSQL's FATAL");
    assert_eq!(tag, b'E');
    let e = RawConn::error_fields(&body);
    assert_eq!(
        (e[&'S'].as_str(), e[&'C'].as_str()),
        ("FATAL", "57P01"),
        "{e:?}"
    );
    assert_eq!(c.read_message(), None, "nothing after the FATAL");
}

/// After a failover the old primary can come back read-only while the address still leads
/// to it: every write fails with 25006 "cannot execute INSERT in a read-only transaction".
/// A pooler that keeps reusing those connections fails writes until server_lifetime, even
/// after the address leads to the promoted node. pgmux closes a primary's server that
/// refused a write as read-only instead of reusing it, and a client that logged in while
/// the node was read-only does not carry that default (`default_transaction_read_only =
/// on`) onto the writable node's servers.
///
/// The role's `default_transaction_read_only` stands in for the read-only node: it applies
/// to the sessions that start while it is set, so resetting it is the address moving on
/// (new logins writable, the open ones still read-only).
#[test]
fn servers_that_refused_a_write_as_read_only_are_not_reused() {
    let db = TestDb::new("read_only");
    db.setup("CREATE TABLE written (x int)");
    db.psql(&format!(
        "ALTER ROLE \"{}\" SET default_transaction_read_only = on",
        db.user
    ));
    let px = db.pgmux(&["--pool-size", "2"]);
    // Both servers open, on the read-only node.
    let mut conns = open_servers(&db, &px, 2);
    let mut client = conns.pop().unwrap();
    let insert = "INSERT INTO written VALUES (1)";
    let refused = error_of(&client.simple_query(insert)).expect("the write is refused");
    assert_eq!(refused[&'C'], "25006", "{refused:?}");
    // The address moves on: sessions that start now are writable.
    db.psql(&format!(
        "ALTER ROLE \"{}\" RESET default_transaction_read_only",
        db.user
    ));
    // The other server opened on the read-only node refuses once more, at most; then every
    // write goes through.
    let mut refusals = 0;
    for _ in 0..6 {
        match error_of(&client.simple_query(insert)) {
            None => {}
            Some(e) if e[&'C'] == "25006" && refusals == 0 => refusals += 1,
            Some(e) => panic!(
                "write failed after the node turned writable: {e:?}\n{}",
                px.log()
            ),
        }
    }
    let written = db.psql("SELECT count(*) FROM written");
    assert_eq!(written.trim(), (6 - refusals).to_string());
    assert!(
        metric(&px, "pgmux_server_closes_total", "read_only") >= 1,
        "closes by reason: {}",
        metric(&px, "pgmux_server_closes_total", "")
    );
}
