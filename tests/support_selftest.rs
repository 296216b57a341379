//! Self-tests for the integration-test support code (tests/support), run
//! directly against PostgreSQL without pgmux.

mod support;

use std::time::Duration;

use support::{PgCluster, RawConn};

#[tokio::test]
async fn cluster_user_db_and_tokio_postgres() {
    let cluster = PgCluster::start();
    let (user, password, db) = cluster.create_user_db("self test");
    let pg = cluster.primary();

    let client = support::connect(&pg.url(&user, &password, &db)).await;
    let row = client.query_one("SELECT 1::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, user);
    assert_eq!(pg.backend_count(&user), 1);

    // SCRAM is enforced over TCP for non-superusers.
    let Err(err) = support::try_connect(&pg.url(&user, "wrong", &db)).await else {
        panic!("wrong password must fail");
    };
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("28P01"), "{err:?}");

    // The stored verifier is SCRAM.
    let verifier = pg.psql(
        "postgres",
        &format!(
            "SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = {}",
            support::quote_literal(&user)
        ),
    );
    assert_eq!(verifier, "SCRAM-SHA-256$");

    drop(client);
    // Names are unique per call.
    let (user2, _, db2) = cluster.create_user_db("self test");
    assert_ne!(user, user2);
    assert_ne!(db, db2);
}

#[test]
fn psql_multiple_statements_and_restart() {
    let cluster = PgCluster::start();
    let pg = cluster.primary();
    let out = pg.psql(
        "postgres",
        "CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2); SELECT sum(x) FROM t;",
    );
    assert_eq!(out, "3");
    assert!(pg.try_psql("postgres", "SELECT nope").is_err());

    let port = pg.port;
    pg.stop();
    assert!(!pg.is_running());
    pg.start();
    assert_eq!(pg.port, port);
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t"), "2");
    pg.kill();
    assert!(!pg.is_running());
    pg.start();
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t"), "2");
}

#[test]
fn replica_streams_from_primary() {
    let mut cluster = PgCluster::start();
    cluster
        .primary()
        .psql("postgres", "CREATE TABLE before_replica(x int);");
    let replica_port = {
        let replica = cluster.add_replica();
        assert_eq!(replica.psql("postgres", "SELECT pg_is_in_recovery()"), "t");
        assert_eq!(
            replica.psql("postgres", "SELECT count(*) FROM before_replica"),
            "0"
        );
        replica.port
    };
    assert_ne!(replica_port, cluster.primary().port);
    assert_eq!(
        cluster
            .primary()
            .psql("postgres", "SELECT pg_is_in_recovery()"),
        "f"
    );

    cluster.primary().psql(
        "postgres",
        "CREATE TABLE after_replica(x int); INSERT INTO after_replica VALUES (42);",
    );
    cluster.sync_replicas();
    let replica = &cluster.replicas()[0];
    assert_eq!(
        replica.psql("postgres", "SELECT x FROM after_replica"),
        "42"
    );
    // Read-only.
    assert!(replica
        .try_psql("postgres", "INSERT INTO after_replica VALUES (1)")
        .is_err());

    // A role created on the primary can log in to the replica with SCRAM.
    let (user, password, db) = cluster.create_user_db("repl");
    cluster.sync_replicas();
    let mut raw = RawConn::login(replica.port, &user, &password, &db);
    let msgs = raw.simple_query("SELECT pg_is_in_recovery()");
    assert!(msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"t")));
}

