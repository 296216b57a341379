//! Timeouts, server lifetime, outages and the drain (issue 7, first part), against real
//! PostgreSQL: each timeout fires with the error a PostgreSQL client expects, clients
//! wait through a primary restart, SIGTERM treats idle, waiting and in-transaction
//! clients as documented; what is left behind (servers, transactions, rows) is checked
//! on the server itself.

mod support;

use std::time::{Duration, Instant};

use support::{first_value, RawConn, TestDb};

/// Reads messages until an ErrorResponse arrives (or the connection closes); returns its
/// fields.
fn wait_error(raw: &mut RawConn) -> std::collections::BTreeMap<char, String> {
    raw.next_error()
        .expect("connection closed without an ErrorResponse")
}

#[test]
fn client_idle_timeout_closes_idle_clients_with_57p05() {
    let db = TestDb::new("to_idle");
    let px = db.pgmux_env(&[], &[("PGMUX_CLIENT_IDLE_TIMEOUT", "1s")]);
    let mut raw = db.raw(&px);
    let msgs = raw.simple_query("SELECT 1");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
    let started = Instant::now();
    let fields = wait_error(&mut raw);
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("57P05"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert!(
        fields[&'M'].contains("client_idle_timeout"),
        "the message names the setting: {fields:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(raw.is_closed(), "the connection is closed after the FATAL");

    // A client that keeps working is not affected: one query every 300 ms for 2 s.
    let mut busy = db.raw(&px);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let msgs = busy.simple_query("SELECT 1");
        assert!(
            msgs.iter().all(|(t, _)| *t != b'E'),
            "{}",
            support::describe(&msgs)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn idle_transaction_timeout_rolls_back_and_frees_the_server() {
    let db = TestDb::new("to_idletx");
    db.setup("CREATE TABLE t (v int)");
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[("PGMUX_IDLE_TRANSACTION_TIMEOUT", "1s")],
    );
    let mut raw = db.raw(&px);
    let msgs = raw.simple_query("BEGIN; INSERT INTO t VALUES (1)");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
    let fields = wait_error(&mut raw);
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("25P03"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert!(raw.is_closed());

    // The only server of the pool comes back (rolled back) for the next client.
    let mut next = db.raw(&px);
    let msgs = next.simple_query("SELECT count(*) FROM t");
    assert_eq!(
        first_value(&msgs),
        "0",
        "the abandoned INSERT was rolled back"
    );
    let state = db.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND state = 'idle in transaction'",
        db.user
    ));
    assert_eq!(state.trim(), "0", "no backend left idle in transaction");

    // Within the limit, a transaction is left alone.
    let msgs = next.simple_query("BEGIN");
    assert!(msgs.iter().all(|(t, _)| *t != b'E'));
    std::thread::sleep(Duration::from_millis(400));
    let msgs = next.simple_query("INSERT INTO t VALUES (2); COMMIT");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
}

#[test]
fn server_lifetime_recycles_old_servers_at_release() {
    let db = TestDb::new("to_life");
    let px = db.pgmux_env(&["--pool-size", "1"], &[("PGMUX_SERVER_LIFETIME", "2s")]);
    let mut raw = db.raw(&px);
    let pid = |raw: &mut RawConn| first_value(&raw.simple_query("SELECT pg_backend_pid()"));
    let first = pid(&mut raw);
    assert_eq!(pid(&mut raw), first, "a young server is reused");
    // A transaction that outlives the lifetime is not cut: the server goes after it.
    let msgs = raw.simple_query("BEGIN; SELECT pg_sleep(2.2)");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
    let inside = pid(&mut raw);
    assert_eq!(inside, first, "same server for the whole transaction");
    let msgs = raw.simple_query("COMMIT");
    assert!(msgs.iter().all(|(t, _)| *t != b'E'));
    let after = pid(&mut raw);
    assert_ne!(
        after, first,
        "the old server was closed at release and replaced"
    );

    // Idle servers past their lifetime are closed by the maintenance task too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = db.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND pid = {after}",
            db.user
        ));
        if n.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle server {after} outlived its lifetime"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = ureq::get(&format!("{}/api/v1/stats", px.admin_url()))
        .call()
        .expect("GET /api/v1/stats")
        .body_mut()
        .read_to_string()
        .expect("body");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        stats["server_closes"]["lifetime"].as_u64().unwrap_or(0) >= 2,
        "closes counted with reason lifetime: {stats}"
    );
}

