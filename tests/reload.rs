//! Reload (issue 7): a changed server address or password recycles that pool's servers,
//! and new ones use the new values; a removed database drains (idle clients are told
//! `57P01`, transactions finish first, new logins are refused as for an unknown
//! database) and can come back; replicas added or removed take effect without a
//! restart. The limits part of reload is covered in tests/admin.rs.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{describe, first_value, percent_encode, Pgmux, RawConn, TestDb};

fn write(path: &Path, db: &TestDb, url: &str) {
    std::fs::write(
        path,
        format!("pool_size = 2\n[databases.{}]\nurl = \"{url}\"\n", db.db),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn reload(px: &Pgmux) {
    let r = ureq::post(&format!("{}/api/v1/reload", px.admin_url()))
        .send_empty()
        .expect("POST /api/v1/reload");
    assert_eq!(r.status(), 200);
}

fn query(px: &Pgmux, user: &str, password: &str, db: &str, sql: &str) -> String {
    let mut raw = RawConn::login(px.port(), user, password, db);
    let msgs = raw.simple_query(sql);
    first_value(&msgs)
}

#[test]
fn reload_moves_a_pool_to_a_new_address() {
    let db = TestDb::new("rl_addr");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    write(&file, &db, &db.database_url());
    let px = Pgmux::start(&["--config", file.to_str().expect("utf-8")], &[]);
    let sql = "SELECT (inet_client_addr() IS NULL)::text || ' ' || pg_backend_pid()";
    let before = query(&px, &db.user, &db.password, &db.db, sql);
    assert!(before.starts_with("false "), "TCP first: {before}");

    // Same server, through its unix socket now.
    let node = db.cluster.primary();
    let socket_url = format!(
        "postgres://{}:{}@{}:{}/{}",
        percent_encode(&db.user),
        percent_encode(&db.password),
        percent_encode(node.socket_dir.to_str().expect("utf-8")),
        node.port,
        db.db
    );
    write(&file, &db, &socket_url);
    reload(&px);
    let after = query(&px, &db.user, &db.password, &db.db, sql);
    assert!(
        after.starts_with("true "),
        "new servers use the socket: {after}"
    );
    assert_ne!(after, before);
}

#[test]
fn reload_with_a_new_password_logs_new_servers_in_with_it() {
    let db = TestDb::new("rl_pw");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    write(&file, &db, &db.database_url());
    let px = Pgmux::start(&["--config", file.to_str().expect("utf-8")], &[]);
    assert_eq!(query(&px, &db.user, &db.password, &db.db, "SELECT 1"), "1");

    // The password is rotated on the server, then in pgmux's configuration.
    let new_password = format!("{}-rotated", db.password);
    db.psql(&format!(
        "ALTER ROLE {} PASSWORD '{new_password}'",
        support::quote_ident(&db.user)
    ));
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{}/{}",
        percent_encode(&db.user),
        percent_encode(&new_password),
        db.cluster.primary().port,
        db.db
    );
    write(&file, &db, &url);
    reload(&px);
    // Whatever servers pgmux had are gone on the server side too: the next one must log
    // in with the new password.
    db.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
        db.user
    ));
    assert_eq!(
        query(&px, &db.user, &new_password, &db.db, "SELECT 2"),
        "2",
        "a new server logged in with the new password\n{}",
        px.log()
    );
}

/// How long the effects of a reload may take to show in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

