//! Reload of what a pool logs in with (issue 7, part): a changed server address or
//! password recycles that pool's servers, and new ones use the new values. The limits
//! part of reload is covered in tests/admin.rs.

mod support;

use std::path::Path;

use support::{first_value, percent_encode, Pgmux, RawConn, TestDb};

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