#[test]
fn clients_wait_through_a_primary_restart() {
    let db = TestDb::new("to_restart");
    let px = db.pgmux_env(
        &["--pool-size", "2"],
        &[
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
            ("PGMUX_QUERY_WAIT_TIMEOUT", "30s"),
        ],
    );
    // Without retries, the same outage is an immediate error.
    let px_no_retry = db.pgmux_env(&[], &[("PGMUX_SERVER_LOGIN_RETRY", "0")]);
    let mut before = db.raw(&px);
    assert_eq!(first_value(&before.simple_query("SELECT 1")), "1");
    let mut no_retry = db.raw(&px_no_retry);
    assert_eq!(first_value(&no_retry.simple_query("SELECT 1")), "1");

    let node = db.cluster.primary();
    node.stop();
    let started = Instant::now();
    let (user, password, name, port) = (
        db.user.clone(),
        db.password.clone(),
        db.db.clone(),
        px.port(),
    );
    let waiting = std::thread::spawn(move || {
        // Logs in from the parameters pgmux already knows; the query waits for a server.
        let mut c = RawConn::login(port, &user, &password, &name);
        let msgs = c.simple_query("SELECT 42");
        (msgs, Instant::now())
    });

    let mut failing = db.raw(&px_no_retry);
    failing.send(&RawConn::query_message("SELECT 1"));
    let mut msgs = Vec::new();
    while let Some(m) = failing.read_message() {
        let done = m.0 == b'Z';
        msgs.push(m);
        if done {
            break;
        }
    }
    assert!(
        msgs.iter().any(|(t, _)| *t == b'E'),
        "server_login_retry = 0: an error at once, got {}",
        support::describe(&msgs)
    );

    std::thread::sleep(Duration::from_millis(1500));
    assert!(!waiting.is_finished(), "the query waited for the server");
    node.start();
    let (msgs, done) = waiting.join().expect("client thread");
    assert_eq!(first_value(&msgs), "42", "{}", support::describe(&msgs));
    assert!(done - started >= Duration::from_millis(1500));
    // The client connected before the outage had an idle server that died with it: its
    // next transaction gets a new one without an error.
    assert_eq!(first_value(&before.simple_query("SELECT 7")), "7");
}

/// The SQLSTATE of the next ErrorResponse, if one comes before the connection ends.
fn goodbye(raw: &mut RawConn) -> Option<String> {
    raw.next_error().and_then(|f| f.get(&'C').cloned())
}

#[test]
fn sigterm_drains_idle_waiting_and_in_transaction_clients() {
    let db = TestDb::new("to_drain");
    db.setup("CREATE TABLE t (v int)");
    let mut px = db.pgmux_env(&["--pool-size", "1"], &[("PGMUX_SHUTDOWN_TIMEOUT", "20s")]);
    let mut idle = db.raw(&px);
    assert_eq!(first_value(&idle.simple_query("SELECT 1")), "1");
    let mut in_tx = db.raw(&px);
    let msgs = in_tx.simple_query("BEGIN; INSERT INTO t VALUES (1)");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
    // The only server is taken: this query waits for it.
    let mut waiting = db.raw(&px);
    waiting.send(&RawConn::query_message("INSERT INTO t VALUES (2)"));
    std::thread::sleep(Duration::from_millis(300));

    px.signal(15);
    assert_eq!(goodbye(&mut idle).as_deref(), Some("57P01"), "idle client");
    assert_eq!(
        goodbye(&mut waiting).as_deref(),
        Some("57P01"),
        "waiting client"
    );
    // New connections are refused while the transaction finishes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", px.port())).is_ok() {
        assert!(
            Instant::now() < deadline,
            "pgmux still accepts during the drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The transaction in progress may finish, then the client is told at the boundary.
    let msgs = in_tx.simple_query("INSERT INTO t VALUES (3); COMMIT");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'E'),
        "{}",
        support::describe(&msgs)
    );
    assert_eq!(
        goodbye(&mut in_tx).as_deref(),
        Some("57P01"),
        "after its commit"
    );
    let status = px.wait_exit(Duration::from_secs(15)).expect("pgmux exits");
    assert!(status.success(), "exit status {status:?}");

    // What committed is there; what never ran is not.
    let rows = db.psql("SELECT string_agg(v::text, ',' ORDER BY v) FROM t");
    assert_eq!(rows.trim(), "1,3");
    assert_eq!(
        db.cluster.primary().backend_count(&db.user),
        0,
        "servers closed"
    );
}