/// Writes a configuration file: `head` (top-level keys), then one `[databases.NAME]`
/// per `(name, primary URL, replica URLs)`, then `tail` (e.g. `[users.X]` tables).
fn write_config(path: &Path, head: &str, databases: &[(&str, String, Vec<String>)], tail: &str) {
    let mut text = format!("{head}\n");
    for (name, url, replicas) in databases {
        text.push_str(&format!("[databases.{name}]\nurl = \"{url}\"\n"));
        if !replicas.is_empty() {
            let list: Vec<String> = replicas.iter().map(|r| format!("\"{r}\"")).collect();
            text.push_str(&format!("replicas = [{}]\n", list.join(", ")));
        }
    }
    text.push_str(tail);
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Polls `f` until it returns true; panics with `what` and pgmux's log after DEADLINE.
fn wait_until(px: &Pgmux, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}\n--- pgmux log ---\n{}",
            px.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET /api/v1/pools: (database, role) of every pool listed.
fn pools(px: &Pgmux) -> Vec<(String, String)> {
    let body = ureq::get(&format!("{}/api/v1/pools", px.admin_url()))
        .call()
        .expect("GET /api/v1/pools")
        .into_body()
        .read_to_string()
        .expect("pools body");
    let v: serde_json::Value = serde_json::from_str(&body).expect("pools JSON");
    v["pools"]
        .as_array()
        .unwrap_or_else(|| panic!("pools is not an array: {v}"))
        .iter()
        .map(|p| {
            (
                p["database"].as_str().unwrap_or_default().to_owned(),
                p["role"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The fields of the ErrorResponse that must come next on `conn`.
fn next_error(conn: &mut RawConn, what: &str) -> std::collections::BTreeMap<char, String> {
    match conn.read_message() {
        Some((b'E', body)) => RawConn::error_fields(&body),
        other => panic!("{what}: expected an ErrorResponse, got {other:?}"),
    }
}

/// The ErrorResponse of a login to `db` that must fail.
fn refused_login(
    px: &Pgmux,
    user: &str,
    password: &str,
    db: &str,
) -> std::collections::BTreeMap<char, String> {
    let mut conn = RawConn::connect(px.port());
    conn.startup(user, db, &[]);
    match conn.try_scram_login(user, password) {
        Ok(msgs) => panic!("login to {db} succeeded: {}", describe(&msgs)),
        Err(fields) => fields,
    }
}

#[test]
fn reload_removing_a_database_drains_it_and_adding_it_back_works() {
    let db = TestDb::new("rl_rm");
    // A second database with its own user, so its backends can be counted alone.
    let (user_b, pw_b, db_b) = db.cluster.create_user_db("rl_rm_b");
    let url_b = db.cluster.primary().url(&user_b, &pw_b, &db_b);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    let head = "pool_size = 2\nquery_wait_timeout = \"5s\"";
    let both = [
        (db.db.as_str(), db.database_url(), vec![]),
        (db_b.as_str(), url_b.clone(), vec![]),
    ];
    write_config(&file, head, &both, "");
    let px = Pgmux::start(&["--config", file.to_str().expect("utf-8")], &[]);

    let mut idle = RawConn::login(px.port(), &user_b, &pw_b, &db_b);
    assert_eq!(first_value(&idle.simple_query("SELECT 1")), "1");
    let mut in_tx = RawConn::login(px.port(), &user_b, &pw_b, &db_b);
    in_tx.simple_query("BEGIN");
    assert_eq!(first_value(&in_tx.simple_query("SELECT 2")), "2");
    let mut other = RawConn::login(px.port(), &db.user, &db.password, &db.db);
    assert_eq!(first_value(&other.simple_query("SELECT 3")), "3");
    assert!(pools(&px).iter().any(|(d, _)| *d == db_b));

    // The database goes; its user stays known (so a login gets as far as the database).
    let users = format!("[users.{user_b}]\npassword = \"{pw_b}\"\n");
    write_config(&file, head, &both[..1], &users);
    reload(&px);

    // Between transactions: told at once, then closed.
    let e = next_error(&mut idle, "idle client of the removed database");
    assert_eq!(
        (e[&'S'].as_str(), e[&'C'].as_str()),
        ("FATAL", "57P01"),
        "{e:?}"
    );
    assert_eq!(
        e[&'M'],
        format!("database \"{db_b}\" was removed from the configuration")
    );
    assert!(idle.is_closed(), "the idle client is closed");

    // Inside a transaction: it goes on to its end, then the client is told.
    assert_eq!(first_value(&in_tx.simple_query("SELECT 4")), "4");
    let commit = in_tx.simple_query("COMMIT");
    assert!(
        commit
            .iter()
            .any(|(t, b)| *t == b'C' && b.starts_with(b"COMMIT")),
        "COMMIT completes: {}",
        describe(&commit)
    );
    let e = next_error(&mut in_tx, "client of the removed database after COMMIT");
    assert_eq!(
        (e[&'S'].as_str(), e[&'C'].as_str()),
        ("FATAL", "57P01"),
        "{e:?}"
    );
    assert!(in_tx.is_closed(), "closed after its transaction");

    // New logins: the same error as a database that never existed.
    let e = refused_login(&px, &user_b, &pw_b, &db_b);
    let unknown = refused_login(&px, &user_b, &pw_b, "rl_rm_never_configured");
    assert_eq!(e[&'C'], "3D000", "{e:?}");
    assert_eq!(e[&'C'], unknown[&'C']);
    assert_eq!(e[&'M'], format!("database \"{db_b}\" does not exist"));

    // The other database is untouched; the removed one's pools and backends are gone.
    assert_eq!(first_value(&other.simple_query("SELECT 5")), "5");
    assert!(
        !pools(&px).iter().any(|(d, _)| *d == db_b),
        "pools of the removed database are not listed: {:?}",
        pools(&px)
    );
    let primary = db.cluster.primary();
    wait_until(&px, "no backend of the removed database's user", || {
        primary.backend_count(&user_b) == 0
    });

    // Back again: a fresh database.
    write_config(&file, head, &both, "");
    reload(&px);
    assert_eq!(query(&px, &user_b, &pw_b, &db_b, "SELECT 6"), "6");
    assert!(pools(&px).iter().any(|(d, r)| *d == db_b && r == "primary"));
    assert_eq!(first_value(&other.simple_query("SELECT 7")), "7");
}

/// True if `sql`'s first column (a boolean) says it ran on a replica.
fn on_replica(conn: &mut RawConn) -> bool {
    let msgs = conn.simple_query("SELECT pg_is_in_recovery()");
    match first_value(&msgs).as_str() {
        "t" => true,
        "f" => false,
        other => panic!("pg_is_in_recovery() = {other:?}"),
    }
}

#[test]
fn reload_adds_and_removes_a_replica() {
    let env = TestDb::with_replicas("rl_rep", 1);
    let replica = &env.cluster.replicas()[0];
    let replica_url = replica.url(&env.user, &env.password, &env.db);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    let head = "pool_size = 2\nquery_wait_timeout = \"5s\"\nreplica_check_interval = \"50ms\"";
    write_config(&file, head, &[(&env.db, env.database_url(), vec![])], "");
    let px = Pgmux::start(&["--config", file.to_str().expect("utf-8")], &[]);
    let login = || RawConn::login(px.port(), &env.user, &env.password, &env.db);

    let mut before = login();
    assert!(!on_replica(&mut before), "no replica configured yet");

    // Added: a new client's reads reach it once its first health check passed.
    write_config(
        &file,
        head,
        &[(&env.db, env.database_url(), vec![replica_url.clone()])],
        "",
    );
    reload(&px);
    let mut reader = login();
    wait_until(&px, "reads reach the added replica", || {
        on_replica(&mut reader)
    });
    assert!(
        pools(&px)
            .iter()
            .any(|(d, r)| *d == env.db && r == "replica"),
        "the replica pool is listed: {:?}",
        pools(&px)
    );
    assert!(replica.backend_count(&env.user) > 0);
    // The client that logged in before the reload reads correctly wherever it is sent.
    assert_eq!(first_value(&before.simple_query("SELECT 1")), "1");

    // Removed again (by SIGHUP this time): reads go to the primary, for new clients and
    // for the one that was reading from the replica, and pgmux leaves the replica.
    write_config(&file, head, &[(&env.db, env.database_url(), vec![])], "");
    px.signal(1);
    wait_until(&px, "the replica pool leaves the listing", || {
        !pools(&px).iter().any(|(_, r)| r == "replica")
    });
    let mut fresh = login();
    for _ in 0..20 {
        assert!(
            !on_replica(&mut fresh),
            "a new client reads from the primary"
        );
        assert!(
            !on_replica(&mut reader),
            "a client that read from the removed replica now reads from the primary"
        );
    }
    wait_until(&px, "no backend of pgmux's on the removed replica", || {
        replica.backend_count(&env.user) == 0
    });
    assert!(!on_replica(&mut before));
}

#[test]
fn reload_removing_a_user_keeps_its_clients_and_refuses_new_logins() {
    let db = TestDb::new("rl_user");
    let user_c = format!("{}_c", db.user);
    let pw_c = format!("{}-c", db.password);
    db.cluster.create_role(&user_c, &pw_c);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    let head = "pool_size = 2\nquery_wait_timeout = \"5s\"";
    let dbs = [(db.db.as_str(), db.database_url(), vec![])];
    write_config(
        &file,
        head,
        &dbs,
        &format!("[users.{user_c}]\npassword = \"{pw_c}\"\n"),
    );
    let px = Pgmux::start(&["--config", file.to_str().expect("utf-8")], &[]);
    let mut kept = RawConn::login(px.port(), &user_c, &pw_c, &db.db);
    assert_eq!(first_value(&kept.simple_query("SELECT 1")), "1");

    write_config(&file, head, &dbs, "");
    reload(&px);
    // Its servers are gone on the server side: the next one logs in with the password
    // the pool had, not with none.
    db.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user_c}'"
    ));
    wait_until(&px, "the removed user's backends are gone", || {
        db.cluster.primary().backend_count(&user_c) == 0
    });
    assert_eq!(
        first_value(&kept.simple_query("SELECT 2")),
        "2",
        "a logged-in client of a removed user goes on"
    );
    let e = refused_login(&px, &user_c, &pw_c, &db.db);
    assert_eq!(e[&'C'], "28P01", "{e:?}");
}