#[test]
fn raw_conn_scram_login_against_postgres() {
    let cluster = PgCluster::start();
    let (user, password, db) = cluster.create_user_db("raw");
    let pg = cluster.primary();

    let mut conn = RawConn::connect(pg.port);
    conn.startup(&user, &db, &[("application_name", "rawtest")]);
    let msgs = conn.scram_login(&user, &password);
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert!(tags.contains(&b'S'), "no ParameterStatus: {tags:?}");
    assert!(tags.contains(&b'K'), "no BackendKeyData: {tags:?}");
    assert_eq!(*tags.last().unwrap(), b'Z');
    assert_eq!(msgs.last().unwrap().1, b"I");
    let params: Vec<String> = msgs
        .iter()
        .filter(|m| m.0 == b'S')
        .map(|m| String::from_utf8_lossy(&m.1).into_owned())
        .collect();
    assert!(
        params
            .iter()
            .any(|p| p.starts_with("application_name\0rawtest")),
        "{params:?}"
    );
    assert!(conn.backend_key.is_some());

    // Simple query round trip.
    let msgs = conn.simple_query("SELECT 7");
    assert!(msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"7")));

    // Errors are parsed.
    let msgs = conn.simple_query("SELECT * FROM no_such_table");
    let err = msgs.iter().find(|m| m.0 == b'E').expect("ErrorResponse");
    let fields = RawConn::error_fields(&err.1);
    assert_eq!(fields[&'S'], "ERROR");
    assert_eq!(fields[&'C'], "42P01");
    assert!(fields[&'M'].contains("no_such_table"));

    // Terminate -> server closes.
    conn.send(&RawConn::terminate_message());
    assert!(conn.is_closed());

    // Wrong password -> 28P01.
    let mut bad = RawConn::connect(pg.port);
    bad.startup(&user, &db, &[]);
    let fields = bad.try_scram_login(&user, "nope").unwrap_err();
    assert_eq!(fields[&'C'], "28P01");
    assert!(bad.is_closed());

    // Without an explicit startup, scram_login defaults database = user.
    cluster.create_database(&user, &user);
    let mut implicit = RawConn::connect(pg.port);
    implicit.scram_login(&user, &password);
    let msgs = implicit.simple_query("SELECT current_database()");
    assert!(msgs
        .iter()
        .any(|(t, b)| *t == b'D' && b.ends_with(user.as_bytes())));

    // Garbage startup -> error/close; is_closed reports it.
    let mut garbage = RawConn::connect(pg.port);
    garbage.send(&[0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78]);
    assert!(garbage.is_closed());

    // An idle open connection is not closed.
    let mut idle = RawConn::login(pg.port, &user, &password, &db);
    assert!(!idle.is_closed());
    let msgs = idle.simple_query("SELECT 1");
    assert_eq!(msgs.last().unwrap().0, b'Z');

    // Connection counting sees the raw backends.
    assert!(pg.backend_count(&user) >= 2);
    drop(idle);
    drop(implicit);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg.backend_count(&user) != 0 {
        assert!(std::time::Instant::now() < deadline, "backends linger");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pg_tool_runs_client_binaries() {
    let cluster = PgCluster::start();
    let pg = cluster.primary();
    let out = support::pg_tool("psql")
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
        .arg(pg.port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-c", "SELECT 40 + 2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    support::raise_fd_limit();
}

#[test]
fn url_percent_encoding() {
    assert_eq!(
        support::pg_url(5432, "a b", "p@ss:/w", "d%b"),
        "postgres://a%20b:p%40ss%3A%2Fw@127.0.0.1:5432/d%25b"
    );
}

#[test]
#[should_panic(expected = "pgmux exited during startup")]
fn pgmux_start_reports_early_exit() {
    // An unknown flag makes pgmux exit immediately; start() must notice
    // and panic (with the log) instead of waiting for the port.
    support::Pgmux::start(&["--definitely-not-a-pgmux-flag"], &[]);
}

/// The suite-wide log check works: a registered secret that does appear in a pgmux log
/// fails the test that dropped the pgmux.
#[test]
fn a_registered_secret_in_the_pgmux_log_fails_the_test() {
    let cluster = PgCluster::start();
    let (user, password, db) = cluster.create_user_db("secret scan");
    let url = cluster.primary().url(&user, &password, &db);
    let px = support::Pgmux::start(&[], &[("DATABASE_URL", url.as_str())]);
    // pgmux logs this line at start-up (just after it binds the port start() waits
    // for, so wait for the line too); pretend it were a password.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !px.log().contains("accepting connections") {
        assert!(std::time::Instant::now() < deadline, "{}", px.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    support::register_secret("accepting connections");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(px)));
    let msg = r.expect_err("dropping the pgmux must panic");
    let text = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("contains the password"), "{text}");
}
